-- The stand-in payment provider is a service of its own now, with its books
-- in its own database (crates/payment-provider/migrations): its tables and
-- functions leave orderflow's. Let the processors finish the payments under
-- way before upgrading: a payment whose authorisation was made here and is
-- captured or voided after it is refused by the new provider ("the
-- authorisation is missing") and waits for the sweeper.
DROP FUNCTION provider_call_all(text[], text[], uuid[], bigint[], text[], bigint, integer[]);
DROP FUNCTION provider_call(text, text, uuid, bigint, text, bigint, integer);
DROP TABLE provider_calls;
DROP TABLE provider_ledger;
DROP TABLE provider_authorisations;
