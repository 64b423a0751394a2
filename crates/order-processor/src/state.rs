//! The states an order and its payment pass through, as Postgres stores
//! them (text), and what the processor does next in each: a pure function,
//! tested here without Postgres.
//!
//! ```text
//! authorising ──authorise, reserve stock──▶ capturing ──capture──▶ captured  (processed)
//!      │    │
//!      │    └──authorise, out of stock──▶ voiding ──void──▶ voided  (rejected)
//!      └──declined──▶ declined  (rejected)
//! ```
//!
//! An authorisation is recorded with the decision it leads to. `authorised`
//! (authorised, not yet decided) is what releases before this one recorded
//! first; a payment left there is decided as it is read.

use std::fmt;

use crate::payment::Operation;

/// An order's status. `accepted` and `held` (its message dead-lettered)
/// are open: the processor takes either on. `processed` and `rejected` are
/// final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Accepted,
    Held,
    Processed,
    Rejected,
}

impl OrderStatus {
    /// Every status, in the order an order can reach them.
    pub const ALL: [OrderStatus; 4] = [
        OrderStatus::Accepted,
        OrderStatus::Held,
        OrderStatus::Processed,
        OrderStatus::Rejected,
    ];

    /// The text Postgres stores.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Accepted => "accepted",
            OrderStatus::Held => "held",
            OrderStatus::Processed => "processed",
            OrderStatus::Rejected => "rejected",
        }
    }

    /// Whether the processor still has work to do on the order.
    pub fn is_open(self) -> bool {
        matches!(self, OrderStatus::Accepted | OrderStatus::Held)
    }
}

impl TryFrom<String> for OrderStatus {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        OrderStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
            .ok_or_else(|| format!("unknown order status {text:?}"))
    }
}

/// Where a payment stands. The first four are steps on the way; the last
/// three are where the money ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PaymentState {
    Authorising,
    Authorised,
    Capturing,
    Voiding,
    Captured,
    Voided,
    Declined,
}

impl PaymentState {
    /// Every state, in the order a payment can reach them.
    pub const ALL: [PaymentState; 7] = [
        PaymentState::Authorising,
        PaymentState::Authorised,
        PaymentState::Capturing,
        PaymentState::Voiding,
        PaymentState::Captured,
        PaymentState::Voided,
        PaymentState::Declined,
    ];

    /// The text Postgres stores.
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentState::Authorising => "authorising",
            PaymentState::Authorised => "authorised",
            PaymentState::Capturing => "capturing",
            PaymentState::Voiding => "voiding",
            PaymentState::Captured => "captured",
            PaymentState::Voided => "voided",
            PaymentState::Declined => "declined",
        }
    }
}

impl fmt::Display for PaymentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for PaymentState {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        PaymentState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| format!("unknown payment state {text:?}"))
    }
}

/// What the processor does next with an order and its payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Ask the provider.
    Call(Operation),
    /// Reserve the stock and decide: capture, or void.
    Decide,
    /// Nothing: the order is final (handled before).
    Done,
    /// The order is open but its payment has ended: the states disagree.
    Inconsistent,
}

/// The next step for an order in `status` whose payment is in `state`.
pub fn next(status: OrderStatus, state: PaymentState) -> Step {
    if !status.is_open() {
        return Step::Done;
    }
    match state {
        PaymentState::Authorising => Step::Call(Operation::Authorise),
        PaymentState::Authorised => Step::Decide,
        PaymentState::Capturing => Step::Call(Operation::Capture),
        PaymentState::Voiding => Step::Call(Operation::Void),
        PaymentState::Captured | PaymentState::Voided | PaymentState::Declined => {
            Step::Inconsistent
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_order_goes_on_from_where_its_payment_stands() {
        for status in [OrderStatus::Accepted, OrderStatus::Held] {
            assert_eq!(
                next(status, PaymentState::Authorising),
                Step::Call(Operation::Authorise)
            );
            assert_eq!(next(status, PaymentState::Authorised), Step::Decide);
            assert_eq!(
                next(status, PaymentState::Capturing),
                Step::Call(Operation::Capture)
            );
            assert_eq!(
                next(status, PaymentState::Voiding),
                Step::Call(Operation::Void)
            );
            for ended in [
                PaymentState::Captured,
                PaymentState::Voided,
                PaymentState::Declined,
            ] {
                assert_eq!(
                    next(status, ended),
                    Step::Inconsistent,
                    "{status:?} {ended}"
                );
            }
        }
    }

    #[test]
    fn a_final_order_has_nothing_left_whatever_its_payment() {
        for status in [OrderStatus::Processed, OrderStatus::Rejected] {
            for state in PaymentState::ALL {
                assert_eq!(next(status, state), Step::Done, "{status:?} {state}");
            }
        }
    }

    #[test]
    fn states_read_back_as_postgres_stores_them() {
        for state in PaymentState::ALL {
            assert_eq!(PaymentState::try_from(state.as_str().to_owned()), Ok(state));
        }
        for (status, text) in
            OrderStatus::ALL
                .into_iter()
                .zip(["accepted", "held", "processed", "rejected"])
        {
            assert_eq!(OrderStatus::try_from(text.to_owned()), Ok(status));
        }
        assert!(PaymentState::try_from("refunded".to_owned()).is_err());
        assert!(OrderStatus::try_from("lost".to_owned()).is_err());
    }
}
