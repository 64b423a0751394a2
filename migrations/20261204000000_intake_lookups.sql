-- The lookups on order-api's request path, in functions whose plans are
-- kept. The services' connections plan every statement afresh
-- (`plan_cache_mode = force_custom_plan`): a generic plan made while a table
-- is empty seq-scans it, even for a primary key, and keeps doing so as the
-- table grows. These functions keep their plans (`auto`) and leave the
-- planner only nested loops over index lookups (no sequential scans, hash or
-- merge joins), so a plan made on an empty table still looks each key up by
-- its index; replanning them was about a fifth of order-api's Postgres time.

-- The live API keys among `p_hashes` (SHA-256 of each key).
CREATE FUNCTION api_callers(p_hashes bytea[])
RETURNS TABLE (key_hash bytea, id uuid, client text, scope text)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = auto
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
    RETURN QUERY
        SELECT k.key_hash, k.id, k.client, k.scope FROM api_keys k
        WHERE k.key_hash = ANY(p_hashes) AND k.revoked_at IS NULL;
END;
$$;

-- Claim idempotency keys for the calling transaction, one row per
-- (client, key) pair in order: whether its transaction-scoped advisory lock
-- was free (if not, a request with that key is in flight), and the response
-- saved for it, if any younger than `p_ttl_secs` (older ones are deleted).
-- The locks are taken in a statement of their own, before the keys are
-- read, so the read (a new snapshot) sees what their last holder committed.
-- A key is visible ASCII and a client name has no newline: the pair is
-- unambiguous.
CREATE FUNCTION claim_idempotency_keys(p_clients text[], p_keys text[], p_ttl_secs float8)
RETURNS TABLE (locked boolean, request_hash text, response_status smallint,
               response_body bytea, order_id uuid)
LANGUAGE plpgsql
SET plan_cache_mode = auto
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
DECLARE
    v_locked boolean[];
BEGIN
    SELECT array_agg(pg_try_advisory_xact_lock(hashtextextended(c.client || E'\n' || c.key, 0))
                     ORDER BY c.n)
      INTO v_locked
      FROM unnest(p_clients, p_keys) WITH ORDINALITY AS c(client, key, n);
    DELETE FROM idempotency_keys k
     USING unnest(p_clients, p_keys, v_locked) AS c(client, key, locked)
     WHERE c.locked AND k.client = c.client AND k.idempotency_key = c.key
       -- Not a range of the created_at index: each key by its own.
       AND k.created_at + make_interval(secs => p_ttl_secs) <= now();
    RETURN QUERY
        SELECT c.locked, k.request_hash, k.response_status, k.response_body, k.order_id
          FROM unnest(p_clients, p_keys, v_locked) WITH ORDINALITY AS c(client, key, locked, n)
          LEFT JOIN idempotency_keys k
                 ON c.locked AND k.client = c.client AND k.idempotency_key = c.key
         ORDER BY c.n;
END;
$$;
