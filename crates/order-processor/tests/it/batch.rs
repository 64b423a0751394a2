//! Orders handled together: each decided exactly as it would be alone.

use messaging::contracts::{OrderPlaced, Outcome};
use order_processor::handler::{HandleError, Handled};
use uuid::Uuid;

use crate::helpers::{accepted_order, accepted_order_of, count, demo_processor, status, stock};

fn outcome(handled: &Result<Handled, HandleError>) -> String {
    match handled {
        Ok(Handled::Decided {
            outcome: Outcome::Processed,
            ..
        }) => "processed".into(),
        Ok(Handled::Decided {
            outcome: Outcome::Rejected { reason },
            ..
        }) => format!("rejected: {reason}"),
        Ok(Handled::Duplicate) => "duplicate".into(),
        Err(HandleError::Poison(_)) => "poison".into(),
        Err(HandleError::Transient(_)) => "transient".into(),
    }
}

#[tokio::test]
async fn a_batch_reserves_stock_order_by_order_and_sets_apart_only_the_orders_at_fault() {
    let (_, pool) = test_support::fresh_database().await;
    sqlx::query!("UPDATE inventory SET stock = 5 WHERE sku = 'WIDGET'")
        .execute(&pool)
        .await
        .unwrap();
    let gadgets = stock(&pool, "GADGET").await;
    let processor = demo_processor(&pool).await;
    let handled_before = accepted_order(&pool, &[("GIZMO", 1)]).await;
    processor.handle(&handled_before).await.unwrap();

    let first = accepted_order(&pool, &[("WIDGET", 3)]).await;
    // Two left: this one is short, and takes none of its lines.
    let short = accepted_order(&pool, &[("GADGET", 1), ("WIDGET", 3)]).await;
    let last_widgets = accepted_order(&pool, &[("WIDGET", 1), ("GADGET", 2), ("WIDGET", 1)]).await;
    let declined = accepted_order(&pool, &[("GIZMO", 501)]).await;
    let flaky = accepted_order_of(&pool, "flaky-1", &[("GADGET", 1)]).await;
    let missing = OrderPlaced {
        order_id: Uuid::new_v4(),
        message_id: Uuid::new_v4(),
        ..first.clone()
    };
    let batch: Vec<(OrderPlaced, tracing::Span)> = [
        &first,
        &short,
        &last_widgets,
        &declined,
        &flaky,
        &missing,
        &handled_before,
    ]
    .into_iter()
    .map(|order| (order.clone(), tracing::Span::none()))
    .collect();

    let handled = processor.handle_all(&batch).await.unwrap();

    let outcomes: Vec<String> = handled.iter().map(outcome).collect();
    assert_eq!(
        outcomes,
        [
            "processed",
            "rejected: out_of_stock: WIDGET",
            "processed",
            "rejected: payment_declined",
            "transient",
            "poison",
            "duplicate",
        ]
    );
    assert_eq!(stock(&pool, "WIDGET").await, 0);
    assert_eq!(stock(&pool, "GADGET").await, gadgets - 2);
    assert_eq!(status(&pool, flaky.order_id).await.0, "accepted");
    // One event, one decision line and one record per decided order.
    assert_eq!(
        count!(&pool, r#"SELECT count(*) AS "n!" FROM outbox"#),
        1 + 4
    );
    assert_eq!(
        count!(
            &pool,
            r#"SELECT count(*) AS "n!" FROM order_status_history WHERE service = 'order-processor'"#
        ),
        1 + 4
    );
    assert_eq!(
        count!(&pool, r#"SELECT count(*) AS "n!" FROM processed_messages"#),
        1 + 4
    );

    // The transient failure's retry finishes it, alone.
    assert_eq!(outcome(&processor.handle(&flaky).await), "processed");
    assert_eq!(stock(&pool, "GADGET").await, gadgets - 3);
    // The whole batch again, as a redelivery: nothing changes.
    let again = processor.handle_all(&batch).await.unwrap();
    let outcomes: Vec<String> = again.iter().map(outcome).collect();
    assert_eq!(
        outcomes,
        [
            "duplicate",
            "duplicate",
            "duplicate",
            "duplicate",
            "duplicate",
            "poison",
            "duplicate"
        ]
    );
    assert_eq!(stock(&pool, "WIDGET").await, 0);
    assert_eq!(
        count!(&pool, r#"SELECT count(*) AS "n!" FROM outbox"#),
        1 + 5
    );
}

#[tokio::test]
async fn concurrent_batches_over_the_same_stock_neither_deadlock_nor_oversell() {
    let (_, pool) = test_support::fresh_database().await;
    sqlx::query!("UPDATE inventory SET stock = 30 WHERE sku IN ('WIDGET', 'GADGET')")
        .execute(&pool)
        .await
        .unwrap();
    let processor = demo_processor(&pool).await;
    let mut batches: Vec<Vec<(OrderPlaced, tracing::Span)>> = vec![Vec::new(), Vec::new()];
    for i in 0..20 {
        // Lines in both orders, so only the SKU order of the locks saves them.
        let lines: &[(&str, i32)] = if i % 2 == 0 {
            &[("WIDGET", 1), ("GADGET", 2)]
        } else {
            &[("GADGET", 2), ("WIDGET", 1)]
        };
        let order = accepted_order(&pool, lines).await;
        batches[i % 2].push((order, tracing::Span::none()));
    }

    let (left, right) = tokio::join!(
        processor.handle_all(&batches[0]),
        processor.handle_all(&batches[1])
    );

    let outcomes: Vec<String> = left
        .unwrap()
        .iter()
        .chain(right.unwrap().iter())
        .map(outcome)
        .collect();
    let processed = outcomes.iter().filter(|o| *o == "processed").count();
    // 30 gadgets, two per order: fifteen orders get theirs.
    assert_eq!(processed, 15, "{outcomes:?}");
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| *o == "rejected: out_of_stock: GADGET")
            .count(),
        5,
        "{outcomes:?}"
    );
    assert_eq!(stock(&pool, "GADGET").await, 0);
    assert_eq!(stock(&pool, "WIDGET").await, 30 - 15);
}
