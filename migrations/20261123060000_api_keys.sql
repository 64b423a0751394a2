-- API keys: a client sends `Authorization: Bearer <key>`; only the key's
-- SHA-256 is stored. A key belongs to a client (its name); a client may hold
-- several keys (to rotate one without downtime), and sees only the orders
-- and idempotency keys made with any of them. `admin` sees everything.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    client      text NOT NULL CHECK (client ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    scope       text NOT NULL CHECK (scope IN ('client', 'admin')),
    key_hash    bytea NOT NULL UNIQUE,
    -- The key's first characters, to tell keys apart in `api-keys list`.
    key_prefix  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_client ON api_keys (client);

-- Orders placed before keys existed belong to no client: only admins see them.
ALTER TABLE orders ADD COLUMN client text;
CREATE INDEX orders_client ON orders (client, created_at);

-- Idempotency keys are each client's own namespace (as Stripe scopes them
-- per account): two clients may both send `Idempotency-Key: 1`.
ALTER TABLE idempotency_keys ADD COLUMN client text NOT NULL DEFAULT '';
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (client, idempotency_key);
ALTER TABLE idempotency_keys ALTER COLUMN client DROP DEFAULT;
