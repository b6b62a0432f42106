"""The gateway's HTTP answers: one Struct per response body, the one error shape, the live-metric messages.

The gateway returns these (so its OpenAPI schema at ``/schema`` documents every answer and the fuzz test
holds it to them); ``services/gateway/queries.py`` builds the read-model ones from rows. Field names are the
JSON keys the CLI, the SDK and the examples read. Timestamps are ISO 8601 strings in UTC on the wire.

Floats that may hold NaN or infinity (a metric, a best value) are ``float | None``: JSON has no NaN, so
msgspec writes it as ``null``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from schemas import events as ev

# -- errors: every 4xx and 5xx answer has this shape ---------------------------------------------------------


class ParamProblem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One refused parameter or body field (Litestar's validation errors and the gateway's own checks)."""

    key: str
    message: str
    source: str | None = None  # "path", "query", "body", ...


class ConfigProblem(msgspec.Struct, kw_only=True):
    """One problem in a submitted experiment config, at its path (``searcher.metric``, ``labels[2]``)."""

    path: str
    message: str


class ErrorDetails(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``extra`` of an error that is not about parameters."""

    errors: list[ConfigProblem] | None = None  # an invalid experiment config, field by field
    experiment_id: int | None = None  # a submission NATS did not confirm: the id it may still appear as


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every error answer (4xx and 5xx): ``detail`` says what went wrong in words."""

    status_code: int
    detail: str
    extra: list[ParamProblem] | ErrorDetails | None = None
    request_id: str | None = None  # also in the X-Request-Id header; quote it when reporting a 5xx
    status: Literal["degraded"] | None = None  # 503: parts are down
    down: list[Literal["postgres", "nats", "s3"]] | None = None  # 503: which parts


# -- health and submissions ----------------------------------------------------------------------------------


class Health(msgspec.Struct, kw_only=True):
    """``GET /health`` when every part answers."""

    status: Literal["ok"] = "ok"


class MasterInfo(msgspec.Struct, kw_only=True):
    """``GET /api/v1/info``: what the master is."""

    version: str  # the Kiln release the gateway runs


class Submitted(msgspec.Struct, kw_only=True):
    """An accepted experiment submission."""

    id: int
    warnings: list[str]  # config fields accepted but not acted on, each naming its path
    context_digest: str


# -- experiments ---------------------------------------------------------------------------------------------


class _ExperimentFields(msgspec.Struct, kw_only=True):
    id: int
    name: str
    description: str
    labels: list[str]
    state: str
    searcher_name: str
    searcher_metric: str
    smaller_is_better: bool
    submitted_by: str
    submitted_at: datetime
    ended_at: datetime | None
    end_reason: str
    progress: float
    context_digest: str
    priority: int
    weight: float
    max_slots: int | None
    archived: bool = False  # hidden from the list unless asked for (``archived=true`` or unfiltered)


class ExperimentSummary(_ExperimentFields, kw_only=True):
    """One experiment in a list, with its number of trials."""

    num_trials: int
    best_trial: BestTrial | None = None  # in the experiments page (``ExperimentPage``); absent from the plain list


class BestTrial(msgspec.Struct, kw_only=True):
    """The trial with the best searcher metric so far."""

    id: int
    best_metric: float | None


class Experiment(_ExperimentFields, kw_only=True):
    """One experiment with its config, trial counts by state and best trial."""

    config: dict[str, Any]
    config_yaml: str
    seed: int
    trial_states: dict[str, int]
    best_trial: BestTrial | None
    lineage: ExperimentLineage | None = None  # config, code, data version and parent checkpoint


class StateAnswer(msgspec.Struct, kw_only=True):
    """What a kill, pause or activate request leads to (the thing's id and the state it goes to)."""

    id: int
    state: str


class ResourcesAnswer(msgspec.Struct, kw_only=True):
    """The scheduling knobs a request changed (null: left as it was)."""

    id: int
    priority: int | None
    weight: float | None
    max_slots: int | None


class ExperimentMetadata(msgspec.Struct, kw_only=True):
    """An experiment's name, description and labels as a change leaves them."""

    id: int
    name: str
    description: str
    labels: list[str]
    archived: bool


class AuditEvent(msgspec.Struct, kw_only=True):
    """One event of an experiment's audit trail, where it sits in the stream."""

    seq: int
    subject: str
    type: str
    time: datetime
    event: ev.DomainEvent


# -- trials --------------------------------------------------------------------------------------------------


class LatestValidation(msgspec.Struct, kw_only=True):
    """A trial's most recent validation."""

    steps_completed: int
    metrics: dict[str, Any]


class Trial(msgspec.Struct, kw_only=True):
    """One trial row."""

    id: int
    experiment_id: int
    request_id: int
    hparams: dict[str, Any]
    seed: int
    max_length: int | None
    state: str
    restarts: int
    exit_code: int | None
    end_reason: str
    stop_requested: bool
    allocation_id: str | None
    worker_id: str | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    steps_completed: int
    progress: float
    latest_validation: LatestValidation | None
    best_metric: float | None
    latest_checkpoint: str | None


class Allocation(msgspec.Struct, kw_only=True):
    """One run of a trial on a worker's slots (a restart is a new allocation)."""

    id: str
    worker_id: str
    slot_ids: list[str]
    nodes: list[ev.AllocationNode]  # every host of a multi-host run; empty for one host
    restarts: int
    assigned_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    exit_code: int | None
    end_reason: str


class TrialDetail(Trial, kw_only=True):
    """One trial with its allocations."""

    allocations: list[Allocation]


class MetricsAtStep(msgspec.Struct, kw_only=True):
    """A trial's metrics of one kind at one step."""

    kind: Literal["training", "validation"]
    steps_completed: int
    metrics: dict[str, float | str | None]  # a NaN or infinity is the string "NaN", "Infinity", "-Infinity"
    reported_at: datetime


class MetricName(msgspec.Struct, kw_only=True):
    """A metric a trial reported, with its last, min and max values."""

    kind: Literal["training", "validation"]
    name: str
    last_step: int
    last_value: float | None
    min_value: float | None
    max_value: float | None


class SeriesPoint(msgspec.Struct, kw_only=True):
    """One point of a (downsampled) metric series."""

    step: int
    value: float | None
    wall_time: float | None = None  # when it was reported, in seconds since the Unix epoch (a chart's time axis)


class Series(msgspec.Struct, kw_only=True):
    """Series of a trial's metrics, by name."""

    trial_id: int
    kind: Literal["training", "validation"]
    max_points: int
    series: dict[str, list[SeriesPoint]]


class LogLine(msgspec.Struct, kw_only=True):
    """One line a trial wrote."""

    allocation_id: str
    line_no: int
    stream: str
    ts: datetime
    text: str


class Checkpoint(msgspec.Struct, kw_only=True):
    """One checkpoint's record."""

    uuid: str
    trial_id: int
    experiment_id: int
    steps_completed: int
    storage: str
    resources: dict[str, int]  # relative file path -> size in bytes
    metadata: dict[str, Any]
    reported_at: datetime
    state: Literal["COMPLETED", "DELETED"] = "COMPLETED"  # DELETED: its files left the store
    deleted_at: datetime | None = None
    delete_reason: str = ""  # "retention: trial 7 exited", "deleted by ann"
    protected: bool = False  # registered as a model version: never collected
    searcher_metric: str = ""
    metric: float | None = None  # the searcher metric of the validation at this checkpoint's step, if any


class CheckpointDeleted(msgspec.Struct, kw_only=True):
    """A checkpoint whose files were deleted from the store (``objects_removed`` now; 0 when already gone)."""

    uuid: str
    state: Literal["DELETED"]
    objects_removed: int


class ExperimentDeletion(msgspec.Struct, kw_only=True):
    """An experiment deleted: its checkpoints' files left the store now; the read model drops it shortly after."""

    id: int
    checkpoints_deleted: int
    objects_removed: int


class GCPolicy(msgspec.Struct, kw_only=True):
    """An experiment's checkpoint retention (``checkpoint_storage.save_*``) as a request set it; null: unchanged."""

    id: int
    save_experiment_best: int | None
    save_trial_best: int | None
    save_trial_latest: int | None


# -- live metrics (``GET /api/v1/experiments/{id}/metrics/stream``, as SSE data) -----------------------------


class LiveMetrics(msgspec.Struct, kw_only=True):
    """The data of a ``training`` or ``validation`` server-sent event."""

    trial_id: int
    steps_completed: int
    metrics: dict[str, ev.MetricValue]


class LiveTrial(msgspec.Struct, kw_only=True):
    """The data of a ``trial`` server-sent event: a trial's new state (``QUEUED``, ``RUNNING``, ``PAUSED`` or
    its terminal state)."""

    trial_id: int
    state: str
    reason: str = ""


class LiveProgress(msgspec.Struct, kw_only=True):
    """The data of a ``progress`` server-sent event: how far (0..1) a trial is through its work."""

    trial_id: int
    progress: float


class LiveEnd(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The data of the ``end`` server-sent event (``state`` absent when it had ended before the stream)."""

    state: str | None = None


# -- users and tokens ----------------------------------------------------------------------------------------


class LoginAnswer(msgspec.Struct, kw_only=True):
    """A session token (send it as ``Authorization: Bearer <token>``) and whom it signs in."""

    token: str
    token_id: int
    expires_at: datetime | None
    username: str
    admin: bool


class Revoked(msgspec.Struct, kw_only=True):
    """A token that no longer signs anyone in."""

    token_id: int
    revoked: bool


class Me(msgspec.Struct, kw_only=True):
    """The signed-in user and the token the request came with."""

    id: int
    username: str
    admin: bool
    token_id: int


class User(msgspec.Struct, kw_only=True):
    """One user."""

    id: int
    username: str
    admin: bool
    created_at: datetime


class IssuedToken(msgspec.Struct, kw_only=True):
    """A new token: ``token`` is its value, shown in this answer only."""

    id: int
    name: str
    kind: Literal["session", "named"]
    created_at: datetime
    expires_at: datetime | None
    token: str


class TokenInfo(msgspec.Struct, kw_only=True):
    """One token's record (never its value)."""

    id: int
    user_id: int
    username: str
    name: str
    kind: Literal["session", "named"]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


# -- lineage: what an experiment was trained from ----------------------------------------------------------------


class ExperimentLineage(msgspec.Struct, kw_only=True):
    """``GET /api/v1/experiments/{id}/lineage``: the config and code digests, the exact data version read and the
    parent checkpoint, as resolved at submission (``ExperimentSubmitted.lineage``)."""

    experiment_id: int
    config_digest: str  # sha256 of the config text as submitted
    code_digest: str  # sha256 of the code context (as ``context_digest``)
    data: ev.DataVersion | None  # the Delta table version pinned at submission; null: the config names no table
    parent: ev.SourceCheckpoint | None  # the checkpoint it starts from; null: from scratch
    recorded: bool = True  # false: submitted before lineage was recorded (digests derived, nothing else known)


# -- TensorBoard files of a trial (``kiln tensorboard start``) ------------------------------------------------


class TensorboardFile(msgspec.Struct, kw_only=True):
    """One file of a trial's TensorBoard directory in the store: its path under the directory and its size."""

    path: str
    size: int


class TensorboardListing(msgspec.Struct, kw_only=True):
    """A trial's TensorBoard files as the store holds them now (they grow while the trial runs)."""

    experiment_id: int
    trial_id: int
    files: list[TensorboardFile]
    truncated: bool = False  # more files than one answer lists (``MAX_TENSORBOARD_FILES``)

# -- the model registry --------------------------------------------------------------------------------------


class Model(msgspec.Struct, kw_only=True):
    """A model of the registry (Determined's ``Model``): a name, what describes it, and its versions."""

    id: int
    name: str
    description: str
    labels: list[str]
    metadata: dict[str, Any]
    owner: str  # who created it: only they (or an admin) register versions, change or delete it
    created_at: datetime
    updated_at: datetime
    num_versions: int
    last_version: int  # the highest version number it ever had (numbers are never reused)


class ModelVersion(msgspec.Struct, kw_only=True):
    """One version of a model: a registered checkpoint, never collected while registered."""

    model_id: int
    model_name: str
    version: int
    checkpoint_uuid: str
    experiment_id: int
    trial_id: int
    steps_completed: int | None  # None: the checkpoint is not in the read model
    checkpoint_state: Literal["COMPLETED", "DELETED"] | None
    name: str
    comment: str
    metadata: dict[str, Any]
    registered_by: str
    registered_at: datetime
    # The checkpoint's whole record (files, metadata, storage) when the caller may see its experiment's checkpoints
    # (its owner or an admin, as for ``GET /api/v1/checkpoints/{uuid}``); null otherwise.
    checkpoint: Checkpoint | None = None


class ModelRemoved(msgspec.Struct, kw_only=True):
    """What a delete took out of the registry: a whole model (its versions with it) or one version."""

    id: int
    name: str
    versions: list[int]  # the version numbers removed (a whole model's, or the one)
    model_deleted: bool


# -- continue and fork (Determined's ``det experiment continue`` / ``fork``) -----------------------------------


class ContinueRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /api/v1/experiments/{id}/continue``: override config fields as a YAML document (Determined's
    ``overrideConfig``); empty: continue with the config as it is."""

    config: Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$")] = ""


class ForkRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /api/v1/experiments/{id}/fork``: override config fields as a YAML document; empty: the same
    config. ``paused``: create the fork paused."""

    config: Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$")] = ""
    paused: bool = False


class Continued(msgspec.Struct, kw_only=True):
    """A continue accepted: these trials train again under ``config_yaml`` (the config with the overrides)."""

    id: int
    state: str
    trial_ids: list[int]
    config_yaml: str
    warnings: list[str]


class Forked(msgspec.Struct, kw_only=True):
    """A fork accepted: a new experiment with the old one's code and the merged config."""

    id: int
    forked_from: int
    warnings: list[str]
    context_digest: str
    config_yaml: str


# -- the web UI's reads (``services/gateway/ui``): pages of experiments, an experiment's curves -----------------


class ExperimentPage(msgspec.Struct, kw_only=True):
    """A page of experiments as filtered and sorted, and how many match in all."""

    total: int
    offset: int
    limit: int
    experiments: list[ExperimentSummary]


class TrialSeries(msgspec.Struct, kw_only=True):
    """One trial's (downsampled) series of a metric."""

    trial_id: int
    points: list[SeriesPoint]


class ExperimentSeries(msgspec.Struct, kw_only=True):
    """One metric's series of every trial of an experiment that reported it (learning curves)."""

    experiment_id: int
    kind: Literal["training", "validation"]
    name: str
    max_points: int  # per trial
    trials: list[TrialSeries]


class ExperimentMetricName(msgspec.Struct, kw_only=True):
    """A metric some trial of an experiment reported, and how many trials reported it."""

    kind: Literal["training", "validation"]
    name: str
    trials: int


class CheckpointFileInfo(msgspec.Struct, kw_only=True):
    """One file of a checkpoint as its uploader recorded it (schemas.checkpoint.CheckpointFile)."""

    size: int
    sha256: str = ""  # "" for a checkpoint stored before Kiln recorded hashes
    mtime: float | None = None  # seconds since the epoch; None when not recorded


class CheckpointFiles(msgspec.Struct, kw_only=True):
    """What the uploader recorded of a checkpoint: steps, framework, and each file (``GET .../files``)."""

    uuid: str
    steps_completed: int
    framework: str  # e.g. "torch-2.13.0"; "" when unknown
    hashed: bool  # False: stored before manifests, only sizes are known (and no download check)
    files: dict[str, CheckpointFileInfo]
