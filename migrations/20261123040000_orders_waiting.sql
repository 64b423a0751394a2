-- order-api looks for orders still accepted a while after their message was
-- published (the broker may have forgotten it): both lookups stay small
-- however many orders are final.
CREATE INDEX orders_accepted ON orders (id) WHERE status = 'accepted';
CREATE INDEX outbox_order ON outbox (order_id);
