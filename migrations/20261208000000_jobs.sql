-- The work queue on Postgres (WORK_QUEUE=postgres): one row per order
-- message, written by order-api in the order's own transaction, claimed by
-- processors with FOR UPDATE SKIP LOCKED and deleted once handled, so the
-- table only holds what is waiting, running or dead.
--
-- `run_at` is when the row may next be claimed: its retry time while it is
-- available, the end of its lease while it is running (a running job whose
-- lease has run out is claimed again, by anyone). `lease` fences a claim:
-- only the claimant holding the current lease can settle the row.
CREATE TABLE jobs (
    id             bigserial PRIMARY KEY,
    order_id       uuid NOT NULL REFERENCES orders (id),
    message_id     uuid NOT NULL,
    lane           text NOT NULL CHECK (lane IN ('standard', 'express')),
    -- Express before standard: the claim orders by this first.
    priority       smallint GENERATED ALWAYS AS (CASE lane WHEN 'express' THEN 0 ELSE 1 END) STORED,
    body           jsonb NOT NULL,
    correlation_id text NOT NULL,
    state          text NOT NULL DEFAULT 'available'
                   CHECK (state IN ('available', 'running', 'dead')),
    run_at         timestamptz NOT NULL DEFAULT now(),
    -- Failed attempts so far (a retry counts one; a wait for a connection
    -- and a lease that ran out do not).
    attempts       integer NOT NULL DEFAULT 0,
    -- Claims so far: claims far beyond the attempts mean the job's
    -- processors died holding it.
    claims         integer NOT NULL DEFAULT 0,
    lease          uuid,
    leased_by      text,
    -- Why it was last retried, or why it is dead.
    reason         text,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- The claim's index: only rows that can be claimed, in claim order.
CREATE INDEX jobs_claimable ON jobs (priority, run_at, id) WHERE state <> 'dead';
CREATE INDEX jobs_dead ON jobs (id) WHERE state = 'dead';

-- Every row is inserted, updated once or twice and deleted within seconds:
-- vacuum after a fixed number of dead rows rather than a fraction of a
-- table that is nearly empty when it is healthy (Oban's advice).
ALTER TABLE jobs SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 1000
);
