-- The read model the tracker projects and the gateway serves. Tables are unqualified so the same
-- migration can build a fresh schema for replay (search_path picks the schema).

CREATE TABLE projection_positions (
    consumer   text PRIMARY KEY,
    last_seq   bigint NOT NULL
);

CREATE SEQUENCE experiment_ids;

CREATE TABLE experiments (
    id                bigint PRIMARY KEY,
    name              text NOT NULL,
    description       text NOT NULL DEFAULT '',
    labels            jsonb NOT NULL DEFAULT '[]',
    state             text NOT NULL,
    config            jsonb NOT NULL,
    config_yaml       text NOT NULL,
    context_digest    text NOT NULL,
    searcher_name     text NOT NULL,
    searcher_metric   text NOT NULL,
    smaller_is_better boolean NOT NULL,
    seed              bigint NOT NULL,
    submitted_by      text NOT NULL,
    submitted_at      timestamptz NOT NULL,
    ended_at          timestamptz,
    end_reason        text NOT NULL DEFAULT '',
    progress          double precision NOT NULL DEFAULT 0
);
CREATE INDEX experiments_state ON experiments (state);

CREATE TABLE trials (
    id                 bigint PRIMARY KEY,
    experiment_id      bigint NOT NULL REFERENCES experiments (id),
    request_id         integer NOT NULL,
    hparams            jsonb NOT NULL,
    seed               bigint NOT NULL,
    max_length         bigint,
    state              text NOT NULL,
    restarts           integer NOT NULL DEFAULT 0,
    exit_code          integer,
    end_reason         text NOT NULL DEFAULT '',
    stop_requested     boolean NOT NULL DEFAULT false,
    allocation_id      text,
    worker_id          text,
    created_at         timestamptz NOT NULL,
    started_at         timestamptz,
    ended_at           timestamptz,
    steps_completed    bigint NOT NULL DEFAULT 0,
    progress           double precision NOT NULL DEFAULT 0,
    latest_validation  jsonb,
    best_metric        double precision,
    latest_checkpoint  text
);
CREATE INDEX trials_experiment ON trials (experiment_id, id);

CREATE TABLE allocations (
    id             text PRIMARY KEY,
    trial_id       bigint NOT NULL REFERENCES trials (id),
    experiment_id  bigint NOT NULL,
    worker_id      text NOT NULL,
    slot_ids       jsonb NOT NULL,
    restarts       integer NOT NULL DEFAULT 0,
    assigned_at    timestamptz NOT NULL,
    started_at     timestamptz,
    ended_at       timestamptz,
    exit_code      integer,
    end_reason     text NOT NULL DEFAULT ''
);
CREATE INDEX allocations_trial ON allocations (trial_id);

-- One row per reported point; a restarted trial re-reporting a step replaces it, never doubles it.
CREATE TABLE metrics (
    trial_id         bigint NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('training', 'validation')),
    steps_completed  bigint NOT NULL,
    metrics          jsonb NOT NULL,
    reported_at      timestamptz NOT NULL,
    PRIMARY KEY (trial_id, kind, steps_completed)
);

CREATE TABLE checkpoints (
    uuid             text PRIMARY KEY,
    trial_id         bigint NOT NULL REFERENCES trials (id),
    experiment_id    bigint NOT NULL,
    steps_completed  bigint NOT NULL,
    storage          text NOT NULL,
    resources        jsonb NOT NULL,
    metadata         jsonb NOT NULL,
    reported_at      timestamptz NOT NULL
);
CREATE INDEX checkpoints_trial ON checkpoints (trial_id, steps_completed);

CREATE TABLE trial_logs (
    trial_id       bigint NOT NULL,
    allocation_id  text NOT NULL,
    line_no        integer NOT NULL,
    stream         text NOT NULL,
    ts             timestamptz NOT NULL,
    text           text NOT NULL,
    PRIMARY KEY (allocation_id, line_no)
);
CREATE INDEX trial_logs_trial ON trial_logs (trial_id, ts, allocation_id, line_no);

CREATE TABLE workers_lost (
    worker_id   text NOT NULL,
    last_seen   timestamptz NOT NULL,
    PRIMARY KEY (worker_id, last_seen)
);
