//! One order event: "send" the customer's email (a row and a log line a
//! person would want to read) and note it in the order's history, once.

use messaging::contracts::{OrderEvent, Outcome, PaymentOutcome, display_amount};
use platform::dedupe::FIRST_DELIVERY_CTE;
use sqlx::PgPool;

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

/// Send the notification for `event` unless it was sent before; returns
/// whether it was sent now.
pub async fn notify(pool: &PgPool, event: &OrderEvent) -> anyhow::Result<bool> {
    let (subject, body) = compose(event);
    let sent = sqlx::query(&format!(
        "WITH {FIRST_DELIVERY_CTE},
         sent AS (
             INSERT INTO notifications (event_id, order_id, channel, recipient, subject, body)
             SELECT $2, $3, 'email', $4, $5, $6 FROM first RETURNING order_id),
         hook AS (
             INSERT INTO webhook_deliveries (event_id, order_id, url, body)
             SELECT $2, $3, $8, $9 FROM first WHERE $8::text IS NOT NULL)
         INSERT INTO order_status_history (order_id, status, detail, service)
         SELECT order_id, 'notified', $7, 'notification-service' FROM sent"
    ))
    .bind(CONSUMER)
    .bind(event.message_id)
    .bind(event.order_id)
    .bind(&event.email)
    .bind(&subject)
    .bind(&body)
    .bind(format!("email to {}: {subject}", event.email))
    // The webhook, if the order asked for one: the event as sent on the fanout.
    .bind(&event.callback_url)
    .bind(serde_json::to_vec(event)?)
    .execute(pool)
    .await?
    .rows_affected()
        == 1;
    if sent {
        tracing::info!(to = %messaging::privacy::email(&event.email), subject = %subject, "email sent: {body}");
    }
    Ok(sent)
}
