//! Failures a demo customer asks for, when `DEMO_FAILURES` is on, so tests
//! and demos can break the flow at any step:
//!
//! | customer id | what the provider does |
//! |---|---|
//! | `flaky-N` / `flaky-<step>-N` | the first N requests of `authorise` / `<step>` answer 503, doing nothing |
//! | `doomed` / `doomed-<step>` | every request of `authorise` / `<step>` answers 503, doing nothing |
//! | `timeout-<step>` / `timeout-<step>-N` | the first (N) requests of `<step>` do the work, then hold the answer longer than the caller waits |
//!
//! where `<step>` is `authorise`, `capture` or `void`, and requests are
//! counted per idempotency key.

/// A failure a customer asks for on one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Requests up to this count fail without doing anything.
    FailUpTo(u32),
    /// Requests up to this count do the work, then answer too late.
    SlowUpTo(u32),
}

impl Fault {
    /// Whether the `calls`-th request with a key fails this way.
    pub fn applies(self, calls: u32) -> bool {
        match self {
            Fault::FailUpTo(n) | Fault::SlowUpTo(n) => calls <= n,
        }
    }
}

/// The failure `customer_id` asks for on `step` (`authorise`, `capture` or
/// `void`), if any.
pub fn asked_for(customer_id: &str, step: &str) -> Option<Fault> {
    let calls = |rest: &str| rest.parse::<u32>().ok();
    match customer_id.split_once('-') {
        None if customer_id == "doomed" => {
            (step == "authorise").then_some(Fault::FailUpTo(u32::MAX))
        }
        Some(("doomed", rest)) if rest == step => Some(Fault::FailUpTo(u32::MAX)),
        Some(("flaky", rest)) => match rest.split_once('-') {
            Some((named, n)) if named == step => calls(n).map(Fault::FailUpTo),
            Some(_) => None,
            None => (step == "authorise")
                .then(|| calls(rest).map(Fault::FailUpTo))
                .flatten(),
        },
        Some(("timeout", rest)) => match rest.split_once('-') {
            Some((named, n)) if named == step => calls(n).map(Fault::SlowUpTo),
            Some(_) => None,
            None => (rest == step).then_some(Fault::SlowUpTo(1)),
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_customer_ids_name_the_step_and_the_requests_that_fail() {
        use Fault::*;
        let (authorise, capture, void) = ("authorise", "capture", "void");
        assert_eq!(asked_for("doomed", authorise), Some(FailUpTo(u32::MAX)));
        assert_eq!(asked_for("doomed", capture), None);
        assert_eq!(asked_for("flaky-2", authorise), Some(FailUpTo(2)));
        assert_eq!(asked_for("flaky-2", void), None);
        assert_eq!(
            asked_for("doomed-capture", capture),
            Some(FailUpTo(u32::MAX))
        );
        assert_eq!(asked_for("doomed-capture", authorise), None);
        assert_eq!(asked_for("flaky-void-3", void), Some(FailUpTo(3)));
        assert_eq!(asked_for("timeout-capture-2", capture), Some(SlowUpTo(2)));
        assert_eq!(asked_for("timeout-authorise", authorise), Some(SlowUpTo(1)));
        assert_eq!(asked_for("timeout-authorise", capture), None);
        assert_eq!(asked_for("c-7", authorise), None);
        assert_eq!(asked_for("flaky-x", authorise), None);
        assert!(FailUpTo(2).applies(2) && !FailUpTo(2).applies(3));
    }
}
