-- Webhooks: one delivery per event whose order has a callback_url, written
-- in the same statement as the notification; every attempt recorded. A
-- delivery whose last attempt failed stays as state 'dead': the dead-letter
-- record.
CREATE TABLE webhook_deliveries (
    id               bigserial PRIMARY KEY,
    event_id         uuid NOT NULL UNIQUE,
    order_id         uuid NOT NULL,
    url              text NOT NULL,
    body             bytea NOT NULL,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (order_id);

CREATE TABLE webhook_attempts (
    id           bigserial PRIMARY KEY,
    delivery_id  bigint NOT NULL REFERENCES webhook_deliveries (id),
    attempt      integer NOT NULL,
    status_code  integer,
    latency_ms   integer NOT NULL,
    error        text,
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id);
