//! The stand-in payment provider over real HTTP, on a real Postgres.

use std::time::Duration;

use clap::Parser;
use payment_provider::{configuration::Settings, startup::Application};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const KEY: &str = "provider-test-key";

struct Running {
    base: String,
    client: Client,
    pool: PgPool,
    _stop: tokio_util::sync::DropGuard,
}

/// A provider on a fresh database with demo failures on, an API key, and
/// answers held 300 ms by an injected timeout.
async fn start() -> Running {
    test_support::init_tracing();
    let database_url = test_support::empty_database().await;
    let mut settings = Settings::parse_from(["payment-provider"]);
    settings.database_url = database_url.clone();
    settings.http_port = 0;
    settings.latency_ms = 0;
    settings.demo_failures = true;
    settings.decline_over_cents = 100_000;
    settings.slow_answer_ms = 300;
    settings.api_key = Some(KEY.into());
    let application = Application::build(settings).await.expect("provider starts");
    let base = format!("http://127.0.0.1:{}", application.port());
    let stop = CancellationToken::new();
    tokio::spawn(application.run_until_stopped(stop.clone()));
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {KEY}").parse().unwrap(),
    );
    Running {
        base,
        client: Client::builder().default_headers(headers).build().unwrap(),
        pool: PgPool::connect(&database_url).await.unwrap(),
        _stop: stop.drop_guard(),
    }
}

impl Running {
    async fn post(&self, path: &str, key: &str, body: Value) -> (StatusCode, bool, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let replayed = response.headers().get("idempotent-replayed").is_some();
        (status, replayed, response.json().await.unwrap())
    }

    async fn authorise(
        &self,
        key: &str,
        reference: Uuid,
        cents: i64,
        customer: &str,
    ) -> (StatusCode, bool, Value) {
        self.post(
            "/v1/authorisations",
            key,
            json!({ "reference": reference, "amount_cents": cents, "currency": "EUR", "customer_id": customer }),
        )
        .await
    }

    async fn state(&self, reference: Uuid) -> String {
        let read: Value = self
            .client
            .get(format!("{}/v1/authorisations/{reference}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        read["state"].as_str().unwrap_or_default().to_owned()
    }
}

#[tokio::test]
async fn an_authorisation_is_captured_once_and_a_retry_gets_the_first_answer() {
    let provider = start().await;
    let reference = Uuid::new_v4();
    let (status, replayed, body) = provider.authorise("a-1", reference, 2500, "c-1").await;
    assert_eq!((status, replayed), (StatusCode::OK, false), "{body}");
    assert_eq!(body["outcome"], "authorised");
    assert_eq!(provider.state(reference).await, "authorised");

    let capture = format!("/v1/authorisations/{reference}/capture");
    let (status, _, body) = provider.post(&capture, "c-1", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["outcome"].as_str(), body["amount_cents"].as_i64()),
        (Some("captured"), Some(2500))
    );
    let (status, replayed, again) = provider.post(&capture, "c-1", json!({})).await;
    assert_eq!((status, replayed), (StatusCode::OK, true));
    assert_eq!(again, body, "a retry gets the first answer");

    // Another key cannot capture (or void) it again.
    let (status, _, refused) = provider.post(&capture, "c-2", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refused["error"]["code"], "unexpected_state");
    let void = format!("/v1/authorisations/{reference}/void");
    assert_eq!(
        provider.post(&void, "v-1", json!({})).await.0,
        StatusCode::BAD_REQUEST
    );
    let captured: i64 = sqlx::query_scalar!(
        r#"SELECT coalesce(sum(amount_cents), 0)::bigint AS "captured!"
           FROM provider_ledger WHERE outcome = 'captured'"#,
    )
    .fetch_one(&provider.pool)
    .await
    .unwrap();
    assert_eq!(captured, 2500, "captured once");
    assert_eq!(provider.state(reference).await, "captured");
}

#[tokio::test]
async fn a_key_reused_for_another_request_is_refused_and_a_second_authorisation_too() {
    let provider = start().await;
    let reference = Uuid::new_v4();
    provider.authorise("k", reference, 100, "c").await;
    let (status, _, body) = provider.authorise("k", reference, 999, "c").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
    let (status, _, body) = provider.authorise("k2", reference, 100, "c").await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "one authorisation per reference: {body}"
    );
    let (_, _, declined) = provider
        .authorise("big", Uuid::new_v4(), 100_001, "c")
        .await;
    assert_eq!(declined["outcome"], "declined");
}

#[tokio::test]
async fn a_void_before_the_authorisation_leaves_nothing_to_authorise_later() {
    let provider = start().await;
    let reference = Uuid::new_v4();
    let (status, _, body) = provider
        .post(
            &format!("/v1/authorisations/{reference}/void"),
            "v",
            json!({}),
        )
        .await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (StatusCode::OK, Some("voided"))
    );
    let (status, _, _) = provider.authorise("late", reference, 100, "c").await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a late authorisation is refused"
    );
    assert_eq!(provider.state(reference).await, "voided");
}

#[tokio::test]
async fn injected_failures_do_nothing_and_an_injected_timeout_does_the_work_then_answers_late() {
    let provider = start().await;
    let reference = Uuid::new_v4();
    for _ in 0..2 {
        let (status, _, body) = provider.authorise("f", reference, 100, "flaky-2").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(provider.state(reference).await, "", "nothing done");
    }
    assert_eq!(
        provider.authorise("f", reference, 100, "flaky-2").await.2["outcome"],
        "authorised"
    );

    let capture = format!("/v1/authorisations/{reference}/capture");
    let impatient = provider
        .client
        .post(format!("{}{capture}", provider.base))
        .header("Idempotency-Key", "t")
        .json(&json!({ "customer_id": "timeout-capture" }))
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(
        impatient.is_err_and(|e| e.is_timeout()),
        "the answer comes too late"
    );
    test_support::eventually(
        Duration::from_secs(10),
        "the capture done though unanswered",
        || async { (provider.state(reference).await == "captured").then_some(()) },
    )
    .await;
    let (status, replayed, body) = provider
        .post(&capture, "t", json!({ "customer_id": "timeout-capture" }))
        .await;
    assert_eq!(
        (status, replayed, body["outcome"].as_str()),
        (StatusCode::OK, true, Some("captured"))
    );
}

#[tokio::test]
async fn a_caller_without_the_key_or_the_idempotency_key_is_refused() {
    let provider = start().await;
    let anonymous = Client::new()
        .post(format!("{}/v1/authorisations", provider.base))
        .header("Idempotency-Key", "x")
        .json(&json!({ "reference": Uuid::new_v4(), "amount_cents": 1, "currency": "EUR" }))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let stolen = Client::new()
        .get(format!(
            "{}/v1/authorisations/{}",
            provider.base,
            Uuid::new_v4()
        ))
        .bearer_auth("guessed")
        .send()
        .await
        .unwrap();
    assert_eq!(stolen.status(), StatusCode::UNAUTHORIZED);
    let keyless = provider
        .client
        .post(format!("{}/v1/authorisations", provider.base))
        .json(&json!({ "reference": Uuid::new_v4(), "amount_cents": 1, "currency": "EUR" }))
        .send()
        .await
        .unwrap();
    assert_eq!(keyless.status(), StatusCode::BAD_REQUEST);
    for bad in [
        json!({ "reference": "nope", "amount_cents": 1, "currency": "EUR" }),
        json!({ "reference": Uuid::new_v4(), "amount_cents": -1, "currency": "EUR" }),
        json!({ "reference": Uuid::new_v4(), "amount_cents": 1, "currency": "euro" }),
        json!({ "reference": Uuid::new_v4(), "amount_cents": 1, "currency": "EUR", "extra": 1 }),
    ] {
        let (status, _, body) = provider
            .post("/v1/authorisations", "bad", bad.clone())
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(body["error"]["code"], "invalid_request", "{bad}");
    }
    let ready = Client::new()
        .get(format!("{}/readyz", provider.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK, "health needs no key");
}

#[tokio::test]
async fn a_void_racing_an_authorisation_never_leaves_the_hold_open() {
    let provider = start().await;
    let references: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    let races = references.iter().map(|reference| {
        let provider = &provider;
        async move {
            let (authorise_key, void_key) = (
                format!("{reference}:authorise"),
                format!("{reference}:void"),
            );
            let void = format!("/v1/authorisations/{reference}/void");
            tokio::join!(
                provider.authorise(&authorise_key, *reference, 100, "c"),
                provider.post(&void, &void_key, json!({})),
            )
        }
    });
    for ((authorised, voided), reference) in futures_util::future::join_all(races)
        .await
        .into_iter()
        .zip(&references)
    {
        // Whichever came first, the void wins: the hold is released, or
        // never made.
        assert_eq!(
            voided.0,
            StatusCode::OK,
            "{reference}: the void is done: {}",
            voided.2
        );
        assert_eq!(
            provider.state(*reference).await,
            "voided",
            "{reference}: {authorised:?}"
        );
    }
}

#[tokio::test]
async fn a_key_at_work_is_told_so_and_the_same_key_later_gets_the_answer() {
    let provider = start().await;
    let reference = Uuid::new_v4();
    // Another request holding the key: its lock, as the provider takes it.
    let mut other = provider.pool.acquire().await.unwrap();
    sqlx::query!("SELECT pg_advisory_lock(hashtextextended('busy', 0))")
        .execute(&mut *other)
        .await
        .unwrap();
    let (status, _, body) = provider.authorise("busy", reference, 100, "c").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_key_in_use");
    assert_eq!(provider.state(reference).await, "", "nothing done");
    sqlx::query_scalar!("SELECT pg_advisory_unlock(hashtextextended('busy', 0))")
        .fetch_one(&mut *other)
        .await
        .unwrap();
    let (status, replayed, body) = provider.authorise("busy", reference, 100, "c").await;
    assert_eq!(
        (status, replayed, body["outcome"].as_str()),
        (StatusCode::OK, false, Some("authorised"))
    );
}
