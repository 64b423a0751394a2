-- The stand-in payment provider answers a call in one round trip, as a real
-- provider answers one HTTP request: this function does what
-- crates/order-processor/src/payment.rs used to do in a transaction of four
-- statements. Each statement in it reads the latest committed data (a
-- volatile function in READ COMMITTED takes a snapshot per statement), so a
-- call that waited for another with the same key finds that call's ledger
-- row and answers as it did.
--
-- Returns how often the key has been sent (this call included) and the
-- outcome: authorised, declined, captured, voided or `refused: <why>`; no
-- outcome when the call is one of the first `fail_up_to` with its key, which
-- fail having done nothing but count themselves.
CREATE FUNCTION provider_call(
    p_key         text,
    p_operation   text,
    p_reference   uuid,
    p_amount      bigint,
    p_currency    text,
    p_decline_over bigint,
    p_fail_up_to  integer,
    OUT calls     integer,
    OUT outcome   text
) LANGUAGE plpgsql AS $$
DECLARE
    v_state  text;
    v_amount bigint;
BEGIN
    -- Counting the call locks the key's row: calls with one key are
    -- answered one at a time.
    INSERT INTO provider_calls AS c (idempotency_key, calls) VALUES (p_key, 1)
    ON CONFLICT (idempotency_key) DO UPDATE SET calls = c.calls + 1
    RETURNING c.calls INTO calls;
    IF calls <= p_fail_up_to THEN
        RETURN;
    END IF;

    SELECT CASE WHEN l.operation = p_operation AND l.reference = p_reference THEN l.outcome
                ELSE 'refused: idempotency key reused for another request' END
      INTO outcome
      FROM provider_ledger l WHERE l.idempotency_key = p_key;
    IF FOUND THEN
        RETURN;
    END IF;

    IF p_operation = 'authorise' THEN
        -- One authorisation per reference: a second one, under another key,
        -- is refused below.
        INSERT INTO provider_authorisations (reference, amount_cents, currency, state)
        VALUES (p_reference, p_amount, p_currency,
                CASE WHEN p_amount > p_decline_over THEN 'declined' ELSE 'authorised' END)
        ON CONFLICT (reference) DO NOTHING
        RETURNING state, CASE WHEN state = 'authorised' THEN amount_cents ELSE 0 END
        INTO v_state, v_amount;
    ELSIF p_operation = 'capture' THEN
        UPDATE provider_authorisations SET state = 'captured', updated_at = now()
        WHERE reference = p_reference AND state = 'authorised'
        RETURNING state, amount_cents INTO v_state, v_amount;
    ELSIF p_operation = 'void' THEN
        UPDATE provider_authorisations SET state = 'voided', updated_at = now()
        WHERE reference = p_reference AND state = 'authorised'
        RETURNING state, amount_cents INTO v_state, v_amount;
        IF NOT FOUND THEN
            -- Voiding what was never authorised leaves a voided record, so
            -- that an authorisation arriving late is refused, not left open.
            INSERT INTO provider_authorisations (reference, amount_cents, currency, state)
            VALUES (p_reference, 0, p_currency, 'voided')
            ON CONFLICT (reference) DO NOTHING
            RETURNING state, amount_cents INTO v_state, v_amount;
        END IF;
    ELSE
        RAISE EXCEPTION 'unknown provider operation %', p_operation;
    END IF;

    IF v_state IS NULL THEN
        SELECT a.state INTO v_state FROM provider_authorisations a WHERE a.reference = p_reference;
        outcome := 'refused: the authorisation is ' || coalesce(v_state, 'missing');
        v_amount := 0;
    ELSE
        outcome := v_state;
    END IF;
    INSERT INTO provider_ledger (idempotency_key, operation, reference, amount_cents, outcome)
    VALUES (p_key, p_operation, p_reference, v_amount, outcome);
END;
$$;
