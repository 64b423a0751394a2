//! One order event: "send" the customer's email (a row and a log line a
//! person would want to read) and note it in the order's history, once.

use messaging::contracts::{OrderEvent, Outcome, PaymentOutcome, display_amount};
use std::collections::HashSet;

use platform::worker::{EventHandler, Received};
use sqlx::PgPool;
use uuid::Uuid;

/// Name under which this service records the events it handled.
pub const CONSUMER: &str = "notification-service";

/// The email for an event.
pub fn compose(event: &OrderEvent) -> (String, String) {
    let short = &event.order_id.to_string()[..8];
    let amount = display_amount(event.total_cents, &event.currency);
    let subject = match &event.outcome {
        Outcome::Processed => format!("Your order {short} is confirmed"),
        Outcome::Rejected { .. } => format!("We could not complete your order {short}"),
    };
    let id = event.order_id;
    let body = match (&event.outcome, event.payment) {
        (Outcome::Processed, Some(PaymentOutcome::Captured)) => format!(
            "Thank you! Order {id} is confirmed: its items are reserved and {amount} has been charged."
        ),
        (Outcome::Rejected { reason }, Some(PaymentOutcome::Declined)) => format!(
            "Sorry: order {id} was not completed ({reason}). Your payment of {amount} was declined; \
             you have not been charged."
        ),
        (Outcome::Rejected { reason }, Some(PaymentOutcome::Voided)) => format!(
            "Sorry: order {id} was not completed ({reason}). The {amount} held on your card has been \
             released; you have not been charged."
        ),
        // An event from before payments were two steps says nothing of the
        // money, and neither does its email.
        (Outcome::Processed, _) => {
            format!("Thank you! Order {id} for {amount} is confirmed: its items are reserved.")
        }
        (Outcome::Rejected { reason }, _) => {
            format!("Sorry: order {id} for {amount} was not completed ({reason}).")
        }
    };
    (subject, body)
}

/// The customer's emails and webhooks, as an [`EventHandler`].
#[derive(Clone)]
pub struct Notifier {
    pub pool: PgPool,
}

impl EventHandler for Notifier {
    async fn handle(&self, received: &Received) -> anyhow::Result<bool> {
        notify(&self.pool, &received.event).await
    }

    async fn handle_batch(&self, received: &[Received]) -> anyhow::Result<Vec<bool>> {
        let events: Vec<&OrderEvent> = received.iter().map(|r| &r.event).collect();
        let sent = notify_all(&self.pool, &events).await?;
        for (received, sent) in received.iter().zip(&sent) {
            if *sent {
                received.span().in_scope(|| sent_log(&received.event));
            }
        }
        Ok(sent)
    }
}

/// Send the notification for `event` unless it was sent before; returns
/// whether it was sent now.
pub async fn notify(pool: &PgPool, event: &OrderEvent) -> anyhow::Result<bool> {
    let sent = notify_all(pool, &[event]).await?[0];
    if sent {
        sent_log(event);
    }
    Ok(sent)
}

fn sent_log(event: &OrderEvent) {
    let (subject, body) = compose(event);
    tracing::info!(to = %messaging::privacy::email(&event.email), subject = %subject, "email sent: {body}");
}

/// Send the notification of every event not handled before, in one
/// statement: `first_handled` (the consumer-side dedupe, a function in the
/// migrations) records the events' ids, and only those it had not recorded
/// before get their email, webhook and line of history. Returns, per
/// event, whether it was sent now (of one event sent twice in the batch,
/// the first).
async fn notify_all(pool: &PgPool, events: &[&OrderEvent]) -> anyhow::Result<Vec<bool>> {
    let mut ids = (Vec::new(), Vec::new());
    let mut texts = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut hooks = Vec::new();
    for event in events {
        let (subject, body) = compose(event);
        ids.0.push(event.message_id);
        ids.1.push(event.order_id);
        texts.0.push(event.email.clone());
        texts.2.push(body);
        texts.3.push(format!("email to {}: {subject}", event.email));
        texts.1.push(subject);
        texts.4.push(event.callback_url.clone());
        // The webhook, if the order asked for one: the event as sent on the fanout.
        hooks.push(serde_json::to_vec(event)?);
    }
    let sent = sqlx::query_scalar!(
        r#"WITH batch AS (
             SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                                  $7::text[], $8::text[], $9::bytea[])
                 AS b(event_id, order_id, recipient, subject, body, detail, url, hook)),
         first AS (SELECT message_id FROM first_handled($1, ARRAY(SELECT event_id FROM batch))),
         fresh AS (
             SELECT DISTINCT ON (b.event_id) b.* FROM batch b JOIN first f ON f.message_id = b.event_id),
         sent AS (
             INSERT INTO notifications (event_id, order_id, channel, recipient, subject, body)
             SELECT event_id, order_id, 'email', recipient, subject, body FROM fresh),
         hook AS (
             INSERT INTO webhook_deliveries (event_id, order_id, url, body)
             SELECT event_id, order_id, url, hook FROM fresh WHERE url IS NOT NULL),
         noted AS (
             INSERT INTO order_status_history (order_id, status, detail, service)
             SELECT order_id, 'notified', detail, 'notification-service' FROM fresh)
         SELECT event_id AS "event_id!" FROM fresh"#,
        CONSUMER,
        &ids.0,
        &ids.1,
        &texts.0,
        &texts.1,
        &texts.2,
        &texts.3,
        &texts.4 as &[Option<String>],
        &hooks,
    )
    .fetch_all(pool)
    .await?;
    let mut fresh: HashSet<Uuid> = sent.into_iter().collect();
    Ok(events
        .iter()
        .map(|event| fresh.remove(&event.message_id))
        .collect())
}
