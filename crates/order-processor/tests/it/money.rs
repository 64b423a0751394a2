//! The money: authorise, reserve, then capture or void, exactly once,
//! whichever step a crash falls between, whether the provider fails or
//! times out after doing the work, and whoever finishes the payment (the
//! next delivery or the sweeper).

use std::time::Duration;

use messaging::contracts::{OrderPlaced, Outcome, PaymentOutcome};
use order_processor::{
    handler::{Handled, Processor},
    payment::{Answer, Call, Charge, Operation},
    sweeper::Sweeper,
};
use sqlx::PgPool;

use crate::helpers::{accepted_order, accepted_order_of, processor_with, provider, stock};

/// What orderflow's books and the provider's say about one order's money.
#[derive(Debug, PartialEq, Eq)]
struct Money {
    status: String,
    payment: String,
    /// The provider's authorisation, if it has one.
    provider: Option<String>,
    authorisations: i64,
    captured_cents: i64,
    voids: i64,
    final_statuses: i64,
    events: i64,
}

/// orderflow's books (`pool`) and the provider's (`books`) on `order`.
async fn money(pool: &PgPool, books: &PgPool, order: &OrderPlaced) -> Money {
    let ours = sqlx::query!(
        r#"SELECT o.status, p.state AS payment,
            (SELECT count(*) FROM order_status_history
             WHERE order_id = o.id AND status IN ('processed', 'rejected')) AS "final_statuses!",
            (SELECT count(*) FROM outbox WHERE order_id = o.id) AS "events!"
         FROM orders o JOIN payments p ON p.order_id = o.id
         WHERE o.id = $1"#,
        order.order_id,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    // The provider's database: a crate's statements are checked against one
    // database, orderflow's here.
    let (provider, authorisations, captured_cents, voids) = sqlx::query_as(
        "SELECT (SELECT state FROM provider_authorisations WHERE reference = $1),
            (SELECT count(*) FROM provider_ledger
             WHERE reference = $1 AND operation = 'authorise' AND outcome = 'authorised'),
            (SELECT coalesce(sum(amount_cents), 0)::bigint FROM provider_ledger
             WHERE reference = $1 AND operation = 'capture' AND outcome = 'captured'),
            (SELECT count(*) FROM provider_ledger
             WHERE reference = $1 AND operation = 'void' AND outcome = 'voided')",
    )
    .bind(order.order_id)
    .fetch_one(books)
    .await
    .unwrap();
    Money {
        status: ours.status,
        payment: ours.payment,
        provider,
        authorisations,
        captured_cents,
        voids,
        final_statuses: ours.final_statuses,
        events: ours.events,
    }
}

/// The states `order`'s payment was recorded in, in order.
async fn history(pool: &PgPool, order: &OrderPlaced) -> Vec<String> {
    sqlx::query_scalar!(
        "SELECT state FROM payment_history WHERE order_id = $1 ORDER BY id",
        order.order_id,
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Captured once, for the order's total; nothing voided.
fn captured(order: &OrderPlaced) -> Money {
    Money {
        status: "processed".into(),
        payment: "captured".into(),
        provider: Some("captured".into()),
        authorisations: 1,
        captured_cents: order.total_cents,
        voids: 0,
        final_statuses: 1,
        events: 1,
    }
}

/// Authorised once, voided once, nothing captured.
fn voided() -> Money {
    Money {
        status: "rejected".into(),
        payment: "voided".into(),
        provider: Some("voided".into()),
        authorisations: 1,
        captured_cents: 0,
        voids: 1,
        final_statuses: 1,
        events: 1,
    }
}

/// The order's authorisation, asked of the provider directly.
async fn authorise_at_the_provider(processor: &Processor, order: &OrderPlaced) -> Answer {
    processor
        .payments
        .call(Call {
            operation: Operation::Authorise,
            charge: Charge {
                reference: order.order_id,
                customer_id: &order.customer_id,
                amount_cents: order.total_cents,
                currency: &order.currency,
            },
            idempotency_key: &Operation::Authorise.key(order.order_id),
        })
        .await
        .unwrap()
}

/// Steps from `authorising` to the end: authorise and decide, then capture
/// or void.
const STEPS: usize = 2;

#[tokio::test]
async fn a_crash_between_any_two_steps_is_finished_by_the_next_delivery() {
    let (_, pool) = test_support::fresh_database().await;
    let widgets = stock(&pool, "WIDGET").await;
    let (processor, provider) = processor_with(&pool, 1_000_000, false).await;
    for crashed_after in 0..STEPS {
        // In stock: captured. Short of stock: voided.
        let paid = accepted_order(&pool, &[("WIDGET", 2)]).await;
        let short = accepted_order(&pool, &[("WIDGET", 1), ("LIMITED-EDITION", 6)]).await;
        for order in [&paid, &short] {
            assert_eq!(processor.start(order).await.unwrap(), None);
            for _ in 0..crashed_after {
                assert_eq!(processor.step(order.order_id).await.unwrap(), None);
            }
            // The crash: nothing in memory survives; the broker redelivers.
            let handled = processor.handle(order).await.unwrap();
            assert!(
                matches!(handled, Handled::Decided { .. }),
                "after {crashed_after} steps: {handled:?}"
            );
            assert_eq!(
                processor.handle(order).await.unwrap(),
                Handled::Duplicate,
                "a later redelivery changes nothing"
            );
        }
        assert_eq!(
            money(&pool, &provider.books, &paid).await,
            captured(&paid),
            "crashed after {crashed_after} steps"
        );
        assert_eq!(
            money(&pool, &provider.books, &short).await,
            voided(),
            "crashed after {crashed_after} steps"
        );
        // The authorisation is recorded with its decision: one line each.
        assert_eq!(history(&pool, &paid).await, ["capturing", "captured"]);
        assert_eq!(history(&pool, &short).await, ["voiding", "voided"]);
    }
    let processed = i32::try_from(STEPS).unwrap();
    assert_eq!(
        stock(&pool, "WIDGET").await,
        widgets - 2 * processed,
        "reserved once per processed order"
    );
    assert_eq!(stock(&pool, "LIMITED-EDITION").await, 5);
}

#[tokio::test]
async fn a_payment_an_earlier_release_left_authorised_is_decided_then_captured() {
    let (_, pool) = test_support::fresh_database().await;
    let (processor, provider) = processor_with(&pool, 1_000_000, false).await;
    let order = accepted_order(&pool, &[("WIDGET", 1)]).await;
    assert_eq!(processor.start(&order).await.unwrap(), None);
    assert_eq!(
        authorise_at_the_provider(&processor, &order).await,
        Answer::Authorised
    );
    // Releases before this one recorded `authorised` on its own, and one
    // stopped there.
    sqlx::query!(
        "UPDATE payments SET state = 'authorised' WHERE order_id = $1",
        order.order_id,
    )
    .execute(&pool)
    .await
    .unwrap();
    let widgets = stock(&pool, "WIDGET").await;
    let handled = processor.handle(&order).await.unwrap();
    assert!(matches!(handled, Handled::Decided { .. }), "{handled:?}");
    assert_eq!(
        money(&pool, &provider.books, &order).await,
        captured(&order)
    );
    assert_eq!(stock(&pool, "WIDGET").await, widgets - 1);
    assert_eq!(history(&pool, &order).await, ["capturing", "captured"]);
}

#[tokio::test]
async fn a_provider_failing_or_timing_out_after_the_work_moves_the_money_once() {
    let (_, pool) = test_support::fresh_database().await;
    let (processor, provider) = processor_with(&pool, 1_000_000, true).await;
    // (customer, in stock?, what the provider's books hold after the first try)
    let cases = [
        ("timeout-authorise", true, Some("authorised")),
        ("timeout-capture", true, Some("captured")),
        ("timeout-void", false, Some("voided")),
        ("flaky-1", true, None),
        ("flaky-capture-1", true, Some("authorised")),
        ("flaky-void-1", false, Some("authorised")),
    ];
    for (customer, in_stock, after_first) in cases {
        let items: &[(&str, i32)] = if in_stock {
            &[("GADGET", 1)]
        } else {
            &[("LIMITED-EDITION", 6)]
        };
        let order = accepted_order_of(&pool, customer, items).await;
        let first = processor.handle(&order).await;
        assert!(first.is_err(), "{customer}: the first try fails: {first:?}");
        // The provider's database: a crate's statements are checked against
        // one database, orderflow's here.
        let at_provider: Option<String> =
            sqlx::query_scalar("SELECT state FROM provider_authorisations WHERE reference = $1")
                .bind(order.order_id)
                .fetch_optional(&provider.books)
                .await
                .unwrap();
        assert_eq!(at_provider.as_deref(), after_first, "{customer}");
        let status: String =
            sqlx::query_scalar!("SELECT status FROM orders WHERE id = $1", order.order_id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            status, "accepted",
            "{customer}: not final before the money is"
        );

        let second = processor.handle(&order).await.unwrap();
        assert!(
            matches!(second, Handled::Decided { .. }),
            "{customer}: {second:?}"
        );
        let expected = if in_stock { captured(&order) } else { voided() };
        assert_eq!(
            money(&pool, &provider.books, &order).await,
            expected,
            "{customer}"
        );
    }
}

#[tokio::test]
async fn a_declined_payment_holds_and_takes_nothing() {
    let (_, pool) = test_support::fresh_database().await;
    let (processor, provider) = processor_with(&pool, 100, false).await;
    let order = accepted_order(&pool, &[("WIDGET", 1)]).await;

    let handled = processor.handle(&order).await.unwrap();

    let Handled::Decided {
        outcome, payment, ..
    } = handled
    else {
        panic!("expected a decision, got {handled:?}");
    };
    assert_eq!(
        (outcome, payment),
        (
            Outcome::Rejected {
                reason: "payment_declined".into()
            },
            PaymentOutcome::Declined
        )
    );
    let money = money(&pool, &provider.books, &order).await;
    assert_eq!(
        (money.payment.as_str(), money.provider.as_deref()),
        ("declined", Some("declined"))
    );
    assert_eq!(
        (money.authorisations, money.captured_cents, money.voids),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn the_sweeper_settles_a_decided_payment_whose_message_is_gone() {
    let (_, pool) = test_support::fresh_database().await;
    let (processor, provider) = processor_with(&pool, 1_000_000, false).await;
    let paid = accepted_order(&pool, &[("WIDGET", 1)]).await;
    let short = accepted_order(&pool, &[("LIMITED-EDITION", 6)]).await;
    for order in [&paid, &short] {
        processor.start(order).await.unwrap();
        // Authorised and decided: capturing, or voiding.
        assert_eq!(processor.step(order.order_id).await.unwrap(), None);
    }
    let patient = Sweeper::new(
        processor.clone(),
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    );
    assert_eq!(patient.sweep().await.unwrap(), 0, "nothing is due yet");

    let sweeper = Sweeper::new(processor.clone(), Duration::ZERO, Duration::from_secs(3600));
    assert_eq!(sweeper.sweep().await.unwrap(), 2);

    assert_eq!(money(&pool, &provider.books, &paid).await, captured(&paid));
    assert_eq!(money(&pool, &provider.books, &short).await, voided());
    for order in [&paid, &short] {
        assert_eq!(processor.handle(order).await.unwrap(), Handled::Duplicate);
    }
    assert_eq!(sweeper.sweep().await.unwrap(), 0);
    assert_eq!(
        money(&pool, &provider.books, &paid).await,
        captured(&paid),
        "a late delivery moves nothing"
    );
}

#[tokio::test]
async fn the_sweeper_voids_an_authorisation_never_decided_and_a_late_one_is_refused() {
    let (_, pool) = test_support::fresh_database().await;
    let (processor, provider) = processor_with(&pool, 1_000_000, false).await;
    // Its processor died before calling the provider...
    let never_called = accepted_order(&pool, &[("WIDGET", 1)]).await;
    processor.start(&never_called).await.unwrap();
    // ... and this one's after the provider authorised, before it recorded
    // the authorisation.
    let authorised = accepted_order(&pool, &[("WIDGET", 1)]).await;
    processor.start(&authorised).await.unwrap();
    let held = authorise_at_the_provider(&processor, &authorised).await;
    assert_eq!(held, Answer::Authorised);
    let widgets = stock(&pool, "WIDGET").await;

    let sweeper = Sweeper::new(processor.clone(), Duration::from_secs(3600), Duration::ZERO);
    assert_eq!(sweeper.sweep().await.unwrap(), 2);

    assert_eq!(money(&pool, &provider.books, &authorised).await, voided());
    let never = money(&pool, &provider.books, &never_called).await;
    assert_eq!(
        (
            never.status.as_str(),
            never.payment.as_str(),
            never.provider.as_deref()
        ),
        ("rejected", "voided", Some("voided"))
    );
    assert_eq!((never.authorisations, never.captured_cents), (0, 0));
    let reason: String = sqlx::query_scalar!(
        "SELECT reason FROM orders WHERE id = $1",
        authorised.order_id
    )
    .fetch_one(&pool)
    .await
    .unwrap()
    .expect("a rejected order has a reason");
    assert_eq!(reason, "payment_abandoned");
    assert_eq!(stock(&pool, "WIDGET").await, widgets, "nothing reserved");

    // The dead processor's authorisation arriving now is refused: nothing
    // is left held.
    let late = authorise_at_the_provider(&processor, &never_called).await;
    assert!(matches!(late, Answer::Refused(_)), "{late:?}");
    assert_eq!(
        processor.handle(&never_called).await.unwrap(),
        Handled::Duplicate
    );
}

#[tokio::test]
async fn a_delivery_and_the_sweeper_meeting_on_one_payment_settle_it_once() {
    let (_, pool) = test_support::fresh_database().await;
    let (processor, provider) = processor_with(&pool, 1_000_000, false).await;
    let mut orders = Vec::new();
    for _ in 0..6 {
        let order = accepted_order(&pool, &[("GIZMO", 1)]).await;
        processor.start(&order).await.unwrap();
        // Decided: capturing.
        assert_eq!(processor.step(order.order_id).await.unwrap(), None);
        orders.push(order);
    }
    let sweeper = Sweeper::new(processor.clone(), Duration::ZERO, Duration::ZERO);

    let (deliveries, swept) = tokio::join!(
        futures_util::future::join_all(orders.iter().map(|order| processor.handle(order))),
        sweeper.sweep()
    );

    let delivered = deliveries
        .iter()
        .filter(|handled| matches!(handled, Ok(Handled::Decided { .. })))
        .count();
    assert_eq!(delivered + swept.unwrap(), orders.len(), "{deliveries:?}");
    for order in &orders {
        assert_eq!(money(&pool, &provider.books, order).await, captured(order));
    }
}

#[tokio::test]
async fn the_provider_does_each_request_once_and_refuses_a_second_capture() {
    let provider = provider(1_000_000, false).await;
    let client = provider.client();
    let reference = uuid::Uuid::new_v4();
    let charge = Charge {
        reference,
        customer_id: "c-1",
        amount_cents: 4950,
        currency: "EUR",
    };
    let call = |operation, idempotency_key: &'static str| {
        client.call(Call {
            operation,
            charge,
            idempotency_key,
        })
    };

    assert_eq!(
        call(Operation::Authorise, "a").await.unwrap(),
        Answer::Authorised
    );
    assert_eq!(
        call(Operation::Authorise, "a").await.unwrap(),
        Answer::Authorised
    );
    assert_eq!(
        call(Operation::Capture, "c").await.unwrap(),
        Answer::Captured
    );
    assert_eq!(
        call(Operation::Capture, "c").await.unwrap(),
        Answer::Captured
    );
    assert!(matches!(
        call(Operation::Capture, "c2").await.unwrap(),
        Answer::Refused(_)
    ));
    assert!(matches!(
        call(Operation::Void, "v").await.unwrap(),
        Answer::Refused(_)
    ));
    assert!(
        matches!(call(Operation::Void, "a").await.unwrap(), Answer::Refused(why) if why.contains("another request")),
        "a key names one request"
    );
    // The provider's database: a crate's statements are checked against one
    // database, orderflow's here.
    let (captures, captured): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(amount_cents), 0)::bigint FROM provider_ledger
         WHERE reference = $1 AND outcome = 'captured'",
    )
    .bind(reference)
    .fetch_one(&provider.books)
    .await
    .unwrap();
    assert_eq!((captures, captured), (1, 4950));
}
