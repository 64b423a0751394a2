//! Webhooks that would reach inside are refused at send time: recorded as
//! `refused` with the reason after one attempt, never retried, and nothing
//! sent. Host names are answered by a test resolver, never by real DNS.
//! Every test checks the refusal without the network first, so a broken
//! check fails the test before anything could be sent; the only receivers
//! are on 127.0.0.1.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use notification_service::{
    egress::{self, AllowList, GuardedResolver},
    webhooks::{Dispatcher, WebhookPolicy},
};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::webhooks::{Receiver, delivery, notified_with_callback, policy, start_receiver};

/// Answers its own names; any other name is an error (no real lookup).
struct TestDns(HashMap<&'static str, IpAddr>);

impl TestDns {
    fn new() -> Arc<Self> {
        Arc::new(Self(HashMap::from([
            ("inward.test", IpAddr::from([127, 0, 0, 1])),
            ("metadata.test", IpAddr::from([169, 254, 169, 254])),
            ("private.test", IpAddr::from([10, 0, 0, 1])),
        ])))
    }
}

impl Resolve for TestDns {
    fn resolve(&self, name: Name) -> Resolving {
        let answer = self.0.get(name.as_str()).copied();
        Box::pin(async move {
            let ip = answer.ok_or("not a test name")?;
            Ok(Box::new(std::iter::once(SocketAddr::new(ip, 0))) as Addrs)
        })
    }
}

/// Refuses inward addresses: no allow-list.
fn refusing(max_attempts: u32) -> WebhookPolicy {
    WebhookPolicy {
        allowed_hosts: AllowList::default(),
        ..policy(max_attempts)
    }
}

fn run_with_test_dns(pool: &PgPool, policy: WebhookPolicy) -> CancellationToken {
    let stop = CancellationToken::new();
    let dispatcher = Dispatcher::with_resolver(pool.clone(), policy, TestDns::new()).unwrap();
    tokio::spawn(dispatcher.run(stop.clone()));
    stop
}

async fn finished(pool: &PgPool, event_id: Uuid, state: &str) {
    test_support::eventually(Duration::from_secs(10), state, || async {
        (delivery(pool, event_id).await.0 == state).then_some(())
    })
    .await;
}

/// State, attempts, last_error and the attempt rows' errors.
async fn record(pool: &PgPool, event_id: Uuid) -> (String, i32, Option<String>, Vec<String>) {
    let delivery = sqlx::query!(
        "SELECT state, attempts, last_error FROM webhook_deliveries WHERE event_id = $1",
        event_id
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let errors = sqlx::query_scalar!(
        r#"SELECT coalesce(a.error, '') AS "error!" FROM webhook_attempts a
           JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.event_id = $1"#,
        event_id
    )
    .fetch_all(pool)
    .await
    .unwrap();
    (
        delivery.state,
        delivery.attempts,
        delivery.last_error,
        errors,
    )
}

/// Refused once with `reason`, and (after the backoff a retry would have
/// waited) still only once.
async fn assert_refused_once(pool: &PgPool, event_id: Uuid, reason: &str) {
    assert_eq!(
        record(pool, event_id).await,
        (
            "refused".into(),
            1,
            Some(reason.into()),
            vec![reason.into()]
        )
    );
}

#[tokio::test]
async fn every_inward_address_class_is_refused_after_one_attempt_and_never_retried() {
    let (_, pool) = test_support::fresh_database().await;
    let (receiver_url, receiver) = start_receiver(Receiver::default()).await;
    let port = receiver_url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let cases = [
        (
            format!("http://127.0.0.1:{port}/hook"),
            "127.0.0.1 is loopback",
        ),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/hook"),
            "::ffff:127.0.0.1 is IPv4-mapped IPv6 (::ffff:0:0/96)",
        ),
        ("http://[::1]/hook".into(), "::1 is loopback"),
        ("http://10.1.2.3/hook".into(), "10.1.2.3 is private network"),
        (
            "http://172.16.0.1/hook".into(),
            "172.16.0.1 is private network",
        ),
        (
            "http://192.168.0.1/hook".into(),
            "192.168.0.1 is private network",
        ),
        (
            "http://100.64.0.1/hook".into(),
            "100.64.0.1 is carrier-grade NAT (100.64.0.0/10)",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".into(),
            "169.254.169.254 is cloud metadata endpoint",
        ),
        ("http://169.254.1.1/".into(), "169.254.1.1 is link-local"),
        ("http://[fe80::1]/".into(), "fe80::1 is link-local"),
        (
            "http://[fd00::1]/".into(),
            "fd00::1 is unique-local (fc00::/7)",
        ),
        (
            "http://[::a9fe:a9fe]/".into(),
            "::a9fe:a9fe is IPv4-compatible IPv6 (::/96)",
        ),
        (
            "http://[64:ff9b::a9fe:a9fe]/".into(),
            "64:ff9b::a9fe:a9fe is NAT64 (64:ff9b::/96)",
        ),
        ("http://0.0.0.0/".into(), "0.0.0.0 is unspecified"),
        ("http://[::]/".into(), ":: is unspecified"),
        (
            "http://0.1.2.3/".into(),
            "0.1.2.3 is \"this network\" (0.0.0.0/8)",
        ),
        ("http://224.0.0.1/".into(), "224.0.0.1 is multicast"),
        ("http://[ff02::1]/".into(), "ff02::1 is multicast"),
        (
            "http://255.255.255.255/".into(),
            "255.255.255.255 is broadcast",
        ),
        (
            "http://192.0.0.1/".into(),
            "192.0.0.1 is IETF protocol assignments (192.0.0.0/24)",
        ),
        (
            "http://192.0.2.1/".into(),
            "192.0.2.1 is documentation range",
        ),
        (
            "http://[2001:db8::1]/".into(),
            "2001:db8::1 is documentation range",
        ),
        (
            "http://198.18.0.1/".into(),
            "198.18.0.1 is benchmarking range",
        ),
        ("http://240.0.0.1/".into(), "240.0.0.1 is reserved range"),
    ];
    for (url, _) in &cases {
        // Refused before any connection; checked here without the network.
        assert!(
            egress::check_url(url, &AllowList::default()).is_err(),
            "{url}"
        );
    }
    let mut events = Vec::new();
    for (url, reason) in &cases {
        events.push((
            notified_with_callback(&pool, url).await,
            format!("refused: {reason}"),
        ));
    }
    let stop = run_with_test_dns(&pool, refusing(5));
    for (event_id, _) in &events {
        finished(&pool, *event_id, "refused").await;
    }
    // Longer than the first retry's backoff (50–100 ms).
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.cancel();
    for (event_id, reason) in &events {
        assert_refused_once(&pool, *event_id, reason).await;
    }
    assert_eq!(receiver.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_name_that_resolves_to_loopback_is_refused_and_the_receiver_gets_nothing() {
    let (_, pool) = test_support::fresh_database().await;
    let (receiver_url, receiver) = start_receiver(Receiver::default()).await;
    let url = receiver_url.replace("127.0.0.1", "inward.test");
    let reason = "refused: inward.test resolves to 127.0.0.1, which is loopback";
    let guard = GuardedResolver::new(TestDns::new(), AllowList::default());
    let refused = guard.resolve("inward.test".parse().unwrap()).await;
    assert_eq!(refused.err().unwrap().to_string(), reason);

    let event_id = notified_with_callback(&pool, &url).await;
    let stop = run_with_test_dns(&pool, refusing(5));
    finished(&pool, event_id, "refused").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.cancel();
    assert_refused_once(&pool, event_id, reason).await;
    assert_eq!(receiver.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn names_that_resolve_to_metadata_or_private_addresses_are_never_connected() {
    let (_, pool) = test_support::fresh_database().await;
    let cases = [
        (
            "http://metadata.test/latest/meta-data/",
            "refused: metadata.test resolves to 169.254.169.254, which is cloud metadata endpoint",
        ),
        (
            "http://private.test:8080/hook",
            "refused: private.test resolves to 10.0.0.1, which is private network",
        ),
    ];
    // The guard refuses these names before answering, so nothing is
    // connected; checked without the network before any dispatch.
    let guard = GuardedResolver::new(TestDns::new(), AllowList::default());
    for name in ["metadata.test", "private.test"] {
        assert!(
            guard.resolve(name.parse().unwrap()).await.is_err(),
            "{name}"
        );
    }
    let mut events = Vec::new();
    for (url, reason) in cases {
        events.push((notified_with_callback(&pool, url).await, reason));
    }
    let stop = run_with_test_dns(&pool, refusing(5));
    for (event_id, _) in &events {
        finished(&pool, *event_id, "refused").await;
    }
    stop.cancel();
    for (event_id, reason) in events {
        assert_refused_once(&pool, event_id, reason).await;
    }
}

#[tokio::test]
async fn a_url_with_credentials_is_refused_even_to_an_allowed_host() {
    let (_, pool) = test_support::fresh_database().await;
    let (receiver_url, receiver) = start_receiver(Receiver::default()).await;
    let url = receiver_url.replace("http://", "http://user:pw@");
    let event_id = notified_with_callback(&pool, &url).await;
    // policy() allows 127.0.0.1: only the credentials are refused.
    let stop = run_with_test_dns(&pool, policy(5));
    finished(&pool, event_id, "refused").await;
    stop.cancel();
    assert_refused_once(
        &pool,
        event_id,
        "refused: the URL carries a user name or password",
    )
    .await;
    assert_eq!(receiver.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_allow_list_lets_a_loopback_receiver_through_only_when_it_names_it() {
    let (receiver_url, receiver) = start_receiver(Receiver::default()).await;
    let by_name = receiver_url.replace("127.0.0.1", "inward.test");
    for (allowed, url, state) in [
        ("", &receiver_url, "refused"),
        ("", &by_name, "refused"),
        ("localhost,inward.test", &receiver_url, "refused"),
        ("127.0.0.1", &receiver_url, "delivered"),
        ("inward.test", &by_name, "delivered"),
    ] {
        let (_, pool) = test_support::fresh_database().await;
        let event_id = notified_with_callback(&pool, url).await;
        let allowed_hosts: AllowList = allowed.parse().unwrap();
        let stop = run_with_test_dns(
            &pool,
            WebhookPolicy {
                allowed_hosts,
                ..policy(5)
            },
        );
        finished(&pool, event_id, state).await;
        stop.cancel();
        assert_eq!(
            delivery(&pool, event_id).await,
            (state.into(), 1),
            "{allowed} {url}"
        );
    }
    assert_eq!(receiver.calls.load(Ordering::SeqCst), 2);
}
