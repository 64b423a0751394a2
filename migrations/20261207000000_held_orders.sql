-- An order whose message was dead-lettered is `held`, with the reason, until
-- a replay accepts it again or the payment sweeper ends its payment. Its
-- client sees why it waits instead of an `accepted` that never changes.
ALTER TABLE orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('accepted', 'held', 'processed', 'rejected'));
