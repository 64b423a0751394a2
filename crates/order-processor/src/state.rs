//! The states an order and its payment pass through, as Postgres stores
//! them (text); what the processor does next in each ([`next`]), what the
//! provider's answer makes of a payment ([`answered`]), and what the stock
//! allows an order ([`reserve`]): pure functions, tested here without
//! Postgres.
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

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    str::FromStr,
};

use messaging::contracts::{Outcome, PaymentOutcome};
use sqlx::{
    Postgres,
    error::BoxDynError,
    postgres::{PgTypeInfo, PgValueRef},
};

use crate::payment::{Answer, Operation};

/// A state Postgres stores as the text of [`as_str`](PaymentState::as_str):
/// parsed from it, and decoded from a column by sqlx where a statement
/// names the type (`p.state AS "state: PaymentState"`). Statements bind the
/// text itself.
macro_rules! stored_as_text {
    ($state:ty, $what:literal) => {
        impl FromStr for $state {
            type Err = String;

            fn from_str(text: &str) -> Result<Self, String> {
                <$state>::ALL
                    .into_iter()
                    .find(|state| state.as_str() == text)
                    .ok_or_else(|| format!(concat!("unknown ", $what, " {:?}"), text))
            }
        }

        impl sqlx::Type<Postgres> for $state {
            fn type_info() -> PgTypeInfo {
                <str as sqlx::Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <str as sqlx::Type<Postgres>>::compatible(ty)
            }
        }

        impl sqlx::Decode<'_, Postgres> for $state {
            fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
                Ok(<&str as sqlx::Decode<Postgres>>::decode(value)?.parse()?)
            }
        }
    };
}

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

stored_as_text!(OrderStatus, "order status");

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

stored_as_text!(PaymentState, "payment state");

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

/// What the provider's answer to a step's call makes of the payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answered {
    /// An authorisation held: reserve the stock and decide.
    Decide,
    /// The money has settled: record `payment` with the order's `outcome`,
    /// if the payment is still `from`.
    Finish {
        from: PaymentState,
        payment: PaymentOutcome,
        outcome: Outcome,
    },
    /// An answer the step cannot use (the provider refused the call).
    Refused,
}

/// What `answer`, to the call `operation` that the payment's state asked
/// for, makes of it; `void_reason` is why a payment being voided is.
pub fn answered(operation: Operation, answer: &Answer, void_reason: Option<&str>) -> Answered {
    match (operation, answer) {
        (Operation::Authorise, Answer::Authorised) => Answered::Decide,
        (Operation::Authorise, Answer::Declined) => Answered::Finish {
            from: PaymentState::Authorising,
            payment: PaymentOutcome::Declined,
            outcome: Outcome::Rejected {
                reason: "payment_declined".into(),
            },
        },
        (Operation::Capture, Answer::Captured) => Answered::Finish {
            from: PaymentState::Capturing,
            payment: PaymentOutcome::Captured,
            outcome: Outcome::Processed,
        },
        (Operation::Void, Answer::Voided) => Answered::Finish {
            from: PaymentState::Voiding,
            payment: PaymentOutcome::Voided,
            outcome: Outcome::Rejected {
                reason: void_reason.unwrap_or("voided").into(),
            },
        },
        _ => Answered::Refused,
    }
}

/// Take what `lines` ask for from `stock` (what is left of each SKU), all
/// of it or none: the quantity taken of each SKU, or the first SKU (in SKU
/// order) short of what the lines ask.
pub fn reserve<'a>(
    stock: &mut HashMap<String, i64>,
    lines: impl IntoIterator<Item = (&'a str, i64)>,
) -> Result<BTreeMap<&'a str, i64>, &'a str> {
    let mut needed: BTreeMap<&str, i64> = BTreeMap::new();
    for (sku, quantity) in lines {
        *needed.entry(sku).or_default() += quantity;
    }
    if let Some((sku, _)) = needed
        .iter()
        .find(|(sku, quantity)| stock.get(**sku).is_none_or(|left| left < *quantity))
    {
        return Err(sku);
    }
    for (sku, quantity) in &needed {
        *stock.get_mut(*sku).expect("checked above") -= quantity;
    }
    Ok(needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_answer_to_the_call_its_state_asked_for_moves_the_payment_on() {
        assert_eq!(
            answered(Operation::Authorise, &Answer::Authorised, None),
            Answered::Decide
        );
        let declined = answered(Operation::Authorise, &Answer::Declined, None);
        assert_eq!(
            declined,
            Answered::Finish {
                from: PaymentState::Authorising,
                payment: PaymentOutcome::Declined,
                outcome: Outcome::Rejected {
                    reason: "payment_declined".into()
                },
            }
        );
        assert_eq!(
            answered(Operation::Capture, &Answer::Captured, None),
            Answered::Finish {
                from: PaymentState::Capturing,
                payment: PaymentOutcome::Captured,
                outcome: Outcome::Processed,
            }
        );
        assert_eq!(
            answered(
                Operation::Void,
                &Answer::Voided,
                Some("out_of_stock: GADGET")
            ),
            Answered::Finish {
                from: PaymentState::Voiding,
                payment: PaymentOutcome::Voided,
                outcome: Outcome::Rejected {
                    reason: "out_of_stock: GADGET".into()
                },
            }
        );
    }

    #[test]
    fn a_refusal_or_an_answer_to_another_call_is_refused() {
        let refused = Answer::Refused("authorisation voided".into());
        for operation in [Operation::Authorise, Operation::Capture, Operation::Void] {
            assert_eq!(answered(operation, &refused, None), Answered::Refused);
        }
        assert_eq!(
            answered(Operation::Capture, &Answer::Voided, None),
            Answered::Refused
        );
        assert_eq!(
            answered(Operation::Void, &Answer::Captured, None),
            Answered::Refused
        );
        assert_eq!(
            answered(Operation::Authorise, &Answer::Captured, None),
            Answered::Refused
        );
    }

    #[test]
    fn an_order_takes_all_its_lines_or_none_in_the_order_orders_come() {
        let mut stock: HashMap<String, i64> =
            [("GADGET".to_owned(), 3), ("WIDGET".to_owned(), 5)].into();
        // Two lines of one SKU count together.
        assert_eq!(
            reserve(&mut stock, [("GADGET", 1), ("WIDGET", 2), ("GADGET", 1)]),
            Ok([("GADGET", 2), ("WIDGET", 2)].into())
        );
        // Short of one SKU: nothing taken, not even what was there.
        assert_eq!(
            reserve(&mut stock, [("WIDGET", 1), ("GADGET", 2)]),
            Err("GADGET")
        );
        assert_eq!(stock["WIDGET"], 3);
        assert_eq!(stock["GADGET"], 1);
        // A SKU the shop does not stock is short.
        assert_eq!(reserve(&mut stock, [("UNKNOWN", 1)]), Err("UNKNOWN"));
        // What is left still serves the next order.
        assert_eq!(
            reserve(&mut stock, [("GADGET", 1)]),
            Ok([("GADGET", 1)].into())
        );
        assert_eq!(stock["GADGET"], 0);
    }

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
            assert_eq!(state.as_str().parse::<PaymentState>(), Ok(state));
        }
        for (status, text) in
            OrderStatus::ALL
                .into_iter()
                .zip(["accepted", "held", "processed", "rejected"])
        {
            assert_eq!(text.parse::<OrderStatus>(), Ok(status));
        }
        assert!("refunded".parse::<PaymentState>().is_err());
        assert!("lost".parse::<OrderStatus>().is_err());
    }
}
