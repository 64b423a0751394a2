use std::time::Duration;

use clap::Parser;
use messaging::{Topology, contracts::OrderPlaced};
use order_api::{auth::Scope, configuration::Settings, startup::Application};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub address: String,
    pub pool: PgPool,
    pub topology: Topology,
    pub amqp: lapin::Connection,
    /// Sends the key of client `test-client` on every request.
    pub client: reqwest::Client,
    /// That key.
    pub key: String,
    /// Sends an admin key.
    pub admin: reqwest::Client,
    shutdown: CancellationToken,
    _topology: test_support::TopologyGuard,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Settings for a private app: port 0, a fresh database, a unique prefix.
pub async fn test_settings() -> (Settings, PgPool) {
    test_support::init_tracing();
    let (database_url, pool) = test_support::fresh_database().await;
    let mut settings = Settings::parse_from(["order-api"]);
    settings.http_port = 0;
    settings.service.database.database_url = database_url;
    settings.service.database.db_max_connections = Some(5);
    settings.service.amqp.amqp_url = test_support::amqp_url();
    settings.service.amqp.topology_prefix = test_support::unique_prefix();
    settings.service.amqp.topology_queue_expires_ms = Some(test_support::QUEUE_EXPIRES_MS);
    (settings, pool)
}

pub async fn spawn_app() -> TestApp {
    let (settings, pool) = test_settings().await;
    spawn_with(settings, pool).await
}

pub async fn spawn_with(settings: Settings, pool: PgPool) -> TestApp {
    let topology = settings.service.amqp.topology();
    let topology_for_guard = topology.clone();
    let application = Application::build(settings)
        .await
        .expect("building the app");
    let address = format!("http://127.0.0.1:{}", application.port());
    let shutdown = CancellationToken::new();
    tokio::spawn(application.run_until_stopped(shutdown.clone()));
    let key = new_key(&pool, "test-client", Scope::Client).await;
    let admin = client_with(&new_key(&pool, "test-admin", Scope::Admin).await);
    TestApp {
        address,
        pool,
        topology,
        amqp: test_support::amqp().await,
        client: client_with(&key),
        key,
        admin,
        shutdown,
        _topology: test_support::TopologyGuard(topology_for_guard),
    }
}

/// A new key of `client` with `scope`.
pub async fn new_key(pool: &PgPool, client: &str, scope: Scope) -> String {
    order_api::auth::create_key(pool, client, scope, None)
        .await
        .expect("creating an API key")
        .key
}

/// An HTTP client that sends `key` as its bearer token.
pub fn client_with(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// A valid order body.
pub fn order_body() -> Value {
    json!({
        "customer_id": "c-42",
        "email": "ada@example.com",
        "items": [{"sku": "WIDGET", "quantity": 2}, {"sku": "GADGET", "quantity": 1}],
    })
}

impl TestApp {
    pub async fn post_order(&self, body: &Value, key: Option<&str>) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/orders", self.address))
            .json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.expect("POST /orders")
    }

    pub async fn post_raw(
        &self,
        body: impl Into<reqwest::Body>,
        content_type: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/orders", self.address))
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("Content-Type", content_type);
        }
        request.send().await.expect("POST /orders")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.get_as(&self.client, path).await
    }

    /// `GET path` sent by `client` (with its key, or none).
    pub async fn get_as(&self, client: &reqwest::Client, path: &str) -> reqwest::Response {
        client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .expect("GET")
    }

    /// A metric's value from `/metrics` (read with the admin key), by the
    /// start of its line: a name, with its labels if it has any.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self
            .get_as(&self.admin, "/metrics")
            .await
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// The next order published on `queue`.
    pub async fn next_placed(&self, queue: &str) -> (OrderPlaced, lapin::BasicProperties) {
        let delivery = test_support::next_message(&self.amqp, queue, Duration::from_secs(10)).await;
        (
            serde_json::from_slice(&delivery.data).unwrap(),
            delivery.properties,
        )
    }
}

pub(crate) use test_support::count;

/// Assert the JSON error shape and code; return the body.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "status for {code}");
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

/// Reads `event:`/`data:` pairs off an SSE response.
pub struct EventReader {
    response: reqwest::Response,
    buffer: String,
}

impl EventReader {
    pub async fn open(app: &TestApp, path: &str) -> Self {
        Self::open_with(app, &app.client, path).await
    }

    pub async fn open_with(app: &TestApp, client: &reqwest::Client, path: &str) -> Self {
        let response = app.get_as(client, path).await;
        assert_eq!(response.status().as_u16(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event's name and data, or `None` when the stream ended.
    pub async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = Some(value.trim().to_owned());
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data = serde_json::from_str(value.trim()).ok();
                    }
                }
                // Heartbeats are comments: no event name.
                if let (Some(name), Some(data)) = (name, data) {
                    return Some((name, data));
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("an event within 10 s")
                .expect("reading the stream")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}
