"""What the scheduler knows: workers, trial runs and experiment knobs, and its snapshot encoding.

Plain data and a few read-only helpers over it; the transitions are in ``lifecycle.py``. The snapshot is
``SchedulerState`` encoded whole with msgpack: Structs encode as maps of their field names, so a field added
here needs a default (an older snapshot restores without it) and a field is never renamed.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from schemas import events as ev
from schemas.config import (
    DEFAULT_MAX_RESTARTS,
    DEFAULT_PRIORITY,
    ConfigError,
    ExperimentConfig,
    ResourcesConfig,
    config_from_wire,
)

RunState = Literal["QUEUED", "ASSIGNED", "RUNNING", "PAUSED", "EXITED"]
# An experiment's knobs before (or without) its config: the config's own defaults.
_RESOURCES = ResourcesConfig()


class WorkerView(msgspec.Struct, kw_only=True):
    """A worker as its heartbeats describe it."""

    worker_id: str
    resource_pool: str
    slot_ids: list[str]
    last_seen: float
    address: str = ""
    lost: bool = False
    slots: list[ev.Slot] = []
    lost_at: float = 0.0  # when it was declared lost: heartbeats it sent before then are stale (buffered while cut off)


class TrialRun(msgspec.Struct, kw_only=True):
    """A trial's life on the cluster: queued, placed, running, restarted, done."""

    experiment_id: int
    trial_id: int
    slots: int
    priority: int
    resource_pool: str
    max_restarts: int
    queued_order: int
    state: RunState = "QUEUED"
    attempt: int = 0
    restarts: int = 0
    allocation_id: str = ""
    worker_id: str = ""  # the run's (first) host
    slot_ids: list[str] = []
    peers: dict[str, list[str]] = {}  # the other hosts of a multi-host run: worker id -> slot ids
    latest_checkpoint: str | None = None
    kill_requested: bool = False
    started_at: float = 0.0
    max_length: int | None = None  # what the searcher wants it trained to now
    assigned_length: int | None = None  # what the current/last run was told to train to
    stop_requested: bool = False
    preempt_requested: bool = False
    preempt_since: float = 0.0  # when the tick first saw the request (0: not yet)
    started_order: int = 0
    # From its TrialCreated, for the spec its placements carry; None: restored from an older snapshot.
    hparams: dict[str, Any] | None = None
    seed: int = 0
    # Its runs declared lost (AllocationLost): what they still report is fenced (their checkpoints are not the
    # trial's latest); their worker, cut off, may still be running them.
    lost_allocations: list[str] = []


class ExperimentKnobs(msgspec.Struct, kw_only=True):
    """The scheduling knobs of an experiment's config."""

    slots_per_trial: int = _RESOURCES.slots_per_trial
    priority: int = DEFAULT_PRIORITY
    resource_pool: str = _RESOURCES.resource_pool
    max_restarts: int = DEFAULT_MAX_RESTARTS
    killed: bool = False
    paused: bool = False
    weight: float = _RESOURCES.weight
    max_slots: int | None = _RESOURCES.max_slots
    # Promotion-based search (stop_once: false): a run that reached a shorter length than the
    # search's full length pauses instead of completing, and may be resumed.
    pausable: bool = False
    full_length: int | None = None
    # What its trials' placements carry (ev.TrialSpec): the config as submitted and the code context;
    # None when not submitted (yet), or restored from an older snapshot.
    config: dict[str, Any] | None = None
    context_digest: str = ""


class SchedulerState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Everything the scheduler knows; serialised whole into its snapshot.

    Facts added after the snapshot format was fixed live in tables of their own here, left out of the snapshot
    while empty (``omit_defaults``): a snapshot without them restores, and snapshots again, byte for byte."""

    workers: dict[str, WorkerView] = {}
    trials: dict[int, TrialRun] = {}
    experiments: dict[int, ExperimentKnobs] = {}
    next_order: int = 0
    next_start: int = 0
    # trial id -> which continue of its experiment it runs in (TrialContinueRequested); absent: its first run.
    continuations: dict[int, int] = {}
    # experiment id -> a fine-tune's source checkpoint (ExperimentSubmitted): every trial's first run starts there.
    sources: dict[int, ev.SourceCheckpoint] = {}
    # Experiments whose ExperimentEnded came: only those may be continued.
    ended: set[int] = set()


_SNAPSHOT_ENCODER = msgspec.msgpack.Encoder()
_SNAPSHOT_DECODER = msgspec.msgpack.Decoder(SchedulerState)


def encode_state(state: SchedulerState) -> bytes:
    """The whole state as snapshot bytes."""
    return _SNAPSHOT_ENCODER.encode(state)


def decode_state(data: bytes) -> SchedulerState:
    """The state a snapshot holds."""
    return _SNAPSHOT_DECODER.decode(data)


def knobs_from_config(config: ExperimentConfig) -> ExperimentKnobs:
    """The scheduling knobs of an experiment's config."""
    return ExperimentKnobs(
        slots_per_trial=config.resources.slots_per_trial,
        priority=config.priority,
        resource_pool=config.resource_pool,
        max_restarts=config.max_restarts,
        weight=config.resources.weight,
        max_slots=config.resources.max_slots,
        pausable=config.pausable,
        full_length=config.full_length,
    )


def knobs_of(event: ev.ExperimentSubmitted) -> ExperimentKnobs:
    """The knobs of a submitted experiment, with what its trials' placements carry."""
    try:
        knobs = knobs_from_config(config_from_wire(event.config))
    except ConfigError:
        # A config this version cannot read: the searcher ends the experiment (ERROR) and creates no trial.
        return ExperimentKnobs()
    knobs.config, knobs.context_digest = event.config, event.context_digest
    knobs.paused = event.paused  # created paused: its queue is held from the start
    return knobs


def fenced(run: TrialRun, allocation_id: str) -> bool:
    """Whether a report of ``allocation_id`` comes from a run of ``run`` that was declared lost."""
    return bool(allocation_id) and allocation_id in run.lost_allocations


def fence(run: TrialRun, allocation_id: str) -> None:
    """Record that the run ``allocation_id`` was declared lost: what it still reports is refused."""
    if allocation_id and allocation_id not in run.lost_allocations:
        run.lost_allocations.append(allocation_id)


def holding(run: TrialRun) -> bool:
    """Whether the run holds slots now (placed or running)."""
    return run.state in ("ASSIGNED", "RUNNING")


def holdings(run: TrialRun) -> dict[str, list[str]]:
    """Every host a run holds slots on (worker id -> slot ids); empty when it holds none."""
    if not run.worker_id:
        return {}
    return {run.worker_id: run.slot_ids, **run.peers}
