//! `api-keys create --client NAME [--scope client|admin]`, `api-keys list`
//! and `api-keys revoke (ID | CLIENT)`: order-api's keys, made and revoked
//! by a person. In compose: `docker compose run --rm order-api api-keys …`.

use clap::Parser;
use order_api::keys_cli::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Cli::parse().run().await
}
