-- The whole orderflow schema. Every service applies migrations at start;
-- sqlx serialises concurrent runs with an advisory lock.

CREATE TABLE inventory (
    sku          text PRIMARY KEY,
    name         text NOT NULL,
    price_cents  bigint NOT NULL CHECK (price_cents >= 0),
    -- The CHECK is the last line of defence: reservations use a guarded
    -- UPDATE, so stock never goes negative even with processors racing.
    stock        integer NOT NULL CHECK (stock >= 0)
);

CREATE TABLE orders (
    id              uuid PRIMARY KEY,
    customer_id     text NOT NULL,
    email           text NOT NULL,
    items           jsonb NOT NULL,
    total_cents     bigint NOT NULL,
    currency        text NOT NULL,
    lane            text NOT NULL CHECK (lane IN ('standard', 'express')),
    shipping        jsonb,
    callback_url    text,
    status          text NOT NULL CHECK (status IN ('accepted', 'processed', 'rejected')),
    reason          text,
    processed_by    text,
    correlation_id  text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_customer_id ON orders (customer_id);

CREATE TABLE order_status_history (
    id          bigserial PRIMARY KEY,
    order_id    uuid NOT NULL REFERENCES orders (id),
    status      text NOT NULL,
    detail      text,
    service     text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_status_history_order ON order_status_history (order_id, id);

CREATE TABLE idempotency_keys (
    idempotency_key  text PRIMARY KEY,
    request_hash     text NOT NULL,
    response_status  smallint NOT NULL,
    -- The exact bytes first sent, so a replay is byte-for-byte the same.
    response_body    bytea NOT NULL,
    order_id         uuid NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    message_id      uuid NOT NULL UNIQUE,
    exchange        text NOT NULL,
    routing_key     text NOT NULL,
    payload         jsonb NOT NULL,
    correlation_id  text NOT NULL,
    order_id        uuid NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

CREATE TABLE processed_messages (
    consumer      text NOT NULL,
    message_id    uuid NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

CREATE TABLE notifications (
    id          bigserial PRIMARY KEY,
    event_id    uuid NOT NULL UNIQUE,
    order_id    uuid NOT NULL,
    channel     text NOT NULL,
    recipient   text NOT NULL,
    subject     text NOT NULL,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE audit_log (
    id              bigserial PRIMARY KEY,
    event_id        uuid NOT NULL UNIQUE,
    order_id        uuid NOT NULL,
    event_type      text NOT NULL,
    correlation_id  text NOT NULL,
    payload         jsonb NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_order ON audit_log (order_id);

-- Enough stock that a newcomer's first orders succeed, and one scarce item
-- to watch a rejection happen.
INSERT INTO inventory (sku, name, price_cents, stock) VALUES
    ('WIDGET', 'Widget', 1999, 1000000),
    ('GADGET', 'Gadget', 4950, 1000000),
    ('GIZMO', 'Gizmo', 12500, 1000000),
    ('LIMITED-EDITION', 'Limited edition print', 99900, 5);
