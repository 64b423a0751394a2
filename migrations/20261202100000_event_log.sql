-- order-stats: a read model built from the order-events stream. Each table is
-- written only in the transaction that also moves the reader's position, so
-- an event is counted exactly once however the reader stops.

-- Where the reader is in the stream: the next offset to read.
CREATE TABLE event_log_positions (
    stream      text PRIMARY KEY,
    next_offset bigint NOT NULL DEFAULT 0 CHECK (next_offset >= 0),
    events      bigint NOT NULL DEFAULT 0,
    skipped     bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Events already counted: the stream may hold one event twice (a publisher
-- retry after a lost confirm).
CREATE TABLE event_log_seen (
    message_id uuid PRIMARY KEY
);

-- Entries that are not order events: skipped, with why (streams have no
-- dead-lettering).
CREATE TABLE event_log_skipped (
    stream_offset bigint PRIMARY KEY,
    reason        text NOT NULL,
    payload       bytea NOT NULL,
    skipped_at    timestamptz NOT NULL DEFAULT now()
);

-- Per minute (UTC) and SKU: processed orders holding the SKU, units sold,
-- rejected orders holding it.
CREATE TABLE sales_per_minute (
    minute   timestamptz NOT NULL,
    sku      text NOT NULL,
    orders   bigint NOT NULL DEFAULT 0,
    units    bigint NOT NULL DEFAULT 0,
    rejected bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, sku)
);

-- Per minute (UTC) and currency: processed and rejected orders, and the
-- revenue of the processed ones in minor units.
CREATE TABLE revenue_per_minute (
    minute        timestamptz NOT NULL,
    currency      text NOT NULL,
    orders        bigint NOT NULL DEFAULT 0,
    rejected      bigint NOT NULL DEFAULT 0,
    revenue_cents bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, currency)
);
