//! The `api-keys` command: order-api's keys, made and revoked by a person.
//! In compose: `docker compose run --rm order-api api-keys …`.

use crate::auth::{self, Scope};
use clap::{Parser, Subcommand};
use platform::db::DatabaseSettings;

#[derive(Parser)]
#[command(
    name = "api-keys",
    about = "Create, list and revoke order-api's API keys"
)]
pub struct Cli {
    #[command(flatten)]
    database: DatabaseSettings,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a key and print it: the only time it is shown.
    Create {
        /// The client the key belongs to (1-64 of a-z 0-9 . _ -); a client's
        /// keys all see the client's orders.
        #[arg(long)]
        client: String,
        /// `client` (its own orders) or `admin` (everything).
        #[arg(long, default_value = "client")]
        scope: Scope,
        /// Use this text as the key instead of a random one (16+ visible
        /// ASCII characters; for a demo key a README can show). If a live
        /// key with this text exists already, it is kept.
        #[arg(long, env = "API_KEY", hide_env_values = true)]
        key: Option<String>,
        /// Print only the key (for scripts).
        #[arg(long)]
        quiet: bool,
    },
    /// Every key: id, client, scope, the key's first characters, when made
    /// and revoked.
    List,
    /// Revoke a key by its id, or every key of a client by its name. A
    /// revoked key is refused from its next request on.
    Revoke { id_or_client: String },
}

impl Cli {
    /// Do what the command line says.
    pub async fn run(self) -> anyhow::Result<()> {
        let pool = self.database.connect_and_migrate().await?;
        match self.command {
            Command::Create {
                client,
                scope,
                key,
                quiet,
            } => {
                let made = auth::create_key(&pool, &client, scope, key.as_deref()).await?;
                if quiet {
                    println!("{}", made.key);
                } else {
                    println!(
                        "API key for client {} ({} scope, id {}):\n\n  {}\n\n\
                     Send it as `Authorization: Bearer <key>`. It is stored only as a hash: \
                     keep it now. Revoke it with `api-keys revoke {}`.",
                        made.client, made.scope, made.id, made.key, made.id
                    );
                }
            }
            Command::List => {
                let keys = auth::list(&pool).await?;
                println!("{} key(s)", keys.len());
                for key in keys {
                    println!(
                        "{}  {:<20} {:<6} {}…  made {}{}",
                        key.id,
                        key.client,
                        key.scope,
                        key.key_prefix,
                        key.created_at.format("%Y-%m-%d %H:%M:%S"),
                        key.revoked_at
                            .map(|at| format!(", revoked {}", at.format("%Y-%m-%d %H:%M:%S")))
                            .unwrap_or_default()
                    );
                }
            }
            Command::Revoke { id_or_client } => {
                let revoked = auth::revoke(&pool, &id_or_client).await?;
                println!("{revoked} key(s) revoked");
                anyhow::ensure!(
                    revoked > 0,
                    "no live key with id or client {id_or_client:?}"
                );
            }
        }
        Ok(())
    }
}
