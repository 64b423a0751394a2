//! Which deliveries of a channel may be acked, and when: one `multiple`
//! ack for every ready delivery that no unsettled one precedes.

use lapin::{Acker, options::BasicAckOptions};

/// Log a settlement that did not reach the broker.
pub(super) fn report(settled: lapin::Result<bool>) {
    match settled {
        Ok(true) => {}
        // The channel went away since the delivery: the broker requeues
        // it, and the idempotent handler skips the redelivery.
        Ok(false) => tracing::warn!("delivery not settled: it will be redelivered"),
        Err(error) => {
            tracing::warn!(error = %error, "settling the delivery failed: it will be redelivered")
        }
    }
}

/// The deliveries of one channel not yet settled, by delivery tag: `None`
/// while being handled, the acker once ready to be acked. A `multiple` ack
/// covers every earlier unsettled delivery of the channel, so it is sent
/// for the last of the ready deliveries that no unsettled one precedes; and
/// never for a tag settled before (which would close the channel).
#[derive(Default)]
pub(super) struct AckWindow {
    unsettled: std::sync::Mutex<std::collections::BTreeMap<u64, Option<Acker>>>,
    /// Held while acking, so acks leave in the order of their tags.
    acking: tokio::sync::Mutex<()>,
}

impl AckWindow {
    fn slots(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, Option<Acker>>> {
        self.unsettled
            .lock()
            .expect("the ack window is never poisoned")
    }

    pub(super) fn received(&self, tag: u64) {
        self.slots().insert(tag, None);
    }

    pub(super) fn ready(&self, tag: u64, acker: Acker) {
        self.slots().insert(tag, Some(acker));
    }

    /// Whether no delivery is in hand: none being handled, none waiting
    /// for its ack.
    pub(super) fn holds_nothing(&self) -> bool {
        self.slots().is_empty()
    }

    /// Settled on its own (retried, dead-lettered, handed back).
    pub(super) fn settled(&self, tag: u64) {
        self.slots().remove(&tag);
    }

    /// Ack every ready delivery: those that no unsettled one precedes in
    /// one `multiple` ack, the others (behind a delivery still being
    /// handled, which may take long) one by one, so none waits for it.
    pub(super) async fn flush(&self) {
        let _acking = self.acking.lock().await;
        let (last, behind) = {
            let mut slots = self.slots();
            let mut last = None;
            while let Some(slot) = slots.first_entry() {
                if slot.get().is_none() {
                    break;
                }
                last = slot.remove();
            }
            let behind: Vec<u64> = slots
                .iter()
                .filter_map(|(tag, slot)| slot.as_ref().map(|_| *tag))
                .collect();
            let behind: Vec<Acker> = behind
                .into_iter()
                .filter_map(|tag| slots.remove(&tag).flatten())
                .collect();
            (last, behind)
        };
        if let Some(acker) = last {
            report(acker.ack(BasicAckOptions { multiple: true }).await);
        }
        for acker in behind {
            report(acker.ack(BasicAckOptions::default()).await);
        }
    }
}
