//! The live page and its data: the page is public and holds nothing; its
//! data is for admin keys only; bad input gets a clear error; a burst is
//! stored and queued; queue depths are read without the management API.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{
    EventReader, TestApp, assert_error, count, spawn_app, spawn_with, test_settings,
};

async fn post_as(
    app: &TestApp,
    client: &reqwest::Client,
    path: &str,
    body: &Value,
) -> reqwest::Response {
    client
        .post(format!("{}{path}", app.address))
        .json(body)
        .send()
        .await
        .expect("POST")
}

/// The samples of `GET /dashboard/queues`, one at a time.
struct Samples(EventReader);

impl Samples {
    async fn open(app: &TestApp) -> Self {
        Self(EventReader::open_with(app, &app.admin, "/dashboard/queues").await)
    }

    /// The depth of `queue` in the next `queues` sample, if it is there.
    async fn next_depth(&mut self, queue: &str) -> Option<Value> {
        let (name, sample) = self.0.next().await.expect("the stream stays open");
        assert_eq!(name, "queues", "{sample}");
        sample["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == queue)
            .cloned()
    }
}

#[tokio::test]
async fn the_page_is_public_holds_no_data_and_runs_only_its_own_script() {
    let app = spawn_app().await;
    let anonymous = reqwest::Client::new();
    for (path, content_type) in [
        ("/", "text/html"),
        ("/live.js", "text/javascript"),
        ("/live.css", "text/css"),
        ("/favicon.ico", "image/svg+xml"),
    ] {
        let response = app.get_as(&anonymous, path).await;
        assert_eq!(response.status().as_u16(), 200, "{path}");
        let headers = response.headers();
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with(content_type),
            "{path}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        let policy = headers["content-security-policy"].to_str().unwrap();
        assert!(
            policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"),
            "{policy}"
        );
    }
    let page = app.get_as(&anonymous, "/").await.text().await.unwrap();
    assert!(page.contains("<script src=\"/live.js\""), "{page}");
    assert!(
        !page.contains("<script>"),
        "no inline script: the policy forbids it"
    );
}

#[tokio::test]
async fn the_pages_data_is_for_admin_keys_only() {
    let app = spawn_app().await;
    let anonymous = reqwest::Client::new();
    let gets = [
        "/dashboard/queues",
        "/dashboard/orders?ids=",
        "/dashboard/dead-letters",
    ];
    let posts = [
        ("/dashboard/burst", json!({"count": 1})),
        ("/dashboard/dead-letters/replay", json!({"message_id": "x"})),
    ];
    for path in gets {
        assert_error(app.get_as(&anonymous, path).await, 401, "unauthenticated").await;
        assert_error(app.get_as(&app.client, path).await, 403, "forbidden").await;
    }
    for (path, body) in &posts {
        assert_error(
            post_as(&app, &anonymous, path, body).await,
            401,
            "unauthenticated",
        )
        .await;
        assert_error(
            post_as(&app, &app.client, path, body).await,
            403,
            "forbidden",
        )
        .await;
    }
    assert_eq!(
        count!(&app.pool, r#"SELECT count(*) AS "n!" FROM orders"#),
        0,
        "a refused burst placed nothing"
    );
}

#[tokio::test]
async fn bad_input_to_the_pages_endpoints_gets_a_clear_error() {
    let app = spawn_app().await;
    let admin = &app.admin;
    assert_error(
        app.get_as(admin, "/dashboard/orders?ids=not-a-uuid").await,
        400,
        "invalid_order_id",
    )
    .await;
    let many = (0..101)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect::<Vec<_>>()
        .join(",");
    assert_error(
        app.get_as(admin, &format!("/dashboard/orders?ids={many}"))
            .await,
        422,
        "validation_failed",
    )
    .await;
    assert_error(
        app.get_as(admin, "/dashboard/orders").await,
        422,
        "validation_failed",
    )
    .await;
    for message_id in ["", "-"] {
        assert_error(
            post_as(
                &app,
                admin,
                "/dashboard/dead-letters/replay",
                &json!({ "message_id": message_id }),
            )
            .await,
            422,
            "validation_failed",
        )
        .await;
    }
    for count in [0, 5_001] {
        assert_error(
            post_as(&app, admin, "/dashboard/burst", &json!({"count": count})).await,
            422,
            "validation_failed",
        )
        .await;
    }
    assert_error(
        post_as(&app, admin, "/dashboard/burst", &json!({"count": -1})).await,
        422,
        "invalid_body",
    )
    .await;
    assert_error(
        post_as(
            &app,
            admin,
            "/dashboard/burst",
            &json!({"count": 1, "sku": "GIZMO"}),
        )
        .await,
        422,
        "invalid_body",
    )
    .await;
    let malformed = admin
        .post(format!("{}/dashboard/burst", app.address))
        .header("content-type", "application/json")
        .body("{\"count\":")
        .send()
        .await
        .unwrap();
    assert_error(malformed, 400, "malformed_json").await;
    let unknown = post_as(
        &app,
        admin,
        "/dashboard/dead-letters/replay",
        &json!({"message_id": "no-such-message"}),
    )
    .await;
    assert_error(unknown, 404, "dead_letter_not_found").await;
    assert_eq!(
        count!(&app.pool, r#"SELECT count(*) AS "n!" FROM orders"#),
        0
    );
}

#[tokio::test]
async fn a_burst_is_stored_and_queued_and_its_depth_and_standing_are_shown() {
    let app = spawn_app().await;
    let response = post_as(&app, &app.admin, "/dashboard/burst", &json!({"count": 25})).await;
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer, json!({"accepted": 25, "failed": 0}));
    assert_eq!(
        count!(
            &app.pool,
            r#"SELECT count(*) AS "n!" FROM orders WHERE lane = 'standard'"#
        ),
        25
    );

    // No processor runs here: the 25 wait in the standard work queue.
    let standard = app
        .topology
        .work_queue(messaging::contracts::Lane::Standard);
    let mut samples = Samples::open(&app).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let depth = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sample showed 25 in {standard}"
        );
        if let Some(depth) = samples
            .next_depth(&standard)
            .await
            .filter(|d| d["messages"] == 25)
        {
            break depth;
        }
    };
    assert_eq!(depth["consumers"], 0);
    let log = app.topology.event_log();
    assert_eq!(
        samples.next_depth(&log).await,
        None,
        "the event log (a stream) has no backlog to show"
    );

    let ids: Vec<String> =
        sqlx::query_scalar!(r#"SELECT id::text AS "id!" FROM orders ORDER BY id LIMIT 3"#)
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let response = app
        .get_as(
            &app.admin,
            &format!("/dashboard/orders?ids={}", ids.join(",")),
        )
        .await;
    assert_eq!(response.status().as_u16(), 200);
    let standings: Vec<Value> = response.json().await.unwrap();
    assert_eq!(standings.len(), 3);
    for standing in standings {
        assert!(ids.contains(&standing["id"].as_str().unwrap().to_owned()));
        assert_eq!(standing["status"], "accepted");
        assert_eq!(standing["notified"], false);
        assert_eq!(standing["audited"], false);
    }
}

/// A TCP forwarder to RabbitMQ's management API that can be cut: every
/// connection through it ends when it is dropped.
struct Cuttable {
    port: u16,
    /// Dropped, it aborts the forwarder and its connections.
    _tasks: tokio::task::JoinSet<()>,
}

impl Cuttable {
    async fn to(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut tasks = tokio::task::JoinSet::new();
        let connections = std::sync::Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let held = connections.clone();
        tasks.spawn(async move {
            let _held = held;
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.lock().unwrap().spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self {
            port,
            _tasks: tasks,
        }
    }
}

#[tokio::test]
async fn queue_depths_go_on_when_the_management_api_goes_away() {
    let management = url::Url::parse(&test_support::management_url()).unwrap();
    let target = management.socket_addrs(|| None).unwrap()[0];
    assert!(target.ip().is_loopback(), "tests talk to 127.0.0.0/8 only");
    let cuttable = Cuttable::to(target).await;
    let (mut settings, pool) = test_settings().await;
    let mut through = management.clone();
    through.set_port(Some(cuttable.port)).unwrap();
    settings.service.amqp.rabbitmq_management_url = Some(through.to_string());
    let app = spawn_with(settings, pool).await;
    let mut samples = Samples::open(&app).await;
    let express = app.topology.work_queue(messaging::contracts::Lane::Express);
    assert!(samples.next_depth(&express).await.is_some());
    drop(cuttable);
    // Samples go on, with the same queues, across the page's relisting of
    // them without the management API (it relists every 10 s).
    for _ in 0..15 {
        assert!(samples.next_depth(&express).await.is_some());
    }
}
