-- A trial spanning hosts: every host of its allocation (worker id, address, slot ids) in rank order.
-- worker_id and slot_ids stay node 0's; a single-host allocation keeps '[]'.
ALTER TABLE allocations ADD COLUMN nodes jsonb NOT NULL DEFAULT '[]';
