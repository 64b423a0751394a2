//! Putting the topology on a broker, whatever is already there: the
//! policies first (through the management API), then exchanges, queues and
//! bindings. A queue that exists with other arguments (declared by an older
//! orderflow, or by hand) cannot be redeclared (`PRECONDITION_FAILED -
//! inequivalent arg`), so it is migrated: its messages move to a holding
//! queue bound where it is bound, the old queue is deleted once empty and
//! declared anew, and the held messages move back. Nothing is lost if the
//! process dies at any step: the next start finds the holding queue and
//! finishes the move. One service migrates at a time (an exclusive queue is
//! the lock); every message moves with a publisher confirm before its ack,
//! so a crash may duplicate one, which consumers dedupe.

use std::time::Duration;

use anyhow::{Context, bail};
use lapin::{
    Channel, Connection,
    options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::FieldTable,
};

use crate::{
    Topology,
    management::Management,
    topology::{Binding, QueueSpec},
};

/// How long a service waits for another one's migration to finish.
const LOCK_WAIT: Duration = Duration::from_secs(300);

impl Topology {
    /// Apply the policies, then declare every exchange, queue and binding,
    /// migrating queues declared with other arguments. Safe to call
    /// concurrently from every service.
    pub async fn declare(
        &self,
        connection: &Connection,
        management: &Management,
    ) -> anyhow::Result<()> {
        let version = management.version().await?;
        let broker_4 = major(&version) >= 4;
        let queues = self.queues(broker_4);
        // Policies before queues: a queue must never exist, even for a
        // moment, without its dead-letter target and limits.
        for queue in &queues {
            let name = Topology::policy_name(&queue.name);
            match &queue.policy {
                Some(definition) => {
                    management
                        .put_queue_policy(&name, &queue.name, definition)
                        .await?
                }
                None => management.delete_policy(&name).await?,
            }
        }
        let channel = connection.create_channel().await?;
        for (exchange, kind) in self.exchanges() {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("declaring the exchange {exchange}"))?;
        }
        let _ = channel.close(200, "exchanges declared".into()).await;
        for queue in &queues {
            self.declare_queue(connection, management, queue)
                .await
                .with_context(|| format!("declaring the queue {}", queue.name))?;
        }
        self.retire_legacy_retry_queues(connection, management)
            .await
            .context("retiring the retry queues of an older release")
    }

    /// Declare one queue (migrating it if it exists with other arguments),
    /// bind it, and finish a migration an earlier process left half done.
    async fn declare_queue(
        &self,
        connection: &Connection,
        management: &Management,
        queue: &QueueSpec,
    ) -> anyhow::Result<()> {
        match self.try_declare(connection, &queue.name).await {
            Ok(()) => {}
            Err(error) if is_soft(&error, AMQPSoftError::PRECONDITIONFAILED) => {
                let found = management
                    .queue(&queue.name)
                    .await?
                    .map(|q| q.arguments)
                    .unwrap_or_default();
                tracing::warn!(
                    queue = %queue.name, found = %serde_json::Value::Object(found.clone()),
                    "the queue exists with other arguments ({}); moving its messages to a queue \
                     declared as orderflow declares it (its limits and dead-letter target now \
                     come from the policy {})",
                    error, Topology::policy_name(&queue.name)
                );
                let lock = MigrationLock::acquire(connection, &self.migration_lock()).await?;
                let migrated = self.migrate(connection, queue).await;
                lock.release().await;
                migrated.with_context(|| {
                    format!(
                        "the queue {} exists with the arguments {} and could not be migrated; \
                         to fix it by hand, move its messages elsewhere, delete it \
                         (rabbitmqctl delete_queue {}) and start the service again",
                        queue.name,
                        serde_json::Value::Object(found),
                        queue.name
                    )
                })?;
            }
            Err(error) => return Err(error.into()),
        }
        let channel = connection.create_channel().await?;
        for binding in &queue.bindings {
            bind(&channel, &queue.name, binding).await?;
        }
        let _ = channel.close(200, "bound".into()).await;
        let holding = holding_queue(&queue.name);
        if management.queue(&holding).await?.is_some() {
            let lock = MigrationLock::acquire(connection, &self.migration_lock()).await?;
            let finished = self.finish_migration(connection, queue).await;
            lock.release().await;
            finished?;
        }
        Ok(())
    }

    async fn try_declare(&self, connection: &Connection, queue: &str) -> lapin::Result<()> {
        let channel = connection.create_channel().await?;
        let declared = declare_quorum(&channel, queue, self.queue_arguments()).await;
        if declared.is_ok() {
            let _ = channel.close(200, "declared".into()).await;
        }
        declared
    }

    fn migration_lock(&self) -> String {
        format!("{}.migration-lock", self.dead_letters())
    }

    /// Move every message of `queue` to its holding queue, which takes
    /// `queue`'s bindings so nothing published meanwhile is lost, delete it
    /// once empty and declare it anew. [`Self::finish_migration`] moves the
    /// messages back.
    async fn migrate(&self, connection: &Connection, queue: &QueueSpec) -> anyhow::Result<()> {
        // Another service may have migrated it while we waited for the lock.
        if self.try_declare(connection, &queue.name).await.is_ok() {
            return Ok(());
        }
        let holding = holding_queue(&queue.name);
        let channel = connection.create_channel().await?;
        declare_quorum(&channel, &holding, self.queue_arguments()).await?;
        for binding in &queue.bindings {
            bind(&channel, &holding, binding).await?;
            unbind(&channel, &queue.name, binding).await?;
        }
        let _ = channel.close(200, "holding queue bound".into()).await;
        drain_and_delete(connection, &queue.name, &holding).await?;
        self.try_declare(connection, &queue.name)
            .await
            .context("declaring the queue anew")?;
        Ok(())
    }

    /// Move the held messages back onto the (re)declared, bound `queue` and
    /// delete the holding queue.
    async fn finish_migration(
        &self,
        connection: &Connection,
        queue: &QueueSpec,
    ) -> anyhow::Result<()> {
        let holding = holding_queue(&queue.name);
        let channel = connection.create_channel().await?;
        for binding in &queue.bindings {
            unbind(&channel, &holding, binding).await?;
        }
        let _ = channel.close(200, "unbound".into()).await;
        let moved = drain_and_delete(connection, &holding, &queue.name).await?;
        tracing::warn!(queue = %queue.name, moved, "queue migrated: its messages are back in it");
        Ok(())
    }

    /// Delete the retry queues of older orderflow versions once they are
    /// empty; until then they still send their messages back on time. Asked
    /// of the management API first: a passive declare of a queue that is not
    /// there closes its channel, which lapin and the broker log as errors on
    /// every fresh start.
    async fn retire_legacy_retry_queues(
        &self,
        connection: &Connection,
        management: &Management,
    ) -> anyhow::Result<()> {
        for queue in self.consumer_queues() {
            let legacy = self.legacy_retry_queue(&queue);
            if management.queue(&legacy).await?.is_none() {
                continue;
            }
            match queue_counts(connection, &legacy)
                .await?
                .map(|(ready, _)| ready)
            {
                None => {}
                Some(0) => {
                    delete_queue(connection, &legacy).await?;
                    tracing::info!(queue = %legacy, "retired the empty retry queue of an older release");
                }
                Some(waiting) => tracing::info!(
                    queue = %legacy, waiting,
                    "a retry queue of an older release still holds messages; they return to \
                     {queue} when due, and the queue is deleted once empty"
                ),
            }
        }
        Ok(())
    }

    /// Delete every queue, exchange and policy of a throwaway topology (a
    /// test's, a benchmark's), as far as it goes: failures are skipped.
    pub async fn delete(&self, connection: &Connection, management: &Management) {
        let Ok(channel) = connection.create_channel().await else {
            return;
        };
        let mut queues = self.all_queues();
        // Retry queues of delays this handle does not know, holding queues.
        if let Some(prefix) = self.prefix() {
            queues.extend(
                management
                    .queue_names(&format!("{prefix}."))
                    .await
                    .unwrap_or_default(),
            );
        }
        queues.sort();
        queues.dedup();
        for queue in queues {
            let _ = channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
            let _ = management
                .delete_policy(&Topology::policy_name(&queue))
                .await;
        }
        for (exchange, _) in self.exchanges() {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
        let _ = channel.close(200, "deleted".into()).await;
    }
}

/// Where a queue's messages wait while the queue is declared anew.
fn holding_queue(queue: &str) -> String {
    format!("{queue}.migrating")
}

fn major(version: &str) -> u32 {
    version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

fn is_soft(error: &lapin::Error, kind: AMQPSoftError) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if *e.kind() == AMQPErrorKind::Soft(kind))
}

async fn declare_quorum(channel: &Channel, queue: &str, args: FieldTable) -> lapin::Result<()> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    Ok(())
}

async fn bind(channel: &Channel, queue: &str, binding: &Binding) -> anyhow::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            binding.exchange.as_str().into(),
            binding.key.as_str().into(),
            QueueBindOptions::default(),
            binding.arguments.clone(),
        )
        .await
        .with_context(|| format!("binding {queue} to {}", binding.exchange))
}

async fn unbind(channel: &Channel, queue: &str, binding: &Binding) -> anyhow::Result<()> {
    channel
        .queue_unbind(
            queue.into(),
            binding.exchange.as_str().into(),
            binding.key.as_str().into(),
            binding.arguments.clone(),
        )
        .await
        .with_context(|| format!("unbinding {queue} from {}", binding.exchange))
}

/// Messages ready in `queue` and its consumers (a passive declare on a
/// channel of its own), or `None` if there is no such queue.
pub async fn queue_counts(
    connection: &Connection,
    queue: &str,
) -> anyhow::Result<Option<(u32, u32)>> {
    let channel = connection.create_channel().await?;
    match counts_on(&channel, queue).await {
        Ok(counts) => {
            let _ = channel.close(200, "counted".into()).await;
            Ok(Some(counts))
        }
        Err(error) if is_soft(&error, AMQPSoftError::NOTFOUND) => Ok(None),
        Err(error) => Err(error).with_context(|| format!("counting the messages in {queue}")),
    }
}

/// Messages ready in `queue` and its consumers, by a passive declare on
/// `channel` (which the broker closes if there is no such queue).
pub async fn counts_on(channel: &Channel, queue: &str) -> lapin::Result<(u32, u32)> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((declared.message_count(), declared.consumer_count()))
}

async fn delete_queue(connection: &Connection, queue: &str) -> anyhow::Result<u32> {
    let channel = connection.create_channel().await?;
    // Not `if_empty`: quorum queues refuse it (NOT_IMPLEMENTED, a
    // connection error); callers check the depth first.
    let deleted = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .with_context(|| format!("deleting {queue}"))?;
    let _ = channel.close(200, "deleted".into()).await;
    Ok(deleted)
}

/// Move every message of `from` (which nothing routes to any more) onto
/// `to`, then delete `from`; returns how many moved.
async fn drain_and_delete(connection: &Connection, from: &str, to: &str) -> anyhow::Result<u64> {
    let mut moved = 0;
    loop {
        moved += move_messages(connection, from, to).await?;
        match queue_counts(connection, from).await? {
            None | Some((0, 0)) => break,
            // Deleting the queue would drop what a consumer still holds (an
            // older release still running): wait for it to let go.
            Some((_, consumers)) if consumers > 0 => {
                tracing::warn!(queue = %from, consumers, "waiting for the queue's consumers (an older release?) to stop before migrating it");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Some(_) => {}
        }
    }
    let lost = delete_queue(connection, from).await?;
    if lost > 0 {
        tracing::error!(queue = %from, lost, "messages reached the queue in the instant before it was deleted");
    }
    tracing::info!(from = %from, to = %to, moved, "messages moved");
    Ok(moved)
}

/// Move every message of `from` onto `to`, each confirmed before its ack;
/// returns how many.
async fn move_messages(connection: &Connection, from: &str, to: &str) -> anyhow::Result<u64> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut moved = 0;
    while let Some(message) = channel
        .basic_get(from.into(), BasicGetOptions::default())
        .await
        .with_context(|| format!("reading {from}"))?
    {
        let delivery = message.delivery;
        let confirm = channel
            .basic_publish(
                "".into(),
                to.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &delivery.data,
                delivery.properties.clone(),
            )
            .await?
            .await?;
        match confirm {
            lapin::Confirmation::Ack(None) => {}
            other => bail!("moving a message from {from} to {to} was not confirmed: {other:?}"),
        }
        delivery.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    let _ = channel.close(200, "moved".into()).await;
    Ok(moved)
}

/// Held while a queue is migrated: an exclusive queue, which the broker lets
/// only one connection have and deletes if that connection dies.
struct MigrationLock {
    channel: Channel,
    name: String,
}

impl MigrationLock {
    async fn acquire(connection: &Connection, name: &str) -> anyhow::Result<Self> {
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        loop {
            let channel = connection.create_channel().await?;
            let declared = channel
                .queue_declare(
                    name.into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(_) => {
                    return Ok(Self {
                        channel,
                        name: name.to_owned(),
                    });
                }
                Err(error) if is_soft(&error, AMQPSoftError::RESOURCELOCKED) => {
                    if tokio::time::Instant::now() > deadline {
                        bail!("another service has been migrating queues for {LOCK_WAIT:?}");
                    }
                    tracing::info!("another service is migrating queues; waiting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => return Err(error).context("taking the migration lock"),
            }
        }
    }

    async fn release(self) {
        let _ = self
            .channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self.channel.close(200, "migrated".into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::major;

    #[test]
    fn the_major_version_decides_the_broker_generation() {
        assert_eq!(major("3.10.8"), 3);
        assert_eq!(major("4.0.5"), 4);
        assert_eq!(major("unknown"), 0);
    }
}
