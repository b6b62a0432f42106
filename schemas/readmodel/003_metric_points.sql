-- Metrics at scale: one narrow row per (trial, kind, name, step), so a series is an index range scan,
-- and a per-trial summary kept up to date so listing trials never scans the points.
-- Non-finite values are stored as float8 NaN/Infinity; non-numeric values in text_value.

CREATE TABLE metric_points (
    trial_id     bigint NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('training', 'validation')),
    name         text NOT NULL,
    step         bigint NOT NULL,
    value        double precision,
    text_value   text,
    reported_at  timestamptz NOT NULL,
    PRIMARY KEY (trial_id, kind, name, step)
);

CREATE TABLE metric_summaries (
    trial_id     bigint NOT NULL,
    kind         text NOT NULL,
    name         text NOT NULL,
    last_step    bigint NOT NULL,
    last_value   double precision,
    min_value    double precision,
    max_value    double precision,
    PRIMARY KEY (trial_id, kind, name)
);

INSERT INTO metric_points (trial_id, kind, name, step, value, text_value, reported_at)
SELECT m.trial_id, m.kind, kv.key, m.steps_completed,
       CASE WHEN jsonb_typeof(kv.value) = 'number' THEN (kv.value #>> '{}')::double precision
            WHEN kv.value #>> '{}' IN ('NaN', 'Infinity', '-Infinity') THEN (kv.value #>> '{}')::double precision
            WHEN jsonb_typeof(kv.value) = 'boolean' THEN CASE WHEN (kv.value #>> '{}')::boolean THEN 1 ELSE 0 END
       END,
       CASE WHEN jsonb_typeof(kv.value) = 'string' AND kv.value #>> '{}' NOT IN ('NaN', 'Infinity', '-Infinity')
            THEN kv.value #>> '{}' END,
       m.reported_at
FROM metrics m, jsonb_each(m.metrics) kv;

INSERT INTO metric_summaries (trial_id, kind, name, last_step, last_value, min_value, max_value)
SELECT DISTINCT ON (trial_id, kind, name) trial_id, kind, name, step, value,
       min(value) FILTER (WHERE value <> 'NaN') OVER w, max(value) FILTER (WHERE value <> 'NaN') OVER w
FROM metric_points
WINDOW w AS (PARTITION BY trial_id, kind, name)
ORDER BY trial_id, kind, name, step DESC;

DROP TABLE metrics;
