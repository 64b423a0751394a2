-- Money in two steps, as payment providers offer it: authorise, then
-- capture once the stock is reserved, or void when the order is rejected.

-- The stand-in payment provider's own books, which orderflow reaches only
-- through the provider's calls (crates/order-processor/src/payment/provider.rs).
-- One authorisation per merchant reference (the order id), and a ledger of
-- every request that did something, keyed by the idempotency key the caller
-- gave: the same request sent again finds its row and does nothing.
CREATE TABLE provider_authorisations (
    reference     uuid PRIMARY KEY,
    amount_cents  bigint NOT NULL CHECK (amount_cents >= 0),
    currency      text NOT NULL,
    state         text NOT NULL
                  CHECK (state IN ('authorised', 'declined', 'captured', 'voided')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX provider_authorisations_open ON provider_authorisations (reference)
    WHERE state = 'authorised';

CREATE TABLE provider_ledger (
    id               bigserial PRIMARY KEY,
    idempotency_key  text NOT NULL UNIQUE,
    operation        text NOT NULL CHECK (operation IN ('authorise', 'capture', 'void')),
    reference        uuid NOT NULL,
    amount_cents     bigint NOT NULL,
    -- What the provider answered: authorised, declined, captured, voided,
    -- or refused: <why>.
    outcome          text NOT NULL,
    at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX provider_ledger_reference ON provider_ledger (reference);

-- How often each idempotency key was sent, failed calls included: what the
-- provider's demo failures count ("fail the first N calls").
CREATE TABLE provider_calls (
    idempotency_key  text PRIMARY KEY,
    calls            integer NOT NULL
);

-- orderflow's side: where each order's payment stands. A payment moves
-- authorising -> authorised | declined; authorised -> capturing (stock
-- reserved) | voiding (rejected); capturing -> captured and voiding ->
-- voided in the same transaction that gives the order its final status.
CREATE TABLE payments (
    order_id      uuid PRIMARY KEY REFERENCES orders (id),
    -- The order message that started it, recorded as handled when the
    -- payment settles (by a delivery or by the sweeper).
    message_id    uuid NOT NULL,
    amount_cents  bigint NOT NULL,
    currency      text NOT NULL,
    state         text NOT NULL CHECK (state IN (
                      'authorising', 'authorised', 'declined',
                      'capturing', 'captured', 'voiding', 'voided')),
    -- Why the authorisation is being voided (the order's rejection reason).
    reason        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_unsettled ON payments (updated_at)
    WHERE state IN ('authorising', 'authorised', 'capturing', 'voiding');

CREATE TABLE payment_history (
    id        bigserial PRIMARY KEY,
    order_id  uuid NOT NULL REFERENCES orders (id),
    state     text NOT NULL,
    detail    text NOT NULL,
    service   text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payment_history_order ON payment_history (order_id, id);
