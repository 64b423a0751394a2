//! Where the CPU went during a measurement: each service, Postgres,
//! RabbitMQ and the load generator, from /proc. Divided by the orders
//! handled, it says what one order costs and so what two cores can do.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde::Serialize;

/// Linux reports process and machine times in USER_HZ ticks, 100 per second.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds used so far, by group, and by the whole machine.
pub struct Snapshot {
    at: Instant,
    groups: BTreeMap<String, f64>,
    machine_busy_s: f64,
}

/// CPU spent between two snapshots.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub wall_s: f64,
    /// Busy share of all cores over the interval, in percent.
    pub machine_busy_pct: f64,
    /// CPU milliseconds per operation (order or request), by group; `other`
    /// is the rest of the machine.
    pub ms_per_op: BTreeMap<String, f64>,
    /// The sum of `ms_per_op`: what one operation costs the machine.
    pub total_ms_per_op: f64,
}

impl Usage {
    /// What the stand-in payment provider (its service and its database's
    /// backends) spent per operation.
    pub fn provider_ms_per_op(&self) -> f64 {
        PROVIDER_GROUPS
            .iter()
            .filter_map(|group| self.ms_per_op.get(*group))
            .sum()
    }

    /// What orderflow spent per operation: the total less the provider's.
    pub fn orderflow_ms_per_op(&self) -> f64 {
        self.total_ms_per_op - self.provider_ms_per_op()
    }
}

/// Read the CPU time of `services` (name, pid), of every Postgres and
/// RabbitMQ process, of this process, and of the whole machine.
pub fn snapshot(services: &[(String, u32)]) -> Snapshot {
    let mut groups = BTreeMap::new();
    for (name, pid) in services {
        if let Some((_, seconds)) = process_cpu(*pid) {
            *groups.entry(group_of(name)).or_insert(0.0) += seconds;
        }
    }
    let own = std::process::id();
    if let Some((_, seconds)) = process_cpu(own) {
        groups.insert("load generator".into(), seconds);
    }
    for pid in all_pids() {
        if let Some((command, seconds)) = process_cpu(pid) {
            let group = match command.as_str() {
                "postgres" if serves_the_provider(pid) => PROVIDER_POSTGRES,
                "postgres" => "postgres",
                "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => "rabbitmq",
                _ => continue,
            };
            *groups.entry(group.to_string()).or_insert(0.0) += seconds;
        }
    }
    Snapshot {
        at: Instant::now(),
        groups,
        machine_busy_s: machine_busy_seconds().unwrap_or(0.0),
    }
}

/// The group of the Postgres backends serving the stand-in payment
/// provider's database: its cost is told apart from orderflow's.
pub const PROVIDER_POSTGRES: &str = "postgres (provider)";

/// The groups that are the stand-in payment provider, not orderflow.
pub const PROVIDER_GROUPS: [&str; 2] = ["payment-provider", PROVIDER_POSTGRES];

/// Whether Postgres process `pid` is a backend connected to a benchmark's
/// provider database: a backend's command line names its database
/// (`postgres: user database host(port) state`).
fn serves_the_provider(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|line| {
        String::from_utf8_lossy(&line).contains(crate::system::PROVIDER_DATABASE_MARK)
    })
}

/// `order-processor-3` and its siblings count as one group.
fn group_of(service: &str) -> String {
    if service.starts_with("order-processor") {
        "order-processors".into()
    } else {
        service.to_string()
    }
}

impl Snapshot {
    /// What was spent since `self`, per one of `operations`.
    pub fn usage_since(&self, after: &Snapshot, operations: u64) -> Usage {
        let wall = after.at.duration_since(self.at);
        let ops = operations.max(1) as f64;
        let mut ms_per_op = BTreeMap::new();
        let mut accounted = 0.0;
        for (group, seconds) in &after.groups {
            let spent = (seconds - self.groups.get(group).copied().unwrap_or(0.0)).max(0.0);
            accounted += spent;
            ms_per_op.insert(group.clone(), spent * 1000.0 / ops);
        }
        let busy = (after.machine_busy_s - self.machine_busy_s).max(0.0);
        ms_per_op.insert("other".into(), (busy - accounted).max(0.0) * 1000.0 / ops);
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        Usage {
            wall_s: wall.as_secs_f64(),
            machine_busy_pct: percent_busy(busy, wall, cores),
            total_ms_per_op: busy.max(accounted) * 1000.0 / ops,
            ms_per_op,
        }
    }
}

fn percent_busy(busy_s: f64, wall: Duration, cores: f64) -> f64 {
    if wall.is_zero() {
        0.0
    } else {
        100.0 * busy_s / (wall.as_secs_f64() * cores)
    }
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A process's command name and its user + system CPU seconds.
fn process_cpu(pid: u32) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command is in parentheses and may itself contain spaces or ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let command = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the command: state is field 3 of proc(5), utime 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((command, (utime + stime) / TICKS_PER_SECOND))
}

/// Busy CPU seconds of the whole machine since boot (all but idle and
/// I/O wait), from the first line of /proc/stat.
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user).
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum();
    Some(busy / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_spinning_shows_up_as_the_load_generator() {
        // Spin until the kernel has charged this process the CPU time we
        // look for, however long a busy machine takes to give it: the test
        // checks where the time is counted, not how much of a core we got.
        const SPUN_S: f64 = 0.2;
        const PATIENCE: Duration = Duration::from_secs(120);
        let before = snapshot(&[]);
        let own_before = before.groups["load generator"];
        let deadline = Instant::now() + PATIENCE;
        let mut x = 0u64;
        loop {
            for _ in 0..100_000 {
                x = x.wrapping_mul(31).wrapping_add(7);
            }
            let (_, own_now) = process_cpu(std::process::id()).expect("our own /proc entry");
            if own_now - own_before >= SPUN_S {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "this process got less than {SPUN_S} s of CPU in {PATIENCE:?}"
            );
        }
        std::hint::black_box(x);
        let after = snapshot(&[]);
        let usage = before.usage_since(&after, 1);
        let own = usage.ms_per_op["load generator"];
        assert!(
            own >= SPUN_S * 1000.0,
            "{SPUN_S} s of CPU charged to this process counted as {own} ms"
        );
        assert!(usage.total_ms_per_op >= own);
        assert!(usage.machine_busy_pct > 0.0);
    }
}
