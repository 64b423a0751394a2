//! A payment provider reached over HTTP, with the API of orderflow's
//! stand-in provider (`crates/payment-provider`): `POST
//! /v1/authorisations`, `POST /v1/authorisations/{reference}/capture` and
//! `/void`, each with an `Idempotency-Key`.
//!
//! What is retried, and where: a connection that could not be made sent
//! nothing, so it is tried again here, twice, at once. Everything else that
//! is not an answer (a timeout, a 5xx, a 409 for a key still at work) is
//! returned as a [`ProviderError`]: the message is retried later with its
//! backoff, and the same key makes the retry safe whether or not the
//! provider did the work.

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

use super::{Answer, Call, Operation, PaymentProvider, ProviderError};

/// How to reach the provider.
#[derive(clap::Args, Clone)]
pub struct ProviderSettings {
    /// Base URL of the payment provider's API.
    #[arg(
        long,
        env = "PAYMENT_PROVIDER_URL",
        default_value = "http://127.0.0.1:8085"
    )]
    pub payment_provider_url: Url,
    /// The provider's API key, sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "PAYMENT_PROVIDER_KEY", hide_env_values = true)]
    pub payment_provider_key: Option<String>,
    /// How long a call may take before it is given up as unanswered, in ms.
    #[arg(long, env = "PAYMENT_TIMEOUT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pub payment_timeout_ms: u64,
    /// Calls in flight at once, at most; more wait for a free slot.
    #[arg(long, env = "PAYMENT_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub payment_concurrency: u32,
}

impl std::fmt::Debug for ProviderSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderSettings")
            .field("payment_provider_url", &self.payment_provider_url.as_str())
            .field(
                "payment_provider_key",
                &self.payment_provider_key.as_ref().map(|_| "<set>"),
            )
            .field("payment_timeout_ms", &self.payment_timeout_ms)
            .field("payment_concurrency", &self.payment_concurrency)
            .finish()
    }
}

/// Tries of a call whose connection could not be made.
const CONNECT_TRIES: u32 = 3;

/// The provider's HTTP API.
pub struct HttpProvider {
    client: reqwest::Client,
    base: Url,
    key: Option<String>,
    slots: Arc<Semaphore>,
}

impl HttpProvider {
    pub fn new(settings: &ProviderSettings) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(settings.payment_timeout_ms);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(1)))
            // The provider is one host; its address is configuration, not
            // something a redirect may change.
            .redirect(reqwest::redirect::Policy::none())
            // Nor a proxy from the environment: the key goes to the provider
            // and nowhere else.
            .no_proxy()
            .build()?;
        Ok(Self {
            client,
            base: settings.payment_provider_url.clone(),
            key: settings.payment_provider_key.clone(),
            slots: Arc::new(Semaphore::new(settings.payment_concurrency as usize)),
        })
    }

    /// Where `call` goes.
    fn url(&self, call: &Call<'_>) -> Url {
        let path = match call.operation {
            Operation::Authorise => "v1/authorisations".to_owned(),
            operation => format!("v1/authorisations/{}/{operation}", call.charge.reference),
        };
        let mut url = self.base.clone();
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        url.join(&path).expect("a relative path joins")
    }

    async fn send(&self, call: Call<'_>) -> Result<Answer, ProviderError> {
        let _slot = self.slots.acquire().await.expect("never closed");
        let body = match call.operation {
            Operation::Authorise => json!({
                "reference": call.charge.reference,
                "amount_cents": call.charge.amount_cents,
                "currency": call.charge.currency,
                "customer_id": call.charge.customer_id,
            }),
            _ => json!({ "customer_id": call.charge.customer_id }),
        };
        let url = self.url(&call);
        let mut tries = 0;
        let response = loop {
            tries += 1;
            let mut request = self
                .client
                .post(url.clone())
                .header("Idempotency-Key", call.idempotency_key)
                .json(&body);
            if let Some(key) = &self.key {
                request = request.bearer_auth(key);
            }
            match request.send().await {
                Ok(response) => break response,
                Err(error) if error.is_connect() && tries < CONNECT_TRIES => continue,
                Err(error) if error.is_timeout() => {
                    return Err(ProviderError::TimedOut(call.operation));
                }
                Err(error) => {
                    return Err(ProviderError::Unreachable(
                        call.operation,
                        error.without_url().to_string(),
                    ));
                }
            }
        };
        answer(call.operation, response).await
    }
}

impl PaymentProvider for HttpProvider {
    fn call<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Result<Answer, ProviderError>> {
        Box::pin(async move {
            let answered = self.send(call).await;
            let result = match &answered {
                Ok(Answer::Refused(_)) => "refused",
                Ok(_) => "answered",
                Err(ProviderError::TimedOut(_)) => "timed_out",
                Err(_) => "failed",
            };
            metrics::counter!("payment_calls_total", "operation" => call.operation.as_str(), "result" => result)
                .increment(1);
            answered
        })
    }
}

/// What the provider's response says about the call.
async fn answer(
    operation: Operation,
    response: reqwest::Response,
) -> Result<Answer, ProviderError> {
    #[derive(Deserialize)]
    struct Done {
        outcome: String,
    }
    #[derive(Deserialize)]
    struct Failed {
        error: Detail,
    }
    #[derive(Deserialize)]
    struct Detail {
        code: String,
        message: String,
    }
    let status = response.status();
    let no_answer = |message: String| ProviderError::NoAnswer {
        operation,
        status: status.as_u16(),
        message,
    };
    let text = match response.text().await {
        Ok(text) => text,
        Err(error) if error.is_timeout() => return Err(ProviderError::TimedOut(operation)),
        Err(error) => return Err(no_answer(error.without_url().to_string())),
    };
    if status == StatusCode::OK {
        let done: Done = serde_json::from_str(&text).map_err(|e| no_answer(e.to_string()))?;
        return match done.outcome.as_str() {
            "authorised" => Ok(Answer::Authorised),
            "declined" => Ok(Answer::Declined),
            "captured" => Ok(Answer::Captured),
            "voided" => Ok(Answer::Voided),
            other => Err(no_answer(format!("unknown outcome {other:?}"))),
        };
    }
    let detail = serde_json::from_str::<Failed>(&text)
        .map(|failed| failed.error)
        .unwrap_or_else(|_| Detail {
            code: String::new(),
            message: text.chars().take(200).collect(),
        });
    match (status, detail.code.as_str()) {
        // The provider looked at the call and will never do it.
        (StatusCode::BAD_REQUEST, "unexpected_state" | "invalid_request")
        | (StatusCode::UNPROCESSABLE_ENTITY, _) => Ok(Answer::Refused(detail.message)),
        _ => Err(no_answer(format!("{}: {}", detail.code, detail.message))),
    }
}
