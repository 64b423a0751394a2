use std::time::Duration;

use chrono::Utc;
use messaging::{
    Topology,
    contracts::{Lane, OrderLine, OrderPlaced, SCHEMA_VERSION},
};
use order_processor::{handler::Processor, payment::PaymentProvider};
use sqlx::PgPool;
use uuid::Uuid;

pub fn processor(pool: &PgPool) -> Processor {
    Processor {
        pool: pool.clone(),
        topology: Topology::new("unused"),
        payments: PaymentProvider::new(pool.clone(), Duration::ZERO, 1_000_000),
        instance_id: "test-processor".into(),
    }
}

/// A processor whose provider honours the demo customers' failures.
pub fn demo_processor(pool: &PgPool) -> Processor {
    let mut processor = processor(pool);
    processor.payments =
        PaymentProvider::new(pool.clone(), Duration::ZERO, 1_000_000).with_demo_failures(true);
    processor
}

/// An accepted order in the database and the message announcing it.
pub async fn accepted_order(pool: &PgPool, items: &[(&str, i32)]) -> OrderPlaced {
    accepted_order_of(pool, "c-1", items).await
}

/// An accepted order placed by `customer_id` (a demo customer makes the
/// payment provider fail on request).
pub async fn accepted_order_of(
    pool: &PgPool,
    customer_id: &str,
    items: &[(&str, i32)],
) -> OrderPlaced {
    let items: Vec<OrderLine> = items
        .iter()
        .map(|(sku, quantity)| OrderLine {
            sku: (*sku).into(),
            quantity: *quantity,
        })
        .collect();
    let order = OrderPlaced {
        schema_version: SCHEMA_VERSION,
        message_id: Uuid::new_v4(),
        occurred_at: Utc::now(),
        order_id: Uuid::new_v4(),
        customer_id: customer_id.into(),
        email: "ada@example.com".into(),
        total_cents: 1999 * i64::from(items.iter().map(|l| l.quantity).sum::<i32>()),
        currency: "EUR".into(),
        lane: Lane::Standard,
        callback_url: None,
        items,
    };
    sqlx::query(
        "INSERT INTO orders (id, customer_id, email, items, total_cents, currency, lane, status, correlation_id)
         VALUES ($1, $2, $3, $4, $5, $6, 'standard', 'accepted', 'corr-1')",
    )
    .bind(order.order_id)
    .bind(&order.customer_id)
    .bind(&order.email)
    .bind(serde_json::to_value(&order.items).unwrap())
    .bind(order.total_cents)
    .bind(&order.currency)
    .execute(pool)
    .await
    .unwrap();
    order
}

pub async fn stock(pool: &PgPool, sku: &str) -> i32 {
    sqlx::query_scalar("SELECT stock FROM inventory WHERE sku = $1")
        .bind(sku)
        .fetch_one(pool)
        .await
        .unwrap()
}

pub async fn status(pool: &PgPool, order_id: Uuid) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, reason FROM orders WHERE id = $1")
        .bind(order_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}
