//! The handler, driven directly for deterministic cases.

use messaging::contracts::Outcome;
use order_processor::handler::{HandleError, Handled, decode};

use crate::helpers::{accepted_order, count, processor, processor_with, status, stock};

#[tokio::test]
async fn an_order_is_processed_stock_reserved_and_its_event_queued() {
    let (_, pool) = test_support::fresh_database().await;
    let before = stock(&pool, "WIDGET").await;
    let order = accepted_order(&pool, &[("WIDGET", 3)]).await;

    let handled = processor(&pool).await.handle(&order).await.unwrap();

    assert!(matches!(
        handled,
        Handled::Decided {
            outcome: Outcome::Processed,
            ..
        }
    ));
    assert_eq!(stock(&pool, "WIDGET").await, before - 3);
    assert_eq!(status(&pool, order.order_id).await.0, "processed");
    let row = sqlx::query!(r#"SELECT payload->>'type' AS "kind!", correlation_id FROM outbox"#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(row.kind, "order.processed");
    assert_eq!(row.correlation_id, "corr-1");
    assert_eq!(
        count!(
            &pool,
            r#"SELECT count(*) AS "n!" FROM order_status_history WHERE status = 'processed'"#
        ),
        1
    );
}

#[tokio::test]
async fn a_redelivered_message_has_its_effect_once() {
    let (_, pool) = test_support::fresh_database().await;
    let before = stock(&pool, "WIDGET").await;
    let order = accepted_order(&pool, &[("WIDGET", 2)]).await;
    let processor = processor(&pool).await;

    processor.handle(&order).await.unwrap();
    let again = processor.handle(&order).await.unwrap();

    assert_eq!(again, Handled::Duplicate);
    assert_eq!(stock(&pool, "WIDGET").await, before - 2);
    assert_eq!(count!(&pool, r#"SELECT count(*) AS "n!" FROM outbox"#), 1);
}

#[tokio::test]
async fn concurrent_deliveries_of_one_message_have_their_effect_once() {
    let (_, pool) = test_support::fresh_database().await;
    let before = stock(&pool, "WIDGET").await;
    let order = accepted_order(&pool, &[("WIDGET", 1)]).await;
    let processor = processor(&pool).await;

    let results = futures_util::future::join_all((0..5).map(|_| processor.handle(&order))).await;

    let decided = results
        .iter()
        .filter(|r| matches!(r, Ok(Handled::Decided { .. })))
        .count();
    assert_eq!(decided, 1, "{results:?}");
    assert_eq!(stock(&pool, "WIDGET").await, before - 1);
}

#[tokio::test]
async fn short_stock_rejects_the_order_and_reserves_nothing() {
    let (_, pool) = test_support::fresh_database().await;
    let widgets = stock(&pool, "WIDGET").await;
    // WIDGET is fine, LIMITED-EDITION (5 in stock) is not: all or nothing.
    let order = accepted_order(&pool, &[("WIDGET", 1), ("LIMITED-EDITION", 6)]).await;

    let handled = processor(&pool).await.handle(&order).await.unwrap();

    let Handled::Decided {
        outcome: Outcome::Rejected { reason },
        ..
    } = handled
    else {
        panic!("expected a rejection, got {handled:?}");
    };
    assert_eq!(reason, "out_of_stock: LIMITED-EDITION");
    assert_eq!(stock(&pool, "LIMITED-EDITION").await, 5);
    assert_eq!(stock(&pool, "WIDGET").await, widgets);
    assert_eq!(
        status(&pool, order.order_id).await,
        ("rejected".into(), Some(reason))
    );
}

#[tokio::test]
async fn racing_processors_never_oversell() {
    let (_, pool) = test_support::fresh_database().await;
    let mut orders = Vec::new();
    for _ in 0..20 {
        orders.push(accepted_order(&pool, &[("LIMITED-EDITION", 1)]).await);
    }
    let one = processor(&pool).await;
    let processors: Vec<_> = (0..4).map(|_| one.clone()).collect();

    let results = futures_util::future::join_all(
        orders
            .iter()
            .enumerate()
            .map(|(i, order)| processors[i % 4].handle(order)),
    )
    .await;

    let processed = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Ok(Handled::Decided {
                    outcome: Outcome::Processed,
                    ..
                })
            )
        })
        .count();
    assert_eq!(processed, 5, "exactly the stock was sold");
    assert_eq!(stock(&pool, "LIMITED-EDITION").await, 0);
    assert_eq!(
        count!(
            &pool,
            r#"SELECT count(*) AS "n!" FROM orders WHERE status = 'rejected'"#
        ),
        15
    );
}

#[tokio::test]
async fn payment_above_the_limit_is_declined_and_reserves_nothing() {
    let (_, pool) = test_support::fresh_database().await;
    let before = stock(&pool, "WIDGET").await;
    let order = accepted_order(&pool, &[("WIDGET", 10)]).await;
    let (processor, _provider) = processor_with(&pool, 100, false).await;

    processor.handle(&order).await.unwrap();

    assert_eq!(
        status(&pool, order.order_id).await,
        ("rejected".into(), Some("payment_declined".into()))
    );
    assert_eq!(stock(&pool, "WIDGET").await, before);
}

#[tokio::test]
async fn messages_that_can_never_succeed_are_poison() {
    assert!(matches!(decode(b"{not json"), Err(HandleError::Poison(_))));
    assert!(matches!(
        decode(br#"{"order_id": 1}"#),
        Err(HandleError::Poison(_))
    ));

    let (_, pool) = test_support::fresh_database().await;
    let mut order = accepted_order(&pool, &[("WIDGET", 1)]).await;
    let mut body = serde_json::to_value(&order).unwrap();
    body["schema_version"] = 99.into();
    assert!(matches!(
        decode(&serde_json::to_vec(&body).unwrap()),
        Err(HandleError::Poison(reason)) if reason.contains("schema version 99")
    ));

    order.order_id = uuid::Uuid::new_v4();
    let unknown = processor(&pool).await.handle(&order).await;
    assert!(
        matches!(unknown, Err(HandleError::Poison(_))),
        "{unknown:?}"
    );
    assert_eq!(
        count!(&pool, r#"SELECT count(*) AS "n!" FROM processed_messages"#),
        0
    );
}

#[tokio::test]
async fn a_held_order_whose_message_comes_back_is_processed_once() {
    let (_, pool) = test_support::fresh_database().await;
    let order = accepted_order(&pool, &[("WIDGET", 1)]).await;
    let processor = processor(&pool).await;
    // Its payment started, then its message was dead-lettered.
    assert!(processor.start(&order).await.unwrap().is_none());
    assert!(processor.hold(order.order_id, "gave up").await.unwrap());
    assert!(
        processor.hold(order.order_id, "again").await.unwrap(),
        "held already: still held, with its first reason"
    );
    assert_eq!(
        status(&pool, order.order_id).await,
        ("held".to_owned(), Some("gave up".to_owned()))
    );

    // Replayed: taken up where it stood.
    let handled = processor.handle(&order).await.unwrap();
    assert!(matches!(
        handled,
        Handled::Decided {
            outcome: Outcome::Processed,
            ..
        }
    ));
    assert_eq!(
        status(&pool, order.order_id).await,
        ("processed".to_owned(), None)
    );
    assert!(
        !processor.hold(order.order_id, "late").await.unwrap(),
        "a final order is never held"
    );
    assert!(matches!(
        processor.handle(&order).await.unwrap(),
        Handled::Duplicate
    ));
}
