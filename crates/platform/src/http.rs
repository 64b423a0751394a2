//! Every orderflow HTTP server is served here, with the limits a server
//! facing the internet needs: headers must arrive within a deadline (a
//! client trickling them a byte at a time is cut off), each request must be
//! answered within a deadline, and only so many connections are served at
//! once (the rest wait in the listen backlog until one closes).
//!
//! `axum::serve` sets none of these (hyper's header timeout needs a timer it
//! does not give), so the accept loop is here: HTTP/1.1, as every client of
//! orderflow speaks it.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::Request,
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use serde_json::json;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

/// How much a server lets its clients take.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct HttpLimits {
    /// How long a client may take to send a request's headers, in ms; the
    /// connection is closed after that (idle keep-alive connections too).
    #[arg(long, env = "HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_header_timeout_ms: u64,
    /// How long a request may take until its response starts, in ms (a
    /// stream's body may then run on); over it: `408`.
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_request_timeout_ms: u64,
    /// Connections served at once; more wait until one closes.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub http_max_connections: u32,
}

impl HttpLimits {
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.http_header_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.http_request_timeout_ms)
    }
}

/// Serve `router` on `listener` within `limits` until `shutdown`, then
/// stop accepting and wait for the requests in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let timeout = limits.request_timeout();
    let router = router.layer(middleware::from_fn(move |request: Request, next: Next| {
        answer_within(timeout, request, next)
    }));
    let slots = Arc::new(Semaphore::new(limits.http_max_connections as usize));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout());
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn answer_within(timeout: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            Json(json!({ "error": {
                "code": "request_timeout",
                "message": format!("no answer within {timeout:?}; retry"),
                "details": null,
            }})),
        )
            .into_response(),
    }
}
