-- The model registry (ModelCreated, ModelVersionRegistered, ModelMetadataChanged, ModelVersionDeleted,
-- ModelDeleted): projected by the tracker like every other table. A deleted model or version leaves its table;
-- `last_version` keeps a model's version numbers from being reused. `checkpoints.protected` (migration 007) is
-- kept true while any version names the checkpoint.
CREATE TABLE models (
    id            bigint PRIMARY KEY,
    name          text NOT NULL,
    description   text NOT NULL DEFAULT '',
    labels        jsonb NOT NULL DEFAULT '[]',
    metadata      jsonb NOT NULL DEFAULT '{}',
    owner         text NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    last_version  integer NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX models_name ON models (name);

CREATE TABLE model_versions (
    model_id         bigint NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    version          integer NOT NULL,
    checkpoint_uuid  text NOT NULL,
    experiment_id    bigint NOT NULL,
    trial_id         bigint NOT NULL,
    name             text NOT NULL DEFAULT '',
    comment          text NOT NULL DEFAULT '',
    metadata         jsonb NOT NULL DEFAULT '{}',
    registered_by    text NOT NULL,
    registered_at    timestamptz NOT NULL,
    PRIMARY KEY (model_id, version)
);
CREATE INDEX model_versions_checkpoint ON model_versions (checkpoint_uuid);

-- Model ids come from the gateway's counter, as experiment ids do (never reused).
INSERT INTO id_counters (name, value) VALUES ('model', 0);
