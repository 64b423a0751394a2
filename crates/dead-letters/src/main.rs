//! `dead-letters list` and `dead-letters replay (--all | --message-id ID)`.

use std::collections::BTreeMap;

use clap::{Parser, Subcommand};
use dead_letters::{Selection, list, replay};
use messaging::AmqpSettings;
use platform::{db::DatabaseSettings, event_log::EventBus, jobs::WorkQueue};

#[derive(Parser)]
#[command(
    name = "dead-letters",
    about = "Inspect and replay orderflow's dead letters (the dead-letter queue and the dead jobs)"
)]
struct Cli {
    #[command(flatten)]
    amqp: AmqpSettings,
    /// Where the orders and the jobs are: a replay accepts a held order
    /// again.
    #[command(flatten)]
    database: DatabaseSettings,
    /// Where orders wait for the processors (as the services are told):
    /// with this and EVENT_BUS both `postgres`, RabbitMQ is not asked.
    #[arg(long, env = "WORK_QUEUE", value_enum, default_value_t)]
    work_queue: WorkQueue,
    /// How the order events travel (as the services are told).
    #[arg(long, env = "EVENT_BUS", value_enum, default_value_t)]
    event_bus: EventBus,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Count the dead letters by reason and list them, oldest first.
    List,
    /// Put dead letters back on the queue they came from.
    Replay {
        /// Replay every dead letter.
        #[arg(
            long,
            conflicts_with = "message_id",
            required_unless_present = "message_id"
        )]
        all: bool,
        /// Replay only the message with this id.
        #[arg(long)]
        message_id: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let broker = cli.amqp.broker()?;
    let uses_rabbitmq = platform::settings::uses_rabbitmq(cli.work_queue, cli.event_bus);
    let queue = uses_rabbitmq.then_some(&broker);
    let pool = cli.database.connect_and_migrate().await?;
    match cli.command {
        Command::List => {
            let letters = list(queue, &pool).await?;
            match queue {
                Some(broker) => println!(
                    "{} dead letter(s) in {} and the dead jobs",
                    letters.len(),
                    broker.topology().dead_letters()
                ),
                None => println!("{} dead job(s)", letters.len()),
            }
            let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
            for letter in &letters {
                *by_reason.entry(letter.reason.as_str()).or_default() += 1;
            }
            for (reason, count) in by_reason {
                println!("  {count:>5}  {reason}");
            }
            for letter in &letters {
                println!(
                    "message {} order {} attempts {} service {} queue {} — {}",
                    letter.message_id,
                    letter.order_id,
                    letter.attempts,
                    letter.service,
                    letter.queue.as_deref().unwrap_or("?"),
                    letter.reason
                );
            }
        }
        Command::Replay { all, message_id } => {
            let selection = match (all, message_id) {
                (_, Some(id)) => Selection::MessageId(id),
                _ => Selection::All,
            };
            let replayed = replay(queue, &pool, &selection).await?;
            for letter in &replayed {
                println!(
                    "replayed message {} (order {}) onto {}",
                    letter.message_id,
                    letter.order_id,
                    letter.queue.as_deref().unwrap_or("?")
                );
            }
            println!("{} message(s) replayed", replayed.len());
        }
    }
    broker.close().await;
    Ok(())
}
