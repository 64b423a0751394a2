//! No personal data and no secrets in any service's log: one whole order
//! with an email, a shipping address and a callback URL carrying a token,
//! through every real binary, with every secret set; then each service's
//! log output is searched for each of them.

use std::{sync::Arc, time::Duration};

use axum::{Router, routing::post};
use clap::Parser;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::processes::{Stack, api_key, keyed_client};

const EMAIL: &str = "grace.hopper@navy.example";
const NAME: &str = "Grace Brewster Hopper";
const STREET: &str = "1 Compiler Lane";
const WEBHOOK_SECRET: &str = "whsec-privacy-3c1b9e";
const DB_PASSWORD: &str = "db-pa55-privacy-7a2d";
const HOOK_PATH: &str = "/hooks/p4th-s3cret";
const HOOK_TOKEN: &str = "tok-9f8e7d6c";

/// A webhook receiver on loopback that counts what it got.
async fn receiver() -> (u16, Arc<Mutex<Vec<Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    let app = Router::new().route(
        HOOK_PATH,
        post(move |body: axum::Json<Value>| {
            let seen = seen.clone();
            async move {
                seen.lock().await.push(body.0);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, got)
}

#[tokio::test]
async fn no_service_logs_personal_data_or_secrets_through_a_whole_order() {
    let (port, hooks) = receiver().await;
    let (database_url, pool) = test_support::fresh_database().await;
    // Postgres trusts local connections here, so a password in the URL is
    // sent nowhere: it is only there to be looked for in the logs.
    let with_password = database_url.replacen("postgres@", &format!("postgres:{DB_PASSWORD}@"), 1);
    assert_ne!(with_password, database_url, "{database_url}");
    let stack = Stack::start_on(
        with_password,
        pool,
        &[
            ("WEBHOOK_SECRET", WEBHOOK_SECRET.into()),
            // The receiver is on loopback: let webhooks reach it, as a developer would.
            ("WEBHOOK_ALLOWED_HOSTS", "127.0.0.1".into()),
        ],
    )
    .await;
    let key = api_key(&stack.database_url, "privacy-shop", "client");
    let client = keyed_client(&key, Duration::from_secs(60));
    let callback = format!("http://127.0.0.1:{port}{HOOK_PATH}?token={HOOK_TOKEN}");
    let response = client
        .post(stack.api.url("/orders"))
        .header("Idempotency-Key", "privacy-1")
        .json(&json!({
            "customer_id": "c-privacy",
            "email": EMAIL,
            "items": [{"sku": "WIDGET", "quantity": 1}],
            "callback_url": callback,
            "shipping": {"name": NAME, "address": STREET, "city": "Arlington",
                         "postal_code": "22201", "country": "US"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let order: Value = response.json().await.unwrap();
    let id = order["id"].as_str().unwrap().to_owned();

    // The whole story: decided, emailed, audited, and the webhook delivered.
    test_support::eventually(Duration::from_secs(120), "the webhook", || async {
        (!hooks.lock().await.is_empty()).then_some(())
    })
    .await;
    test_support::eventually(Duration::from_secs(60), "the audit record", || async {
        let audited: i64 = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM audit_log"#)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
        (audited > 0).then_some(())
    })
    .await;
    let view = client
        .get(stack.api.url(&format!("/orders/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(view.status().as_u16(), 200);

    let logs = stack.logs();
    let telling: Vec<&str> = logs
        .iter()
        .filter(|(_, log)| log.contains(&id))
        .map(|(service, _)| service.as_str())
        .collect();
    // order-api, the payment provider, the processor that took it, and
    // both subscribers.
    assert_eq!(
        telling.len(),
        5,
        "the logs that tell the order's story: {telling:?}"
    );
    for (service, log) in &logs {
        for (what, text) in [
            ("the email address", EMAIL),
            ("the email's local part", "grace.hopper"),
            ("the shipping name", NAME),
            ("the shipping address", STREET),
            ("the callback's path", HOOK_PATH),
            ("the callback's token", HOOK_TOKEN),
            ("the webhook secret", WEBHOOK_SECRET),
            ("the database password", DB_PASSWORD),
            ("the API key", key.as_str()),
        ] {
            assert!(!log.contains(text), "{service} logged {what} ({text})");
        }
    }
    let notifications = &logs
        .iter()
        .find(|(service, _)| service == "notification-service")
        .unwrap()
        .1;
    assert!(
        notifications.contains("g***@navy.example"),
        "the email shows masked:\n{notifications}"
    );
}

/// Every settings type prints its URLs without passwords and no secret.
#[test]
fn no_settings_type_shows_a_secret_in_debug_output() {
    let common = [
        "--database-url",
        "postgres://orderflow:dbsecret-1@db:5432/orderflow",
        "--amqp-url",
        "amqp://orderflow:amqpsecret-2@rabbitmq:5672/%2f",
        "--rabbitmq-management-url",
        "http://orderflow:mgmtsecret-3@rabbitmq:15672",
    ];
    let with = |binary: &'static str, more: &[&'static str]| {
        std::iter::once(binary)
            .chain(common)
            .chain(more.iter().copied())
            .collect::<Vec<_>>()
    };
    let notification = notification_service::configuration::Settings::parse_from(with(
        "notification-service",
        &["--webhook-secret", "whsecret-4"],
    ));
    let printed = [
        format!(
            "{:?}",
            order_api::configuration::Settings::parse_from(with("order-api", &[]))
        ),
        format!(
            "{:?}",
            order_processor::configuration::Settings::parse_from(with(
                "order-processor",
                &["--payment-provider-key", "provkey-5"]
            ))
        ),
        format!(
            "{:?}",
            payment_provider::configuration::Settings::parse_from([
                "payment-provider",
                "--database-url",
                "postgres://orderflow:dbsecret-1@db:5432/payment_provider",
                "--api-key",
                "provkey-5",
            ])
        ),
        format!("{notification:?}"),
        format!("{:?}", notification.webhook_policy()),
        format!(
            "{:?}",
            logging_service::configuration::Settings::parse_from(with("logging-service", &[]))
        ),
    ];
    for text in printed {
        for secret in [
            "dbsecret-1",
            "amqpsecret-2",
            "mgmtsecret-3",
            "whsecret-4",
            "provkey-5",
        ] {
            assert!(!text.contains(secret), "{secret} shows in {text}");
        }
        assert!(
            text.contains("rabbitmq") || text.contains("Secret(***)") || text.contains("@db:5432"),
            "what is not secret still shows: {text}"
        );
    }
}
