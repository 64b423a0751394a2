//! Node loss on a three-node cluster, judged the way RabbitMQ's own Jepsen
//! tests judge it: under a steady load, one node is stopped, killed, frozen,
//! or every node restarted in turn; then every accepted order must be final
//! exactly once with nothing doubled and nothing left over (a message the
//! broker confirmed and then lost would leave its order unfinished). Each
//! case prints how long accepting and processing paused and how long the
//! work queue's leader election took.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{Load, LoadReport, System, check_invariants};
use crate::servers::PrivateRabbit;

const RATE: u64 = 25;
const QUEUE: &str = "orders.standard";

/// What the management API says of `queue`, asked of each node in turn
/// (a stopped or frozen one is skipped).
async fn queue_info(system: &System, queue: &str) -> Option<Value> {
    system
        .management_api(&format!("queues/%2F/{queue}"), |info| {
            info["leader"].is_string()
        })
        .await
}

async fn leader(system: &System) -> String {
    let info = test_support::eventually(Duration::from_secs(60), "the work queue's leader", || {
        queue_info(system, QUEUE)
    })
    .await;
    let members = info["members"].as_array().map_or(0, Vec::len);
    assert_eq!(
        members, 3,
        "{QUEUE} is replicated on all three nodes: {info}"
    );
    info["leader"].as_str().unwrap().to_owned()
}

/// Wait until a node other than `old` leads the work queue; how long since
/// `since`.
async fn election(system: &System, old: &str, since: Instant) -> (String, Duration) {
    let new = test_support::eventually(
        Duration::from_secs(120),
        "a new leader of the work queue",
        || async {
            let info = queue_info(system, QUEUE).await?;
            let leader = info["leader"].as_str()?;
            (leader != old).then(|| leader.to_owned())
        },
    )
    .await;
    (new, since.elapsed())
}

fn node<'a>(system: &'a System, name: &str) -> &'a PrivateRabbit {
    system
        .nodes()
        .find(|n| n.name() == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// How an election went: the old leader, the new, how long it took.
fn elected(old: &str, election: Option<&(String, Duration)>) -> String {
    match election {
        Some((new, took)) => format!("leader of {QUEUE} {old} -> {new} in {took:.1?}"),
        None => format!("{QUEUE}'s leader {old} was not replaced during the fault"),
    }
}

/// When the fault began, by this process's clock and by Postgres's.
struct Fault {
    at: Instant,
    db_at: DateTime<Utc>,
}

impl Fault {
    async fn now(system: &System) -> Self {
        let db_at = sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
            .fetch_one(&system.pool)
            .await
            .unwrap();
        Self {
            at: Instant::now(),
            db_at,
        }
    }

    /// The longest time after the fault with no POST answered 202.
    fn accepting_paused(&self, report: &LoadReport) -> Duration {
        let mut answered: Vec<Instant> = report
            .accepted_latencies
            .iter()
            .map(|(sent, took)| *sent + *took)
            .filter(|at| *at >= self.at)
            .collect();
        answered.sort();
        std::iter::once(self.at)
            .chain(answered)
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    /// The longest time after the fault with no order finished.
    async fn processing_paused(&self, system: &System) -> Duration {
        let seconds: f64 = sqlx::query_scalar!(
            r#"SELECT coalesce(extract(epoch FROM max(gap)), 0)::float8 AS "seconds!" FROM (
                 SELECT at - lag(at) OVER (ORDER BY at) AS gap FROM (
                     SELECT $1::timestamptz AS at
                     UNION ALL
                     SELECT at FROM order_status_history
                     WHERE status IN ('processed', 'rejected') AND at >= $1) finished) gaps"#,
            self.db_at,
        )
        .fetch_one(&system.pool)
        .await
        .unwrap();
        Duration::from_secs_f64(seconds)
    }

    async fn report(&self, system: &System, case: &str, report: &LoadReport, election: &str) {
        let accepting = self.accepting_paused(report);
        let processing = self.processing_paused(system).await;
        println!(
            "{case} on RabbitMQ {}: POST answers {:?}, transport errors {}; longest pause: \
             accepting {accepting:.1?}, processing {processing:.1?}; {election}",
            system.rabbit.version(),
            report.statuses,
            report.transport_errors,
        );
    }
}

/// The services on a fresh three-node cluster, 5 s into a steady load.
async fn under_load() -> (System, Load) {
    let system = System::start_cluster(&[]).await;
    let load = Load::start(system.api_url(), system.client(), RATE);
    tokio::time::sleep(Duration::from_secs(5)).await;
    (system, load)
}

/// End the load, print the pauses and elections since `fault`, check every
/// invariant, and stop the services.
async fn settle(mut system: System, load: Load, fault: Fault, case: &str, elections: &str) {
    let report = load.finish().await;
    fault.report(&system, case, &report, elections).await;
    check_invariants(&system, case, &report.accepted, 0).await;
    system.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_node_that_leads_the_work_queue_loses_nothing() {
    let (system, load) = under_load().await;
    let old = leader(&system).await;
    println!("stopping {old}, the leader of {QUEUE}, under load");
    let fault = Fault::now(&system).await;
    let ((), election) = tokio::join!(
        node(&system, &old).stop(),
        election(&system, &old, fault.at)
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    println!("starting {old} again");
    node(&system, &old).start_again().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    settle(
        system,
        load,
        fault,
        "leader stopped",
        &elected(&old, Some(&election)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_node_every_service_is_connected_to_loses_nothing() {
    let (system, load) = under_load().await;
    let old = leader(&system).await;
    let victim = system.rabbit.name().to_owned();
    println!("kill -9 {victim}, the first node of every service's list, under load");
    let fault = Fault::now(&system).await;
    system.rabbit.kill();
    let election = if victim == old {
        Some(election(&system, &old, fault.at).await)
    } else {
        None
    };
    tokio::time::sleep(Duration::from_secs(10)).await;
    println!("starting {victim} again");
    system.rabbit.start_again().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    settle(
        system,
        load,
        fault,
        "node killed",
        &elected(&old, election.as_ref()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezing_the_leader_for_20_s_loses_nothing() {
    let (system, load) = under_load().await;
    let old = leader(&system).await;
    println!("SIGSTOP {old}, the leader of {QUEUE}, for 20 s under load");
    let fault = Fault::now(&system).await;
    node(&system, &old).freeze();
    // A frozen node is not a dead one: its peers may wait for the Erlang
    // distribution's tick timeout (60 s) before electing another leader.
    let replaced = tokio::time::timeout(Duration::from_secs(20), election(&system, &old, fault.at))
        .await
        .ok();
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(fault.at.elapsed())).await;
    println!("SIGCONT {old}");
    node(&system, &old).thaw();
    tokio::time::sleep(Duration::from_secs(10)).await;
    settle(
        system,
        load,
        fault,
        "leader frozen 20 s",
        &elected(&old, replaced.as_ref()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_loses_nothing() {
    let (system, load) = under_load().await;
    let fault = Fault::now(&system).await;
    let names: Vec<String> = system.nodes().map(|n| n.name().to_owned()).collect();
    let mut elections = Vec::new();
    for name in &names {
        let node = node(&system, name);
        // As an operator would: never take down a node whose quorum queues
        // would lose their majority with it.
        test_support::eventually(
            Duration::from_secs(120),
            &format!("{name} to be safe to stop"),
            || async {
                node.check("rabbitmq-queues", &["check_if_node_is_quorum_critical"])
                    .await
                    .then_some(())
            },
        )
        .await;
        let old = leader(&system).await;
        println!("restarting {name}");
        let stopped = Instant::now();
        if old == *name {
            let ((), election) = tokio::join!(node.stop(), election(&system, &old, stopped));
            elections.push(elected(&old, Some(&election)));
        } else {
            node.stop().await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        node.start_again().await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    settle(
        system,
        load,
        fault,
        "rolling restart",
        &elections.join("; "),
    )
    .await;
}
