-- Experiment ids from a transactional counter instead of a sequence: a sequence pre-logs 32 values in the WAL,
-- so a PostgreSQL crash made ids jump (4 -> 36). A row updated in the submitting transaction never skips.
CREATE TABLE id_counters (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO id_counters (name, value)
SELECT 'experiment', GREATEST(
    (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM experiment_ids),
    COALESCE((SELECT max(id) FROM experiments), 0));
