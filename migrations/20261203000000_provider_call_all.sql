-- The calls a processor makes in one round reach the stand-in provider
-- together, in one statement and one transaction, as one request to a
-- provider's batch endpoint: a round of N calls was N transactions, each
-- with its own commit, and those commits were most of the commits an order
-- cost the machine. Each call is still the `provider_call` it was (counted,
-- idempotent by its key, failing on request on its own); the calls are made
-- in key order, so two batches with keys in common wait for each other
-- instead of deadlocking.
--
-- The services' connections plan every statement afresh
-- (`plan_cache_mode = force_custom_plan`, for their batch statements over
-- tables that grow); the provider's statements look up and write one key of
-- a primary or unique index each, so their plans are kept: replanning them
-- on every call was a fifth of Postgres's time.
--
-- Returns one row per call: its position in the arrays (from 1) and what
-- `provider_call` answered.
CREATE FUNCTION provider_call_all(
    p_keys         text[],
    p_operations   text[],
    p_references   uuid[],
    p_amounts      bigint[],
    p_currencies   text[],
    p_decline_over bigint,
    p_fail_up_to   integer[]
) RETURNS TABLE (n integer, calls integer, outcome text)
LANGUAGE plpgsql
SET plan_cache_mode = auto
AS $$
DECLARE
    i integer;
BEGIN
    FOR i IN SELECT k.position FROM unnest(p_keys) WITH ORDINALITY AS k(key, position) ORDER BY k.key LOOP
        n := i;
        SELECT c.calls, c.outcome INTO calls, outcome
          FROM provider_call(p_keys[i], p_operations[i], p_references[i], p_amounts[i],
                             p_currencies[i], p_decline_over, p_fail_up_to[i]) c;
        RETURN NEXT;
    END LOOP;
END;
$$;
