use std::sync::Arc;

use chrono::Utc;
use messaging::{
    Topology,
    contracts::{Lane, OrderLine, OrderPlaced, SCHEMA_VERSION},
};
use order_processor::{
    handler::Processor,
    payment::{
        PaymentProvider,
        http::{HttpProvider, ProviderSettings},
    },
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A stand-in payment provider (the `payment-provider` service, in this
/// process) serving on a free port, its books in a fresh database of its own.
pub struct Provider {
    pub url: String,
    /// The provider's books.
    pub books: PgPool,
}

/// Start a provider that declines above `decline_over_cents` and, with
/// `demo_failures`, fails as demo customers ask. An injected timeout holds
/// its answer 1.5 s: longer than [`PAYMENT_TIMEOUT_MS`].
pub async fn provider(decline_over_cents: i64, demo_failures: bool) -> Provider {
    use clap::Parser;
    let database_url = test_support::empty_database().await;
    let mut settings = payment_provider::configuration::Settings::parse_from(["payment-provider"]);
    settings.database_url = database_url.clone();
    settings.db_max_connections = 5;
    settings.http_port = 0;
    settings.latency_ms = 0;
    settings.decline_over_cents = decline_over_cents;
    settings.demo_failures = demo_failures;
    settings.slow_answer_ms = 1500;
    let application = payment_provider::startup::Application::build(settings)
        .await
        .expect("the payment provider starts");
    let url = format!("http://127.0.0.1:{}", application.port());
    // Serves until the test's runtime ends.
    tokio::spawn(application.run_until_stopped(CancellationToken::new()));
    Provider {
        url,
        books: PgPool::connect(&database_url).await.unwrap(),
    }
}

/// How long the processors of these tests wait for the provider, in ms.
pub const PAYMENT_TIMEOUT_MS: u64 = 300;

impl Provider {
    /// The settings that reach this provider.
    pub fn settings(&self) -> ProviderSettings {
        ProviderSettings {
            payment_provider_url: self.url.parse().unwrap(),
            payment_provider_key: None,
            payment_timeout_ms: PAYMENT_TIMEOUT_MS,
            payment_concurrency: 16,
        }
    }

    /// A client of this provider.
    pub fn client(&self) -> Arc<dyn PaymentProvider> {
        Arc::new(HttpProvider::new(&self.settings()).unwrap())
    }
}

/// A processor on `pool` and a provider of its own.
pub async fn processor(pool: &PgPool) -> Processor {
    processor_with(pool, 1_000_000, false).await.0
}

/// A processor whose provider honours the demo customers' failures.
pub async fn demo_processor(pool: &PgPool) -> Processor {
    processor_with(pool, 1_000_000, true).await.0
}

/// A processor on `pool` and its provider (see [`provider`]).
pub async fn processor_with(
    pool: &PgPool,
    decline_over_cents: i64,
    demo_failures: bool,
) -> (Processor, Provider) {
    let provider = provider(decline_over_cents, demo_failures).await;
    let processor = Processor {
        pool: pool.clone(),
        topology: Topology::new("unused"),
        event_bus: Default::default(),
        payments: provider.client(),
        instance_id: "test-processor".into(),
    };
    (processor, provider)
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
    sqlx::query!(
        "INSERT INTO orders (id, customer_id, email, items, total_cents, currency, lane, status, correlation_id)
         VALUES ($1, $2, $3, $4, $5, $6, 'standard', 'accepted', 'corr-1')",
        order.order_id,
        order.customer_id,
        order.email,
        serde_json::to_value(&order.items).unwrap(),
        order.total_cents,
        order.currency,
    )
    .execute(pool)
    .await
    .unwrap();
    order
}

pub async fn stock(pool: &PgPool, sku: &str) -> i32 {
    sqlx::query_scalar!("SELECT stock FROM inventory WHERE sku = $1", sku)
        .fetch_one(pool)
        .await
        .unwrap()
}

pub async fn status(pool: &PgPool, order_id: Uuid) -> (String, Option<String>) {
    let row = sqlx::query!("SELECT status, reason FROM orders WHERE id = $1", order_id)
        .fetch_one(pool)
        .await
        .unwrap();
    (row.status, row.reason)
}

pub(crate) use test_support::count;
