-- The order events on Postgres (EVENT_BUS=postgres): a log appended in the
-- transaction that decides each order, read by each subscriber from its own
-- stored position.
--
-- A bigserial is taken at INSERT but seen at COMMIT, so a reader that
-- follows ids alone would pass an id still being committed and never see
-- it. Each row therefore carries the id of the transaction that wrote it,
-- and readers page by (transaction_id, id), reading only what the oldest
-- transaction still running cannot precede (`transaction_id <
-- pg_snapshot_xmin(pg_current_snapshot())`): every row they pass is
-- committed, and nothing can appear behind them.
CREATE TABLE events (
    transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
    id             bigserial,
    message_id     uuid NOT NULL UNIQUE,
    order_id       uuid NOT NULL,
    correlation_id text NOT NULL,
    -- An `OrderEvent`, as JSON.
    body           jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (transaction_id, id)
);

-- Where each reader is: the last (transaction_id, id) it has handled.
CREATE TABLE event_readers (
    reader         text PRIMARY KEY,
    transaction_id xid8 NOT NULL DEFAULT '0',
    id             bigint NOT NULL DEFAULT 0,
    events         bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Readers wait on this channel; a statement that appends events sends one
-- notification (none if it appended nothing), and Postgres folds a
-- transaction's identical ones into one.
CREATE FUNCTION events_appended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM appended) THEN
        PERFORM pg_notify('orderflow_events', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_appended AFTER INSERT ON events
    REFERENCING NEW TABLE AS appended
    FOR EACH STATEMENT EXECUTE FUNCTION events_appended();
