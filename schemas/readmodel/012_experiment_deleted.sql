-- Deleted experiments (ExperimentDeleted, Determined's `experiment delete`): the read model drops the experiment,
-- its trials, allocations, checkpoints, metric points and log lines; these two tables remember what was dropped, so
-- a metric or log batch that the tracker projects after the deletion (its stream lags the events', or a replay
-- folds the events stream first) adds nothing back.
CREATE TABLE deleted_experiments (
    id          bigint PRIMARY KEY,
    deleted_at  timestamptz NOT NULL,
    deleted_by  text NOT NULL
);

CREATE TABLE deleted_trials (
    trial_id       bigint PRIMARY KEY,
    experiment_id  bigint NOT NULL
);
