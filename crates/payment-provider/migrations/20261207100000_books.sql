-- The stand-in payment provider's books, in a database of its own: nothing
-- of orderflow's reads or writes them, and their Postgres time is told
-- apart from orderflow's by database.

-- One authorisation per merchant reference (orderflow's order id), held for
-- a manual capture: authorised -> captured | voided, or declined at once.
CREATE TABLE provider_authorisations (
    reference     uuid PRIMARY KEY,
    amount_cents  bigint NOT NULL CHECK (amount_cents >= 0),
    currency      text NOT NULL,
    state         text NOT NULL
                  CHECK (state IN ('authorised', 'declined', 'captured', 'voided')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Every request that did something, by its idempotency key: what was asked
-- (to refuse the key reused for another request), the amount moved and the
-- answer, replayed to every later request with the key.
CREATE TABLE provider_ledger (
    id               bigserial PRIMARY KEY,
    idempotency_key  text NOT NULL UNIQUE,
    operation        text NOT NULL CHECK (operation IN ('authorise', 'capture', 'void')),
    reference        uuid NOT NULL,
    request          text NOT NULL,
    amount_cents     bigint NOT NULL,
    -- authorised, declined, captured, voided, or refused: <why>.
    outcome          text NOT NULL,
    at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX provider_ledger_reference ON provider_ledger (reference);

-- How often a key was sent, failed requests included: what an injected
-- failure counts ("fail the first N calls"). Only keys of customers who ask
-- for a failure are counted.
CREATE TABLE provider_calls (
    idempotency_key  text PRIMARY KEY,
    calls            integer NOT NULL
);
