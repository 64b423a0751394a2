//! The event log on Postgres (`EVENT_BUS=postgres`), against a real
//! Postgres (a fresh database per test): a reader never skips an event
//! whose transaction commits after a later one's (where a reader following
//! ids alone would), `follow` hands each event to its handler once, woken
//! by the append's `NOTIFY`, resumes from its stored position after a
//! restart and starts again after `rewind`, and an entry that is not an
//! `OrderEvent` is stepped over.
//!
//! Transaction ids are the server's, not the database's: a transaction of
//! another test running on the same server holds this test's readers back
//! until it ends. So a test never expects an event to be readable at once
//! after its commit; it reads again until it is, with a generous deadline.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use messaging::contracts::{OrderEvent, Outcome};
use platform::{
    event_log::{self, Entry, Position},
    worker::{EventHandler, Received},
};
use sqlx::{PgExecutor, PgPool, postgres::PgListener};
use test_support::eventually;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The reader the tests read as (each test has a database of its own).
const READER: &str = "test-reader";

/// Long enough for anything the tests wait for, on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// A processed order's event, as the processor writes it.
fn order_event() -> OrderEvent {
    test_support::events::order_event(Outcome::Processed)
}

/// Append `event` to the log with `executor` (a pool, or an open
/// transaction): where it was written.
async fn append<'e>(executor: impl PgExecutor<'e>, event: &OrderEvent) -> Position {
    append_body(
        executor,
        event.message_id,
        event.order_id,
        serde_json::to_value(event).unwrap(),
    )
    .await
}

/// Append an entry with `body`, whatever it is: where it was written.
async fn append_body<'e>(
    executor: impl PgExecutor<'e>,
    message_id: Uuid,
    order_id: Uuid,
    body: serde_json::Value,
) -> Position {
    let row = sqlx::query!(
        r#"INSERT INTO events (message_id, order_id, correlation_id, body)
           VALUES ($1, $2, 'corr-1', $3)
           RETURNING transaction_id::text::int8 AS "transaction_id!", id"#,
        message_id,
        order_id,
        body,
    )
    .fetch_one(executor)
    .await
    .unwrap();
    Position {
        transaction_id: row.transaction_id,
        id: row.id,
    }
}

/// What `event_readers` holds of `reader`: its position and event count.
async fn stored(pool: &PgPool, reader: &str) -> Option<(Position, i64)> {
    sqlx::query!(
        r#"SELECT transaction_id::text::int8 AS "transaction_id!", id, events
           FROM event_readers WHERE reader = $1"#,
        reader,
    )
    .fetch_optional(pool)
    .await
    .unwrap()
    .map(|row| {
        (
            Position {
                transaction_id: row.transaction_id,
                id: row.id,
            },
            row.events,
        )
    })
}

/// One page as a reader reads it: read after `at`, and store the position
/// past what was read (as `follow` does once its handler has committed).
/// The entries read and whether more are waiting.
async fn read_page(pool: &PgPool, at: &mut Position) -> (Vec<Entry>, bool) {
    let (entries, waiting) = event_log::read(pool, *at, 100).await.unwrap();
    if let Some(last) = entries.last() {
        let count = i64::try_from(entries.len()).unwrap();
        event_log::advance(pool, READER, last.position, count)
            .await
            .unwrap();
        *at = last.position;
    }
    (entries, waiting)
}

/// Read pages after `at` into `read` until it holds `n` positions, or
/// panic after [`PATIENCE`].
async fn read_until(pool: &PgPool, at: &mut Position, read: &mut Vec<Position>, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while read.len() < n {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} events; read {read:?}"
        );
        let (entries, _) = read_page(pool, at).await;
        if entries.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        read.extend(entries.iter().map(|entry| entry.position));
    }
}

/// A reader that pages by id alone (`id > last`): what the log must not be
/// read as. The ids it reads.
async fn naive_read(pool: &PgPool, last: &mut i64) -> Vec<i64> {
    let ids = sqlx::query_scalar!("SELECT id FROM events WHERE id > $1 ORDER BY id", *last)
        .fetch_all(pool)
        .await
        .unwrap();
    if let Some(&id) = ids.last() {
        *last = id;
    }
    ids
}

#[tokio::test]
async fn a_reader_never_skips_an_event_whose_transaction_commits_after_a_later_one() {
    test_support::init_tracing();
    let (_, pool) = test_support::fresh_database().await;

    // An event committed before anything else happens; both readers read it.
    let first = append(&pool, &order_event()).await;
    let mut at = event_log::position(&pool, READER).await.unwrap();
    assert_eq!(
        at,
        Position {
            transaction_id: 0,
            id: 0
        },
        "a new reader starts at the beginning of the log"
    );
    let mut read = Vec::new();
    read_until(&pool, &mut at, &mut read, 1).await;
    assert_eq!(read, [first]);
    assert_eq!(event_log::position(&pool, READER).await.unwrap(), first);
    let mut naive_last = 0;
    assert_eq!(naive_read(&pool, &mut naive_last).await, [first.id]);

    // A, a slow transaction, takes the next id and does not commit yet;
    // B and C take later ids and commit.
    let mut slow = pool.begin().await.unwrap();
    let a = append(&mut *slow, &order_event()).await;
    let b = append(&pool, &order_event()).await;
    let c = append(&pool, &order_event()).await;
    assert!(
        a.id < b.id && b.id < c.id,
        "A took its id first: {a:?} {b:?} {c:?}"
    );
    assert!(
        a < b && b < c,
        "and its transaction id first: {a:?} {b:?} {c:?}"
    );

    // The reader reads none of A, which it cannot see, and not B and C
    // either: A's transaction still runs, so reading them would pass A's
    // place in the log. It says that events are waiting and stays where
    // it was.
    let (entries, waiting) = read_page(&pool, &mut at).await;
    assert!(
        entries.is_empty(),
        "nothing is readable while A's transaction runs: {entries:?}"
    );
    assert!(waiting, "B and C are committed and waiting");
    assert_eq!(at, first);
    assert_eq!(event_log::position(&pool, READER).await.unwrap(), first);

    // A reader following ids alone reads B and C now, passing A's id.
    assert_eq!(naive_read(&pool, &mut naive_last).await, [b.id, c.id]);

    slow.commit().await.unwrap();

    // Once A has committed the reader reads A, B and C, in that order,
    // each once, however many pages that takes.
    read_until(&pool, &mut at, &mut read, 4).await;
    assert_eq!(read, [first, a, b, c], "every event once, in log order");
    let (entries, waiting) = read_page(&pool, &mut at).await;
    assert!(entries.is_empty(), "nothing more: {entries:?}");
    assert!(!waiting, "and nothing waiting");
    assert_eq!(
        stored(&pool, READER).await,
        Some((c, 4)),
        "the stored position is C's, after 4 events"
    );

    // The reader following ids alone never reads A: it is behind it.
    assert_eq!(
        naive_read(&pool, &mut naive_last).await,
        [] as [i64; 0],
        "the id-only reader skipped A for good"
    );
    assert!(a.id < naive_last);
    assert_eq!(
        test_support::count!(&pool, r#"SELECT count(*) AS "n!" FROM events"#),
        4,
        "A is in the log all the same"
    );
}

#[tokio::test]
async fn an_append_notifies_the_channel_once_per_statement_and_never_for_nothing() {
    test_support::init_tracing();
    let (_, pool) = test_support::fresh_database().await;
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen(event_log::CHANNEL).await.unwrap();

    // A statement that appends nothing, then one that appends two events,
    // then a marker: the listener gets exactly one notification before the
    // marker (notifications arrive in commit order).
    sqlx::query!(
        "INSERT INTO events (message_id, order_id, correlation_id, body)
         SELECT gen_random_uuid(), gen_random_uuid(), 'corr-1', '{}' WHERE false"
    )
    .execute(&pool)
    .await
    .unwrap();
    let (one, two) = (order_event(), order_event());
    sqlx::query!(
        "INSERT INTO events (message_id, order_id, correlation_id, body)
         SELECT message_id, gen_random_uuid(), 'corr-1', body
         FROM unnest($1::uuid[], $2::jsonb[]) AS e(message_id, body)",
        &[one.message_id, two.message_id],
        &[
            serde_json::to_value(&one).unwrap(),
            serde_json::to_value(&two).unwrap()
        ],
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query!("SELECT pg_notify($1, 'marker')", event_log::CHANNEL)
        .execute(&pool)
        .await
        .unwrap();

    let received = tokio::time::timeout(PATIENCE, listener.recv())
        .await
        .expect("a notification")
        .unwrap();
    assert_eq!(received.payload(), "", "the append's notification");
    let received = tokio::time::timeout(PATIENCE, listener.recv())
        .await
        .expect("a notification")
        .unwrap();
    assert_eq!(received.payload(), "marker", "and no other");
}

/// An [`EventHandler`] that records the events it is handed, in order.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Uuid>>>);

impl Recorder {
    /// The ids of the events handed so far.
    fn handed(&self) -> Vec<Uuid> {
        self.0.lock().unwrap().clone()
    }

    /// Wait until `event` was handed: the ids handed by then.
    async fn until_handed(&self, event: &OrderEvent) -> Vec<Uuid> {
        eventually(PATIENCE, "the event to be handled", || async {
            let handed = self.handed();
            handed.contains(&event.message_id).then_some(handed)
        })
        .await
    }
}

impl EventHandler for Recorder {
    async fn handle(&self, event: &Received) -> anyhow::Result<bool> {
        Ok(self.handle_batch(std::slice::from_ref(event)).await?[0])
    }

    async fn handle_batch(&self, events: &[Received]) -> anyhow::Result<Vec<bool>> {
        let mut handed = self.0.lock().unwrap();
        handed.extend(events.iter().map(|received| received.event.message_id));
        Ok(vec![true; events.len()])
    }
}

/// `follow` running as [`READER`], and how to stop it.
struct Following {
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Following {
    fn start(pool: &PgPool, batch: u16, handler: Recorder) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(event_log::follow(
            pool.clone(),
            READER,
            batch,
            shutdown.clone(),
            handler,
        ));
        Self { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("follow stops when told")
            .unwrap()
            .unwrap();
    }
}

fn ids(events: &[&OrderEvent]) -> Vec<Uuid> {
    events.iter().map(|event| event.message_id).collect()
}

#[tokio::test]
async fn follow_hands_each_event_once_resumes_where_it_stopped_and_starts_again_after_a_rewind() {
    test_support::init_tracing();
    let (_, pool) = test_support::fresh_database().await;
    let recorder = Recorder::default();
    let following = Following::start(&pool, 2, recorder.clone());
    // Ready once it has its position; from then on it waits for a NOTIFY
    // (or its 2 s poll) before it reads again.
    eventually(PATIENCE, "the reader's position", || async {
        stored(&pool, READER).await
    })
    .await;

    // Three events from another connection: two in one transaction, one in
    // another. Two to a batch, so they take more than one.
    let (e1, e2, e3) = (order_event(), order_event(), order_event());
    let mut tx = pool.begin().await.unwrap();
    append(&mut *tx, &e1).await;
    append(&mut *tx, &e2).await;
    tx.commit().await.unwrap();
    let p3 = append(&pool, &e3).await;
    assert_eq!(
        recorder.until_handed(&e3).await,
        ids(&[&e1, &e2, &e3]),
        "each event handed once, in order"
    );
    eventually(PATIENCE, "the position stored past e3", || async {
        (stored(&pool, READER).await == Some((p3, 3))).then_some(())
    })
    .await;
    following.stop().await;

    // Stopped, then started again: it resumes from its stored position.
    let e4 = order_event();
    let p4 = append(&pool, &e4).await;
    let following = Following::start(&pool, 2, recorder.clone());
    assert_eq!(
        recorder.until_handed(&e4).await,
        ids(&[&e1, &e2, &e3, &e4]),
        "the new event handed, none of the old ones again"
    );
    let e5 = order_event();
    append(&pool, &e5).await;
    assert_eq!(
        recorder.until_handed(&e5).await,
        ids(&[&e1, &e2, &e3, &e4, &e5])
    );
    following.stop().await;
    let (p5, events) = stored(&pool, READER).await.unwrap();
    assert!(p4 < p5);
    assert_eq!(events, 5);

    // Rewound, it starts again from the beginning of the log.
    event_log::rewind(&pool, READER).await.unwrap();
    assert_eq!(stored(&pool, READER).await, None);
    let fresh = Recorder::default();
    let following = Following::start(&pool, 2, fresh.clone());
    assert_eq!(
        fresh.until_handed(&e5).await,
        ids(&[&e1, &e2, &e3, &e4, &e5]),
        "the whole log again, in order"
    );
    following.stop().await;
    assert_eq!(stored(&pool, READER).await, Some((p5, 5)));
    assert_eq!(
        recorder.handed().len(),
        5,
        "the stopped follower got nothing"
    );
}

#[tokio::test]
async fn an_entry_that_is_not_an_order_event_is_skipped_and_the_reader_moves_past_it() {
    test_support::init_tracing();
    let (_, pool) = test_support::fresh_database().await;
    let before = order_event();
    append(&pool, &before).await;
    let poison = Uuid::new_v4();
    append_body(
        &pool,
        poison,
        Uuid::new_v4(),
        serde_json::json!({ "message_id": poison, "hello": "not an order event" }),
    )
    .await;
    let after = order_event();
    let last = append(&pool, &after).await;

    // One to a batch, so the entry is a page of its own.
    let recorder = Recorder::default();
    let following = Following::start(&pool, 1, recorder.clone());
    assert_eq!(
        recorder.until_handed(&after).await,
        ids(&[&before, &after]),
        "the events around it handed, the entry not"
    );
    eventually(
        PATIENCE,
        "the position stored past the last event",
        || async { (stored(&pool, READER).await == Some((last, 3))).then_some(()) },
    )
    .await;
    following.stop().await;
}
