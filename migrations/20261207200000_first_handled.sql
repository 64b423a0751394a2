-- Consumer-side dedupe, written once. `consumer` has now handled each of
-- `message_ids`: returns those it had not handled before, each once. A
-- subscriber calls it inside the statement that makes the messages'
-- effects, and makes them only for the ids returned, so the record and the
-- effects commit together, and a message delivered again has no effect.
CREATE FUNCTION first_handled(consumer text, message_ids uuid[])
RETURNS TABLE (message_id uuid)
LANGUAGE sql AS $$
    INSERT INTO processed_messages AS p (consumer, message_id)
    SELECT DISTINCT first_handled.consumer, m FROM unnest(message_ids) AS m
    ON CONFLICT DO NOTHING
    RETURNING p.message_id
$$;
