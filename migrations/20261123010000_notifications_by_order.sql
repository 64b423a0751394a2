-- Notifications are looked up by order (an order's story, the load
-- generator's exactly-once check); without this each lookup scans them all.
CREATE INDEX notifications_order ON notifications (order_id);
