"""Every event Kiln puts on the bus, defined once.

One tagged union per stream. Wire events are frozen, keyword-only Structs tagged by class
name in the ``type`` field. They never forbid unknown fields, so an older reader skips what a newer
writer added; new fields always get a default, and a breaking change is a new tag.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgspec

from schemas.checkpoint import CheckpointFile

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


class SourceCheckpoint(msgspec.Struct, frozen=True, kw_only=True):
    """The checkpoint every trial of a fine-tune starts from (``searcher.source_checkpoint_uuid``, or the latest
    checkpoint of ``searcher.source_trial_id``), resolved once by the gateway at submission: a replay reads it
    from the log and never resolves it again."""

    uuid: str
    experiment_id: int
    trial_id: int
    steps_completed: int
    storage: str  # as its CheckpointStored carried it: "s3://bucket/checkpoints/<experiment>"
    named_by: Literal["source_checkpoint_uuid", "source_trial_id"] = "source_checkpoint_uuid"  # the config's field


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
    # Where the experiment came from, resolved once at submission (Lineage, below); None in events from before.
    lineage: Lineage | None = None
    # A fine-tune: every trial's first run starts from this checkpoint's weights (its ``latest_checkpoint``).
    source_checkpoint: SourceCheckpoint | None = None
    # ``kiln experiment fork``: the experiment whose config (merged with overrides) and code this one reuses.
    forked_from: int | None = None


class ExperimentKillRequested(Event, frozen=True, kw_only=True):
    """A user asked to kill an experiment and all of its trials."""

    experiment_id: int
    requested_by: str = "anonymous"
    # Unique per request (empty in logs from before it existed): a continued experiment may be killed again.
    request_id: str = ""


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
    request_id: str = ""  # unique per request: a continued trial may be killed again


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
    continuation: int = 0  # how many ExperimentContinued came before: each end of a continued run is a new fact


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
    # A fine-tune's source checkpoint: the worker lets the trial read it (and nothing more of its experiment).
    source_checkpoint: SourceCheckpoint | None = None


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
    continuation: int = 0  # restarts count from 0 again after a continue: this tells the two runs apart


class TrialExited(Event, frozen=True, kw_only=True):
    """A trial reached a terminal state and will not run again."""

    experiment_id: int
    trial_id: int
    state: TrialState
    exit_code: int | None = None
    restarts: int = 0
    reason: str = ""
    continuation: int = 0  # which continue of the trial this end closes (0: its first run)


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
    files: dict[str, CheckpointFile] = {}  # relative file path -> size, sha256, mtime (schemas.checkpoint)
    framework: str = ""  # what wrote it, e.g. "torch-2.13.0"


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


# -- the model registry (gateway-owned user commands on ``kiln.events.registry.model.<model id>``) ----------------


class ModelCreated(Event, frozen=True, kw_only=True):
    """A user created a model in the registry (Determined's ``create_model``). A name belongs to one live model:
    folds keep the first ModelCreated of a name and ignore a later one until that model is deleted."""

    model_id: int
    name: str
    description: str = ""
    labels: list[str] = []
    metadata: dict[str, Any] = {}
    created_by: str = "anonymous"
    created_at: float = 0.0


class ModelVersionRegistered(Event, frozen=True, kw_only=True):
    """A user registered a checkpoint as the next version of a model. While any version names a checkpoint,
    retention never collects it and it cannot be deleted. Folds keep it only if the model is live and
    ``version`` is above every version the model had (numbers are never reused)."""

    model_id: int
    version: int
    checkpoint_uuid: str
    experiment_id: int  # the checkpoint's: whose retention it is taken out of
    trial_id: int
    name: str = ""
    comment: str = ""
    metadata: dict[str, Any] = {}
    registered_by: str = "anonymous"
    registered_at: float = 0.0


class ModelMetadataChanged(Event, frozen=True, kw_only=True):
    """A user redescribed, relabelled or changed the metadata of a model; None and empty leave a field as it was.
    Labels are added, then removed (``relabelled``); metadata keys are set, then removed (``remetadata``)."""

    model_id: int
    description: str | None = None
    labels_added: list[str] = []
    labels_removed: list[str] = []
    metadata_set: dict[str, Any] = {}
    metadata_removed: list[str] = []
    requested_by: str = "anonymous"
    change_id: str = ""  # unique per request: the same change made twice is two facts


class ModelVersionDeleted(Event, frozen=True, kw_only=True):
    """A user deleted one version of a model; its checkpoint is collectable again once no version names it."""

    model_id: int
    version: int
    checkpoint_uuid: str = ""
    experiment_id: int = 0
    requested_by: str = "anonymous"


class ModelDeleted(Event, frozen=True, kw_only=True):
    """A user deleted a model and all its versions; its name is free for a new model."""

    model_id: int
    name: str = ""
    requested_by: str = "anonymous"


def remetadata(metadata: dict[str, Any], set_: dict[str, Any], removed: list[str]) -> dict[str, Any]:
    """A model's metadata after a ``ModelMetadataChanged``: ``set_`` merged in (top-level keys replaced), then the
    ``removed`` keys dropped; the one rule the tracker folds by and the gateway answers with."""
    out = {**metadata, **set_}
    for key in removed:
        out.pop(key, None)
    return out


# -- continue (Determined's ``det experiment continue``) --------------------------------------------------------


class ExperimentContinued(Event, frozen=True, kw_only=True):
    """A user continued an ended experiment: ``trial_ids`` train again, resumed from their latest checkpoints,
    under ``config`` (the old config merged with the user's overrides, validated by the gateway).

    It applies only to an experiment that has ended (searcher, scheduler and tracker each check that at the
    same place in the log, so a second continue sent in a race changes nothing). The searcher answers with a
    ``TrialContinueRequested`` per trial."""

    experiment_id: int
    config: dict[str, Any]
    config_yaml: str
    trial_ids: list[int]
    requested_by: str = "anonymous"
    request_id: str = ""  # unique per request: continuing twice is two facts


class TrialContinueRequested(Event, frozen=True, kw_only=True):
    """The searcher reopened an ended trial (after an ExperimentContinued): queue it again with these
    hyperparameters, to train to ``max_length`` from its latest checkpoint, with its restarts counted from 0."""

    experiment_id: int
    trial_id: int
    hparams: dict[str, Any]
    max_length: int | None = None
    continuation: int = 1  # the experiment's how-manieth continue this is


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
    | ModelCreated
    | ModelVersionRegistered
    | ModelMetadataChanged
    | ModelVersionDeleted
    | ModelDeleted
    | ExperimentContinued
    | TrialContinueRequested
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


# ---------------------------------------------------------------------------------------------
# Lineage: what an experiment was made of, resolved once by the gateway and carried by ExperimentSubmitted.
# ---------------------------------------------------------------------------------------------


class DataVersion(msgspec.Struct, frozen=True, kw_only=True):
    """The exact Delta table version an experiment reads (``data.delta_table``), pinned at submission."""

    table: str  # the URI as the config names it
    version: int
    latest: bool = False  # the config named no version: this was the latest at submission
    table_id: str = ""  # the table's own id (Delta metadata): tells a table recreated at the same URI apart
    committed_at: float | None = None  # when that version was committed (seconds since the epoch)


class Lineage(msgspec.Struct, frozen=True, kw_only=True):
    """Config, code, data and parent of an experiment: enough to say what a model was trained from."""

    config_digest: str  # ``sha256:<hex>`` of the config text as submitted (``config_digest``)
    code_digest: str  # sha256 of the code context, as ``ExperimentSubmitted.context_digest``
    data: DataVersion | None = None
    parent: SourceCheckpoint | None = None


def config_digest(config_yaml: str) -> str:
    """The digest lineage records for a config: ``sha256:<hex>`` of its text as submitted (UTF-8), in the form of
    the code context's digest."""
    return "sha256:" + hashlib.sha256(config_yaml.encode("utf-8", "surrogatepass")).hexdigest()
