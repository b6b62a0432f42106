"""Every event Kiln puts on the bus, defined once.

One tagged union per stream. Wire events are frozen, keyword-only Structs tagged by class
name in the ``type`` field. They never forbid unknown fields, so an older reader skips what a newer
writer added; new fields always get a default, and a breaking change is a new tag.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# JSON-safe metric value: a finite float, NaN/inf (encoded as strings by the Core API), or any
# scalar a user reports (Determined accepts strings and bools in metrics too).
MetricValue = float | int | str | bool | None

TrialState = Literal["COMPLETED", "ERROR", "CANCELED"]
ExperimentState = Literal["COMPLETED", "ERROR", "CANCELED"]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of every wire event; the tag is the class name."""


# ---------------------------------------------------------------------------------------------
# Domain stream (KILN_EVENTS): small, kept forever, the source of truth every projection folds.
# ---------------------------------------------------------------------------------------------


class ExperimentSubmitted(Event, frozen=True, kw_only=True):
    """A user submitted an experiment; its config is validated and its code context stored."""

    experiment_id: int
    # The validated config as plain JSON data. Kept untyped on the wire on purpose: the config
    # schema forbids unknown keys (user input), which must not make old event readers fail.
    config: dict[str, Any]
    config_yaml: str
    context_digest: str  # sha256 of the tar.gz; the object key is derived from it
    context_size: int
    seed: int
    submitted_by: str = "anonymous"
    submitted_at: float = 0.0
    # Created paused (``kiln experiment create --paused``): the scheduler holds its queue from the first
    # event on, as after an ExperimentPauseRequested, so no trial of it starts before an activate.
    paused: bool = False


class ExperimentKillRequested(Event, frozen=True, kw_only=True):
    """A user asked to kill an experiment and all of its trials."""

    experiment_id: int
    requested_by: str = "anonymous"


class ExperimentPauseRequested(Event, frozen=True, kw_only=True):
    """A user paused an experiment: its trials checkpoint and release their slots; nothing new starts."""

    experiment_id: int
    requested_by: str = "anonymous"
    request_id: str = ""  # unique per request: pause, activate, pause again are three facts


class ExperimentActivateRequested(Event, frozen=True, kw_only=True):
    """A user (re)activated a paused experiment: its trials queue again and resume from checkpoints."""

    experiment_id: int
    requested_by: str = "anonymous"
    request_id: str = ""  # unique per request: pause, activate, pause again are three facts


class ExperimentResourcesChanged(Event, frozen=True, kw_only=True):
    """A user changed an experiment's scheduling knobs; None leaves a knob as it was."""

    experiment_id: int
    priority: int | None = None
    weight: float | None = None
    max_slots: int | None = None
    change_id: str = ""  # unique per request: the same values set twice are two facts


class ExperimentMetadataChanged(Event, frozen=True, kw_only=True):
    """A user renamed, redescribed, relabelled, archived or unarchived an experiment (Determined's
    ``set name|description``, ``label add|remove``, ``archive``); None and empty lists leave a field as it was.
    Labels are added, then removed."""

    experiment_id: int
    name: str | None = None
    description: str | None = None
    labels_added: list[str] = []
    labels_removed: list[str] = []
    archived: bool | None = None  # archive (True) or unarchive (False): hidden from the list or shown again
    requested_by: str = "anonymous"
    change_id: str = ""  # unique per request: the same change made twice is two facts


class ExperimentDeleted(Event, frozen=True, kw_only=True):
    """A user deleted an ended experiment (Determined's ``experiment delete``): its checkpoints' objects left the
    store first (``CheckpointsDeleted``), and the read model drops the experiment with its trials, metrics and
    logs. The log keeps every event of it: the audit trail outlives the deletion."""

    experiment_id: int
    deleted_by: str


def relabelled(labels: list[str], added: list[str], removed: list[str]) -> list[str]:
    """Labels after an ``ExperimentMetadataChanged``: the added ones appended (each once, in order), then the
    removed ones dropped; the one rule the tracker folds by and the gateway answers with."""
    out: list[str] = []
    for label in [*labels, *added]:
        if label not in out and label not in removed:
            out.append(label)
    return out


class TrialKillRequested(Event, frozen=True, kw_only=True):
    """A user asked to kill one trial."""

    experiment_id: int
    trial_id: int
    requested_by: str = "anonymous"


class TrialPreemptRequested(Event, frozen=True, kw_only=True):
    """The scheduler wants this run's slots back: checkpoint and exit (``should_preempt()`` turns True)."""

    experiment_id: int
    trial_id: int
    allocation_id: str
    reason: str = ""


class TrialPreempted(Event, frozen=True, kw_only=True):
    """A preempted run ended; the trial is back in the queue and resumes from its checkpoint."""

    experiment_id: int
    trial_id: int
    allocation_id: str


class TrialCreated(Event, frozen=True, kw_only=True):
    """The searcher created a trial with these hyperparameters."""

    experiment_id: int
    trial_id: int
    request_id: int  # the searcher's own per-experiment number for the trial
    hparams: dict[str, Any]
    seed: int
    max_length: int | None = None  # units of the searcher's time metric the trial should train
    # How many trials the search plans in all (its preview's count); 0 in logs from before it was recorded.
    planned_trials: int = 0


class TrialResumeRequested(Event, frozen=True, kw_only=True):
    """The searcher promoted a paused trial: resume it from its checkpoint and train to ``max_length``."""

    experiment_id: int
    trial_id: int
    max_length: int


class TrialPaused(Event, frozen=True, kw_only=True):
    """A trial reached the length it was asked for and exited; it holds no slot until resumed or closed."""

    experiment_id: int
    trial_id: int
    allocation_id: str
    length: int | None = None


class TrialStopRequested(Event, frozen=True, kw_only=True):
    """The searcher decided a trial should stop early (seen via ``should_preempt()``)."""

    experiment_id: int
    trial_id: int
    reason: str = "searcher decided to early stop trial"


class ExperimentEnded(Event, frozen=True, kw_only=True):
    """The experiment reached a terminal state; no trial of it will run again."""

    experiment_id: int
    state: ExperimentState
    reason: str = ""


class AllocationNode(msgspec.Struct, frozen=True, kw_only=True):
    """One host of a trial that spans several: its worker, address and slots."""

    worker_id: str
    address: str
    slot_ids: list[str]


class TrialSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker needs to start a trial's process, from its ExperimentSubmitted and TrialCreated."""

    # The experiment's validated config as ExperimentSubmitted carries it (schemas.config.config_from_wire reads it).
    config: dict[str, Any]
    context_digest: str  # the experiment's code context
    hparams: dict[str, Any]
    seed: int  # the trial's own seed


class AllocationAssigned(Event, frozen=True, kw_only=True):
    """The scheduler placed a trial run on a worker's slots.

    Self-contained: with ``spec`` the worker starts the run without reading anything back from the stream.
    A trial spanning hosts gets one of these per host, all with the same allocation id: ``node_rank``
    says which host this one is, ``nodes`` lists them all in rank order and ``master_port`` is where
    node 0 (at ``nodes[0].address``) hosts the rendezvous. A single-host run leaves those empty.
    """

    experiment_id: int
    trial_id: int
    allocation_id: str
    worker_id: str
    slot_ids: list[str]
    restarts: int = 0
    latest_checkpoint: str | None = None
    # The length (searcher units) this run trains to: the trial's own, or what a promotion asked for.
    max_length: int | None = None
    node_rank: int = 0
    nodes: list[AllocationNode] = []
    master_port: int = 0
    spec: TrialSpec | None = None  # None only in placements made before this field existed


class AllocationKillRequested(Event, frozen=True, kw_only=True):
    """The scheduler asked a worker to kill a running allocation."""

    experiment_id: int
    trial_id: int
    allocation_id: str
    worker_id: str
    reason: str = ""


class TrialStarted(Event, frozen=True, kw_only=True):
    """A worker started the trial's process for an allocation."""

    experiment_id: int
    trial_id: int
    allocation_id: str
    worker_id: str
    started_at: float = 0.0


class AllocationExited(Event, frozen=True, kw_only=True):
    """The trial process of an allocation ended (or never started: exit_code None)."""

    experiment_id: int
    trial_id: int
    allocation_id: str
    worker_id: str
    exit_code: int | None
    reason: str = ""
    killed: bool = False
    exited_at: float = 0.0
    node_rank: int = 0  # which host of a multi-host allocation this process ran on


class WorkerLost(Event, frozen=True, kw_only=True):
    """A worker stopped heartbeating past the timeout; its allocations are gone."""

    worker_id: str
    last_seen: float
    allocation_ids: list[str] = []


class AllocationLost(Event, frozen=True, kw_only=True):
    """An allocation ended because its worker was lost."""

    experiment_id: int
    trial_id: int
    allocation_id: str
    worker_id: str


class TrialRestarting(Event, frozen=True, kw_only=True):
    """A failed trial goes back to the queue to resume from its latest checkpoint."""

    experiment_id: int
    trial_id: int
    restarts: int
    reason: str = ""


class TrialExited(Event, frozen=True, kw_only=True):
    """A trial reached a terminal state and will not run again."""

    experiment_id: int
    trial_id: int
    state: TrialState
    exit_code: int | None = None
    restarts: int = 0
    reason: str = ""


class ValidationReported(Event, frozen=True, kw_only=True):
    """A trial reported validation metrics (the searcher decides on these)."""

    experiment_id: int
    trial_id: int
    steps_completed: int
    metrics: dict[str, MetricValue]
    reported_at: float = 0.0
    # The run that reported it (its worker stamps it): a report of a run declared lost (AllocationLost) is fenced,
    # that is refused by the scheduler, searcher and tracker. "" in reports from before it was recorded.
    allocation_id: str = ""


class CheckpointStored(Event, frozen=True, kw_only=True):
    """A trial uploaded a checkpoint; ``uuid`` names it in storage."""

    experiment_id: int
    trial_id: int
    uuid: str
    steps_completed: int
    storage: str  # e.g. "s3://bucket/prefix" or "shared_fs:///host/path"
    resources: dict[str, int] = {}  # relative file path -> size in bytes
    metadata: dict[str, Any] = {}
    reported_at: float = 0.0
    # The run that stored it (stamped by its worker): a run declared lost never sets the trial's latest checkpoint.
    allocation_id: str = ""


class TrialProgressReported(Event, frozen=True, kw_only=True):
    """A trial reported how far it is (0..1) through its work."""

    experiment_id: int
    trial_id: int
    progress: float
    allocation_id: str = ""  # the run that reported it (stamped by its worker); fenced as ValidationReported


class CheckpointGCPolicyChanged(Event, frozen=True, kw_only=True):
    """A user changed an experiment's checkpoint retention (Determined's ``set gc-policy``); None keeps a value."""

    experiment_id: int
    save_experiment_best: int | None = None
    save_trial_best: int | None = None
    save_trial_latest: int | None = None
    requested_by: str = "anonymous"
    change_id: str = ""  # unique per request: the same values set twice are two facts


class CheckpointRef(msgspec.Struct, frozen=True, kw_only=True):
    """Where one checkpoint lives: enough for whoever deletes it to find its objects without the read model."""

    uuid: str
    trial_id: int
    storage: str  # as CheckpointStored carried it: "s3://bucket/prefix"


class CheckpointGCRequested(Event, frozen=True, kw_only=True):
    """The searcher decided, by the experiment's retention policy, that these checkpoints are to be collected."""

    experiment_id: int
    checkpoints: list[CheckpointRef]
    reason: str = ""  # what triggered it: "trial 7 exited", "experiment ended", "gc policy changed"


class CheckpointsDeleted(Event, frozen=True, kw_only=True):
    """These checkpoints' objects left the store (collected by retention, or deleted by a user)."""

    experiment_id: int
    uuids: list[str]
    reason: str = ""
    deleted_by: str = ""  # the user of an explicit delete; "" for retention
    objects_removed: int = 0
    # Checkpoints not in the cluster's store (another bucket, shared_fs): recorded deleted, objects left to their owner.
    not_in_store: list[str] = []


DomainEvent = (
    ExperimentSubmitted
    | ExperimentKillRequested
    | ExperimentPauseRequested
    | ExperimentActivateRequested
    | ExperimentResourcesChanged
    | ExperimentMetadataChanged
    | TrialKillRequested
    | TrialPreemptRequested
    | TrialPreempted
    | TrialCreated
    | TrialStopRequested
    | TrialResumeRequested
    | TrialPaused
    | ExperimentEnded
    | AllocationAssigned
    | AllocationKillRequested
    | TrialStarted
    | AllocationExited
    | WorkerLost
    | AllocationLost
    | TrialRestarting
    | TrialExited
    | ValidationReported
    | CheckpointStored
    | TrialProgressReported
    | CheckpointGCPolicyChanged
    | CheckpointGCRequested
    | CheckpointsDeleted
    | ExperimentDeleted
)


# ---------------------------------------------------------------------------------------------
# Metrics stream (KILN_METRICS): high volume; many points per message.
# ---------------------------------------------------------------------------------------------


class MetricPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One training report: the metrics at a step."""

    steps_completed: int
    metrics: dict[str, MetricValue]
    reported_at: float = 0.0


class TrainingMetricsReported(Event, frozen=True, kw_only=True):
    """A batch of training metric points from one trial, in report order."""

    experiment_id: int
    trial_id: int
    batch_id: str  # unique per trial run and batch: the dedupe key
    points: list[MetricPoint]


MetricEvent = TrainingMetricsReported


# ---------------------------------------------------------------------------------------------
# Logs stream (KILN_LOGS): high volume, bounded retention.
# ---------------------------------------------------------------------------------------------


class LogLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line a trial process wrote."""

    line_no: int  # per allocation, from 0; orders and dedupes lines
    stream: Literal["stdout", "stderr", "system"]
    text: str
    ts: float


class LogsShipped(Event, frozen=True, kw_only=True):
    """A batch of log lines of one allocation."""

    experiment_id: int
    trial_id: int
    allocation_id: str
    lines: list[LogLine]


LogEvent = LogsShipped


# ---------------------------------------------------------------------------------------------
# Dead letters (KILN_DEADLETTER): what a consumer could not decode or handle, kept for a human.
# ---------------------------------------------------------------------------------------------


class MessageDeadLettered(Event, frozen=True, kw_only=True):
    """A consumer gave up on a message; the original bytes are kept for inspection."""

    consumer: str
    stream: str
    stream_seq: int
    subject: str
    error: str
    payload: bytes


DeadLetterEvent = MessageDeadLettered


# ---------------------------------------------------------------------------------------------
# Heartbeats: ephemeral, core NATS only, never in the event log.
# ---------------------------------------------------------------------------------------------


class Slot(msgspec.Struct, frozen=True, kw_only=True):
    """One schedulable unit of a worker: a GPU, or a CPU slot when no GPU is found."""

    slot_id: str
    kind: Literal["cuda", "cpu"]
    name: str = ""
    uuid: str = ""
    memory_mb: int = 0
    utilization: int = 0


class WorkerHeartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's periodic statement of its slots and what it runs."""

    worker_id: str
    address: str
    resource_pool: str
    slots: list[Slot]
    running: list[str]  # allocation ids whose process is alive
    sent_at: float
    # Allocations that ended recently (their exit is on the bus): not "missing", just done.
    finished: list[str] = []
