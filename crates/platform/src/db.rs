//! The Postgres pool: created (with the database itself, if missing) at start,
//! waited for while Postgres is not up yet, and migrated.

use std::time::Duration;

use anyhow::Context;
use sqlx::{
    ConnectOptions, Connection, PgPool, Postgres,
    migrate::MigrateDatabase,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// The migrations in `migrations/`, embedded at compile time (no database is
/// needed to build).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// The pool size of a service that does not say otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;

/// How every service finds Postgres.
#[derive(clap::Args, Clone)]
pub struct DatabaseSettings {
    /// Postgres URL. The database is created if it does not exist.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/orderflow",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Connections in this service's pool, at most. Unset: 10 for order-api;
    /// for a consuming service, one per message it handles at once plus one
    /// (see `worker::Concurrency::plan`).
    #[arg(long, env = "DB_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub db_max_connections: Option<u32>,
    /// How long a query waits for a free connection before failing, so a
    /// request fails fast with 503 instead of hanging when Postgres is gone.
    #[arg(long, env = "DB_ACQUIRE_TIMEOUT_MS", default_value_t = 3000)]
    pub db_acquire_timeout_ms: u64,
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("database_url", &messaging::amqp::redact(&self.database_url))
            .field("db_max_connections", &self.db_max_connections)
            .finish()
    }
}

impl DatabaseSettings {
    /// Wait for Postgres, create the database if needed, apply orderflow's
    /// migrations, and return a pool.
    pub async fn connect_and_migrate(&self) -> anyhow::Result<PgPool> {
        self.connect_and_migrate_with(&MIGRATOR, Plans::Fresh).await
    }

    /// [`Self::connect_and_migrate`] with another service's migrations (the
    /// stand-in payment provider keeps its own database).
    pub async fn connect_and_migrate_with(
        &self,
        migrator: &sqlx::migrate::Migrator,
        plans: Plans,
    ) -> anyhow::Result<PgPool> {
        let shown = messaging::amqp::redact(&self.database_url);
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1u32;
        loop {
            match self.try_connect(plans).await {
                Ok(pool) => {
                    migrator
                        .run(&pool)
                        .await
                        .context("applying the database migrations")?;
                    tracing::info!(database = %shown, "connected to Postgres, schema up to date");
                    return Ok(pool);
                }
                Err(error) => tracing::warn!(
                    database = %shown, attempt, error = %format!("{error:#}"),
                    "waiting for Postgres; retrying in {delay:?}"
                ),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            attempt += 1;
        }
    }

    async fn try_connect(&self, plans: Plans) -> anyhow::Result<PgPool> {
        if !Postgres::database_exists(&self.database_url).await? {
            // Concurrent starts race here; losing the race is fine.
            if let Err(error) = Postgres::create_database(&self.database_url).await
                && !Postgres::database_exists(&self.database_url).await?
            {
                return Err(error).context("creating the database");
            }
        }
        let options: PgConnectOptions = self
            .database_url
            .parse::<PgConnectOptions>()
            .context("parsing DATABASE_URL")?
            // Failures are logged by the services, with context.
            .disable_statement_logging()
            .options([("plan_cache_mode", plans.setting())]);
        let pool = pool_options(
            self.db_max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            Duration::from_millis(self.db_acquire_timeout_ms),
        )
        .connect_with(options)
        .await?;
        Ok(pool)
    }
}

/// How a pool's connections plan their prepared statements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plans {
    /// Plan every execution for the tables as they are now. A prepared
    /// statement's generic plan is made once per connection and kept: made
    /// while the tables were empty it seq-scans them, and each batch then
    /// reads every row of a table that keeps growing (the idempotency-key
    /// claim went from a share of a millisecond to most of Postgres's CPU
    /// within a minute). orderflow's services, whose batch statements run
    /// over tables that grow.
    Fresh,
    /// Postgres's default: a generic plan once it is no worse. For
    /// statements that each look up one key of a primary or unique index
    /// (the stand-in payment provider's), where planning every execution
    /// is most of the cost.
    Kept,
}

impl Plans {
    fn setting(self) -> &'static str {
        match self {
            Plans::Fresh => "force_custom_plan",
            Plans::Kept => "auto",
        }
    }
}

/// A connection idle this long is pinged before it is handed out.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// How the services' pools hand out connections: at most `max`, waiting at
/// most `acquire_timeout` for one. A connection in steady use is handed out
/// as it is; one idle for a while (that Postgres may have closed meanwhile)
/// is pinged first and replaced if dead. sqlx's default pings every
/// connection on every acquire: a round trip more for every statement a
/// service runs outside a transaction, and for every transaction.
pub fn pool_options(max: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// Whether `error` comes from a pool that had no connection to give within
/// its acquire timeout (every connection busy, or Postgres slow or down):
/// the work that wanted one was waiting for the database, not failing.
pub fn no_connection(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::PoolTimedOut)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_timeout_is_waiting_for_the_database_and_other_errors_are_not() {
        let timed_out = anyhow::Error::from(sqlx::Error::PoolTimedOut).context("recording");
        assert!(no_connection(&timed_out));
        let failed = anyhow::Error::from(sqlx::Error::RowNotFound);
        assert!(!no_connection(&failed));
    }
}
