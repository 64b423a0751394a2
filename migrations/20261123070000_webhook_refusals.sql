-- A webhook whose URL reaches inside (loopback, private, link-local, cloud
-- metadata, ...) or carries credentials is refused at send time: state
-- 'refused', terminal like 'dead' but never retried; its one attempt row and
-- last_error carry the reason.
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_state_check;
ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_state_check
    CHECK (state IN ('pending', 'delivered', 'dead', 'refused'));
