-- Checkpoint retention and deletes: a checkpoint whose objects left the store stays listed as DELETED (with
-- when, why and by whom), so lineage keeps naming it. `protected` is the hook for the model registry:
-- a registered checkpoint is never collected.
ALTER TABLE checkpoints
    ADD COLUMN state         text NOT NULL DEFAULT 'COMPLETED',
    ADD COLUMN deleted_at    timestamptz,
    ADD COLUMN delete_reason text NOT NULL DEFAULT '',
    ADD COLUMN protected     boolean NOT NULL DEFAULT false;
CREATE INDEX checkpoints_experiment ON checkpoints (experiment_id, trial_id, steps_completed);
