-- Lineage (ExperimentSubmitted.lineage): config and code digests, the Delta table version the experiment reads,
-- its parent checkpoint; as resolved once at submission. NULL for experiments submitted before it was recorded.
ALTER TABLE experiments ADD COLUMN lineage jsonb;
