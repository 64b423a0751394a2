//! How many messages a service has in hand at once, and the pool that
//! serves them, bounded by each other.

use messaging::consumer::Batching;

use super::WorkerSettings;

/// Connections kept for what a service does besides handling messages: its
/// outbox relay, webhook dispatcher or payment sweeper, and health checks.
const RESERVED_CONNECTIONS: u32 = 1;

/// How many messages a service has in hand at once, and the pool that
/// serves them: each batch (see [`messaging::consumer::ConsumerSpec::batch_size`])
/// holds at most one connection at a time, and a consumer handles
/// PREFETCH / BATCH_SIZE batches at once, so a pool with fewer connections
/// than that makes batches time out waiting for one while the database is
/// merely slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    /// Prefetch of each consumer: how many of its messages are in hand.
    pub prefetch: u16,
    /// Connections in the pool.
    pub pool: u32,
}

impl Concurrency {
    /// Bound PREFETCH on `queues` queues and DB_MAX_CONNECTIONS by each
    /// other. Unset, the pool is sized to the batches handled at once. Set,
    /// it is a limit someone chose (Postgres serves every service from one
    /// `max_connections`), so it is kept and the prefetch lowered to fit,
    /// with a warning naming both: the service runs, slower, rather than
    /// refusing to start or opening more connections than allowed.
    pub fn plan(settings: &WorkerSettings, queues: usize) -> Self {
        let queues = u32::try_from(queues.max(1)).unwrap_or(u32::MAX);
        let prefetch = settings.prefetch.max(1);
        let batches = |prefetch| u32::from(Batching::of(prefetch, settings.batch_size).batches);
        let needed = batches(prefetch)
            .saturating_mul(queues)
            .saturating_add(RESERVED_CONNECTIONS);
        match settings.service.database.db_max_connections {
            None => Self {
                prefetch,
                pool: needed,
            },
            Some(pool) if pool >= needed => Self { prefetch, pool },
            Some(pool) => {
                let fits = (pool.saturating_sub(RESERVED_CONNECTIONS) / queues).max(1);
                let lowered = (1..prefetch)
                    .rev()
                    .find(|&p| batches(p) <= fits)
                    .unwrap_or(1);
                tracing::warn!(
                    "DB_MAX_CONNECTIONS={pool} is too small for PREFETCH={prefetch} with \
                     BATCH_SIZE={} on {queues} queue(s) ({} batches handled at once, each \
                     holding a connection, plus {RESERVED_CONNECTIONS} for the service's own \
                     work): keeping {lowered} per queue in hand instead; set DB_MAX_CONNECTIONS \
                     to at least {needed}, or leave it unset to size the pool from PREFETCH and \
                     BATCH_SIZE",
                    settings.batch_size,
                    needed - RESERVED_CONNECTIONS
                );
                Self {
                    prefetch: lowered,
                    pool,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerSettings,
    }

    fn settings(prefetch: u16, batch_size: u16, pool: Option<u32>) -> WorkerSettings {
        let mut settings = Cli::parse_from(["worker"]).worker;
        settings.prefetch = prefetch;
        settings.batch_size = batch_size;
        settings.service.database.db_max_connections = pool;
        settings
    }

    #[test]
    fn an_unset_pool_is_sized_for_every_batch_handled_at_once_and_one_more() {
        // The defaults: 40 in hand in batches of 20, on two lanes.
        let planned = Concurrency::plan(&settings(40, 20, None), 2);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 40,
                pool: 5
            }
        );
        // Without batching, one connection per message in hand.
        let planned = Concurrency::plan(&settings(10, 1, None), 2);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 10,
                pool: 21
            }
        );
    }

    #[test]
    fn a_pool_big_enough_is_kept_as_set() {
        let planned = Concurrency::plan(&settings(10, 1, Some(40)), 1);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 10,
                pool: 40
            }
        );
    }

    #[test]
    fn a_pool_too_small_keeps_its_size_and_lowers_the_prefetch_to_fit() {
        let planned = Concurrency::plan(&settings(10, 1, Some(9)), 2);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 4,
                pool: 9
            }
        );
        // Two batches of 20 per queue would need 5; one batch at a time
        // is one message at a time.
        let planned = Concurrency::plan(&settings(40, 20, Some(3)), 2);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 1,
                pool: 3
            }
        );
        // Eight batches of 5 would need 9; three fit: 15 in hand.
        let planned = Concurrency::plan(&settings(40, 5, Some(4)), 1);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 15,
                pool: 4
            }
        );
    }

    #[test]
    fn even_a_one_connection_pool_handles_one_batch_per_queue() {
        let planned = Concurrency::plan(&settings(10, 1, Some(1)), 2);
        assert_eq!(
            planned,
            Concurrency {
                prefetch: 1,
                pool: 1
            }
        );
    }
}
