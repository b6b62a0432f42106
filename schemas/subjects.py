"""Streams and subjects: where each event lives on the bus (documented in README "Bus").

Subjects carry routing keys so a consumer can filter without decoding, and end with the token of the
principal that published them, so NATS permissions (which are per subject) can say who may publish what:

    kiln.events.<experiment>.experiment.<publisher>       experiment-level facts
    kiln.events.<experiment>.trial.<trial>.<publisher>    trial-level facts (searcher, scheduler, worker, gateway)
    kiln.events.<experiment>.worker.<worker>.<publisher>  allocation commands a worker acts on
    kiln.events.cluster.lost.<worker>.<publisher>         a worker was declared lost
    kiln.events.registry.model.<model>.<publisher>        the model registry (models and their versions)
    kiln.metrics.<experiment>.<trial>.<publisher>         training metric batches
    kiln.logs.<experiment>.<trial>.<publisher>            log line batches
    kiln.deadletter.<consumer>                            messages a consumer gave up on
    kiln.heartbeat.<worker>                               core NATS only, never stored

``<publisher>`` is the owning role (``gateway``, ``searcher``, ``scheduler``) or ``w-<worker id>`` for the
facts a worker publishes (its own and its trials'). ``OWNERS`` is the one table of who owns which event
type: ``subject_for`` derives the publisher token from it, deploy/stack.py derives each NATS user's publish
allow-list from it, and every consumer (``services.runtime.Bus.consume``) dead-letters an event whose type
its subject's publisher does not own ("forged").
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Literal, assert_never

import msgspec

from schemas import events as ev


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How one JetStream stream is declared."""

    name: str
    subjects: list[str]
    max_age_s: float = 0.0  # 0 = keep forever
    max_bytes: int = -1
    duplicate_window_s: float = 120.0


# Every subject of a stream: what it stores, and the filter (or subscription) for all of it.
ALL_EVENTS = "kiln.events.>"
ALL_METRICS = "kiln.metrics.>"
ALL_LOGS = "kiln.logs.>"
ALL_DEADLETTERS = "kiln.deadletter.>"

EVENTS = StreamSpec(name="KILN_EVENTS", subjects=[ALL_EVENTS])
METRICS = StreamSpec(name="KILN_METRICS", subjects=[ALL_METRICS])
LOGS = StreamSpec(name="KILN_LOGS", subjects=[ALL_LOGS], max_age_s=14 * 24 * 3600.0, max_bytes=8 << 30)
DEADLETTER = StreamSpec(name="KILN_DEADLETTER", subjects=[ALL_DEADLETTERS])
ALL_STREAMS = (EVENTS, METRICS, LOGS, DEADLETTER)

HEARTBEAT_SUBJECT = "kiln.heartbeat.*"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def check_token(value: str, what: str) -> str:
    """Return ``value`` if it can be one subject token (no dots, spaces or wildcards)."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{what} {value!r} must match [A-Za-z0-9_-]+ to be used in a subject")
    return value


Role = Literal["gateway", "searcher", "scheduler", "worker"]
ROLES: tuple[Role, ...] = ("gateway", "searcher", "scheduler", "worker")
WORKER_PREFIX = "w-"  # publisher token of a worker: w-<worker id>

# Who may publish each event type: the one table subjects, NATS permissions and the consumers' check use.
# A trial's own facts (metrics, validations, checkpoints, progress) are the worker's: the trial process
# holds no bus credential and its worker publishes them for it (services/worker/link.py, outbox.py).
OWNERS: dict[type, Role] = {
    ev.ExperimentSubmitted: "gateway",
    ev.ExperimentKillRequested: "gateway",
    ev.ExperimentPauseRequested: "gateway",
    ev.ExperimentActivateRequested: "gateway",
    ev.ExperimentResourcesChanged: "gateway",
    ev.ExperimentMetadataChanged: "gateway",
    ev.TrialKillRequested: "gateway",
    ev.CheckpointGCPolicyChanged: "gateway",
    # Objects leave the store through the gateway (it holds the store credential); the searcher only decides.
    ev.CheckpointsDeleted: "gateway",
    ev.ExperimentDeleted: "gateway",
    ev.CheckpointGCRequested: "searcher",
    # The model registry: user commands, published by the gateway on a user's behalf.
    ev.ModelCreated: "gateway",
    ev.ModelVersionRegistered: "gateway",
    ev.ModelMetadataChanged: "gateway",
    ev.ModelVersionDeleted: "gateway",
    ev.ModelDeleted: "gateway",
    ev.ExperimentContinued: "gateway",
    ev.TrialContinueRequested: "searcher",
    ev.TrialCreated: "searcher",
    ev.TrialStopRequested: "searcher",
    ev.TrialResumeRequested: "searcher",
    ev.ExperimentEnded: "searcher",
    ev.TrialPreemptRequested: "scheduler",
    ev.TrialPreempted: "scheduler",
    ev.TrialPaused: "scheduler",
    ev.AllocationAssigned: "scheduler",
    ev.AllocationKillRequested: "scheduler",
    ev.WorkerLost: "scheduler",
    ev.AllocationLost: "scheduler",
    ev.TrialRestarting: "scheduler",
    ev.TrialExited: "scheduler",
    ev.TrialStarted: "worker",
    ev.AllocationExited: "worker",
    ev.ValidationReported: "worker",
    ev.CheckpointStored: "worker",
    ev.TrialProgressReported: "worker",
    ev.TrainingMetricsReported: "worker",
    ev.LogsShipped: "worker",
}

# Each event type's subject without its publisher token, as a pattern (routing keys as wildcards).
_EXPERIMENT, _TRIAL, _WORKER_CMD = "kiln.events.*.experiment", "kiln.events.*.trial.*", "kiln.events.*.worker.*"
# "registry" is never an experiment id (ids are numbers), so no experiment filter matches these subjects.
_MODEL = "kiln.events.registry.model.*"
ROUTING_PATTERNS: dict[type, str] = {
    **{t: _EXPERIMENT for t in (ev.ExperimentSubmitted, ev.ExperimentKillRequested, ev.ExperimentEnded,
                                ev.ExperimentPauseRequested, ev.ExperimentActivateRequested,
                                ev.ExperimentResourcesChanged, ev.ExperimentMetadataChanged,
                                ev.CheckpointGCPolicyChanged,
                                ev.CheckpointGCRequested, ev.CheckpointsDeleted, ev.ExperimentDeleted,
                                ev.ExperimentContinued)},
    **{t: _WORKER_CMD for t in (ev.AllocationAssigned, ev.AllocationKillRequested)},
    **{t: _TRIAL for t in (ev.TrialCreated, ev.TrialStopRequested, ev.TrialKillRequested, ev.TrialPreemptRequested,
                           ev.TrialPreempted, ev.TrialResumeRequested, ev.TrialPaused, ev.TrialStarted,
                           ev.AllocationExited, ev.AllocationLost, ev.TrialRestarting, ev.TrialExited,
                           ev.ValidationReported, ev.CheckpointStored, ev.TrialProgressReported,
                           ev.TrialContinueRequested)},
    ev.WorkerLost: "kiln.events.cluster.lost.*",
    **{t: _MODEL for t in (ev.ModelCreated, ev.ModelVersionRegistered, ev.ModelMetadataChanged,
                           ev.ModelVersionDeleted, ev.ModelDeleted)},
    ev.TrainingMetricsReported: "kiln.metrics.*.*",
    ev.LogsShipped: "kiln.logs.*.*",
}


def worker_token(worker_id: str) -> str:
    """The publisher token of one worker's subjects."""
    return WORKER_PREFIX + check_token(worker_id, "worker id")


def publisher_token(role: Role, worker_id: str = "") -> str:
    """The last subject token of what ``role`` publishes (a worker's carries its id)."""
    if role == "worker":
        if not worker_id:
            raise ValueError("a worker's events carry its worker id: pass worker_id")
        return worker_token(worker_id)
    return role


def role_of_token(token: str) -> Role | None:
    """The role a publisher token names, or None when it names none."""
    if token.startswith(WORKER_PREFIX) and len(token) > len(WORKER_PREFIX):
        return "worker"
    return token if token in ("gateway", "searcher", "scheduler") else None  # type: ignore[return-value]


def publisher_of(subject: str) -> Role | None:
    """The role the publisher token of a stored subject names (None: no valid token, e.g. forged or legacy)."""
    tokens = subject.split(".")
    if len(tokens) < 2 or tokens[0] != "kiln" or tokens[1] not in ("events", "metrics", "logs"):
        return None
    return role_of_token(tokens[-1])


def forged(subject: str, event: object) -> str | None:
    """Why ``event`` must not be believed on ``subject`` (its publisher does not own its type), or None."""
    owner = OWNERS.get(type(event))
    if owner is None:
        return None  # dead letters: any consumer writes its own (kiln.deadletter.<consumer>)
    role = publisher_of(subject)
    if role == owner:
        return None
    return f"forged: {type(event).__name__} is published by the {owner} only, not on {subject!r} (publisher {role})"


def publish_allow(role: Role, worker_id: str = "") -> list[str]:
    """The subjects a principal of ``role`` may publish events on (a NATS publish allow-list), from OWNERS."""
    token = publisher_token(role, worker_id)
    return sorted({f"{ROUTING_PATTERNS[t]}.{token}" for t, owner in OWNERS.items() if owner == role})


def heartbeat_subject(worker_id: str) -> str:
    """Core NATS subject a worker heartbeats on."""
    return f"kiln.heartbeat.{check_token(worker_id, 'worker id')}"


# Consumer filters (any publisher: the consumer checks the publisher against OWNERS).
EXPERIMENT_FACTS = "kiln.events.*.experiment.*"
TRIAL_FACTS = "kiln.events.*.trial.*.*"
WORKER_COMMANDS = "kiln.events.*.worker.*.*"
CLUSTER_FACTS = "kiln.events.cluster.>"
MODEL_FACTS = "kiln.events.registry.model.*.*"


def worker_filter(worker_id: str) -> str:
    """Domain-stream filter for the allocation commands addressed to one worker."""
    return f"kiln.events.*.worker.{check_token(worker_id, 'worker id')}.*"


def lost_filter(worker_id: str) -> str:
    """The subjects of ``WorkerLost`` about one worker (it kills what it still runs when it hears one)."""
    return f"kiln.events.cluster.lost.{check_token(worker_id, 'worker id')}.*"


def experiment_filter(experiment_id: int) -> str:
    """Domain-stream filter for everything about one experiment (its audit trail)."""
    return f"kiln.events.{experiment_id}.>"


def experiment_facts_filter(experiment_id: int) -> str:
    """Domain-stream filter for the experiment-level facts of one experiment."""
    return f"kiln.events.{experiment_id}.experiment.*"


def trial_filter(experiment_id: int, trial_id: int | str = "*") -> str:
    """Domain-stream filter for the facts about one trial (or, with ``*``, every trial of the experiment)."""
    return f"kiln.events.{experiment_id}.trial.{trial_id}.*"


def metrics_filter(experiment_id: int | str = "*", trial_id: int | str = "*") -> str:
    """Metrics-stream filter for one trial's (or, with ``*``, several trials') metric batches."""
    return f"kiln.metrics.{experiment_id}.{trial_id}.*"


def logs_filter(experiment_id: int | str = "*", trial_id: int | str = "*") -> str:
    """Logs-stream filter for one trial's log batches."""
    return f"kiln.logs.{experiment_id}.{trial_id}.*"


def model_filter(model_id: int) -> str:
    """Domain-stream filter for everything about one model of the registry (its audit trail)."""
    return f"kiln.events.registry.model.{model_id}.*"


def deadletter_subject(consumer: str) -> str:
    """Subject a consumer dead-letters to."""
    return f"kiln.deadletter.{check_token(consumer, 'consumer')}"


def routing_subject(event: ev.DomainEvent | ev.MetricEvent | ev.LogEvent) -> str:
    """An event's subject without its publisher token (what a worker's outbox stores)."""
    match event:
        case (
            ev.ExperimentSubmitted()
            | ev.ExperimentKillRequested()
            | ev.ExperimentEnded()
            | ev.ExperimentPauseRequested()
            | ev.ExperimentActivateRequested()
            | ev.ExperimentResourcesChanged()
            | ev.ExperimentMetadataChanged()
            | ev.CheckpointGCPolicyChanged()
            | ev.CheckpointGCRequested()
            | ev.CheckpointsDeleted()
            | ev.ExperimentDeleted()
            | ev.ExperimentContinued()
        ):
            return f"kiln.events.{event.experiment_id}.experiment"
        case ev.AllocationAssigned() | ev.AllocationKillRequested():
            return f"kiln.events.{event.experiment_id}.worker.{check_token(event.worker_id, 'worker id')}"
        case (
            ev.TrialCreated()
            | ev.TrialStopRequested()
            | ev.TrialKillRequested()
            | ev.TrialPreemptRequested()
            | ev.TrialPreempted()
            | ev.TrialResumeRequested()
            | ev.TrialPaused()
            | ev.TrialStarted()
            | ev.AllocationExited()
            | ev.AllocationLost()
            | ev.TrialRestarting()
            | ev.TrialExited()
            | ev.ValidationReported()
            | ev.CheckpointStored()
            | ev.TrialProgressReported()
            | ev.TrialContinueRequested()
        ):
            return f"kiln.events.{event.experiment_id}.trial.{event.trial_id}"
        case ev.WorkerLost():
            return f"kiln.events.cluster.lost.{check_token(event.worker_id, 'worker id')}"
        case (
            ev.ModelCreated()
            | ev.ModelVersionRegistered()
            | ev.ModelMetadataChanged()
            | ev.ModelVersionDeleted()
            | ev.ModelDeleted()
        ):
            return f"kiln.events.registry.model.{event.model_id}"
        case ev.TrainingMetricsReported():
            return f"kiln.metrics.{event.experiment_id}.{event.trial_id}"
        case ev.LogsShipped():
            return f"kiln.logs.{event.experiment_id}.{event.trial_id}"
        case _:
            assert_never(event)


def subject_for(event: ev.DomainEvent | ev.MetricEvent | ev.LogEvent | ev.DeadLetterEvent,
                worker_id: str = "") -> str:
    """The one subject an event is published on: its routing subject and its owner's publisher token.

    A worker-owned event needs the publishing worker's id (``worker_id``); the others ignore it.
    """
    if isinstance(event, ev.MessageDeadLettered):
        return deadletter_subject(event.consumer)
    return f"{routing_subject(event)}.{publisher_token(OWNERS[type(event)], worker_id)}"


def _run(allocation_id: str) -> str:
    """The run part of a trial report's key ("" for a report from before reports carried their run)."""
    return f"@{allocation_id}" if allocation_id else ""


def _digest(uuids: Iterable[str]) -> str:
    """A short, order-independent digest of a set of checkpoint uuids (a dedupe key stays short)."""
    return hashlib.sha256("\n".join(sorted(uuids)).encode()).hexdigest()[:32]


def _nth(continuation: int) -> str:
    """The dedupe-key suffix of a fact repeated by a continue (none for the first run: keys stay as they were)."""
    return f":c{continuation}" if continuation else ""


def _once(request_id: str) -> str:
    """The dedupe-key suffix of a user request that may come again later (none in logs from before it existed)."""
    return f":{request_id}" if request_id else ""


def dedupe_key(event: ev.DomainEvent | ev.MetricEvent | ev.LogEvent | ev.DeadLetterEvent) -> str:
    """The ``Nats-Msg-Id`` of an event: the same fact published twice gets the same key."""
    match event:
        case ev.ExperimentSubmitted():
            return f"ExperimentSubmitted:{event.experiment_id}"
        case ev.ExperimentKillRequested():
            return f"ExperimentKillRequested:{event.experiment_id}{_once(event.request_id)}"
        case ev.ExperimentEnded():
            # A continued experiment ends again: each end is its own fact (within the dedupe window too).
            return f"ExperimentEnded:{event.experiment_id}{_nth(event.continuation)}"
        case ev.ExperimentDeleted():  # once: a second delete of the same experiment is the same fact
            return f"ExperimentDeleted:{event.experiment_id}"
        case ev.ExperimentPauseRequested() | ev.ExperimentActivateRequested():
            # Pause, activate, pause again are distinct facts; a retry of one request is not.
            return f"{type(event).__name__}:{event.experiment_id}:{event.request_id}"
        case ev.ExperimentResourcesChanged():
            return f"ExperimentResourcesChanged:{event.experiment_id}:{event.change_id}"
        case ev.ExperimentMetadataChanged():
            return f"ExperimentMetadataChanged:{event.experiment_id}:{event.change_id}"
        case ev.CheckpointGCPolicyChanged():
            return f"CheckpointGCPolicyChanged:{event.experiment_id}:{event.change_id}"
        case ev.CheckpointGCRequested():
            # The searcher decides deterministically: a replayed decision has the same key and is dropped.
            return f"CheckpointGCRequested:{event.experiment_id}:{_digest(c.uuid for c in event.checkpoints)}"
        case ev.CheckpointsDeleted():
            return f"CheckpointsDeleted:{event.experiment_id}:{_digest(event.uuids)}:{event.reason}"
        case ev.TrialKillRequested():
            return f"TrialKillRequested:{event.trial_id}{_once(event.request_id)}"
        case ev.TrialPreemptRequested() | ev.TrialPreempted():
            return f"{type(event).__name__}:{event.allocation_id}"
        case ev.TrialCreated():
            return f"TrialCreated:{event.experiment_id}:{event.request_id}"
        case ev.TrialStopRequested():
            return f"TrialStopRequested:{event.trial_id}"
        case ev.TrialResumeRequested():
            return f"TrialResumeRequested:{event.trial_id}:{event.max_length}"
        case ev.TrialPaused():
            return f"TrialPaused:{event.allocation_id}"
        case ev.AllocationAssigned() | ev.AllocationExited():
            # A multi-host allocation has one per host; node 0 keeps the single-host key.
            suffix = f"#{event.node_rank}" if event.node_rank else ""
            return f"{type(event).__name__}:{event.allocation_id}{suffix}"
        case ev.AllocationKillRequested():
            return f"AllocationKillRequested:{event.allocation_id}:{event.worker_id}"
        case ev.TrialStarted() | ev.AllocationLost():
            return f"{type(event).__name__}:{event.allocation_id}"
        case ev.WorkerLost():
            return f"WorkerLost:{event.worker_id}:{event.last_seen}"
        case ev.TrialRestarting():
            return f"TrialRestarting:{event.trial_id}:{event.restarts}{_nth(event.continuation)}"
        case ev.TrialExited():
            return f"TrialExited:{event.trial_id}{_nth(event.continuation)}"
        case ev.ValidationReported():
            # One run reporting a step again (a retried publish) is the same fact. Two runs reporting the same
            # step (a restart from an older checkpoint, or a run declared lost still going) are two: keyed by
            # the trial alone, whichever run published first would hide the other's, and a fenced run's report
            # would then stand in for the live run's. Consumers take a step once (searcher) or the last one
            # (tracker). Reports from before runs were stamped keep their old key.
            return f"ValidationReported:{event.trial_id}:{event.steps_completed}" + _run(event.allocation_id)
        case ev.CheckpointStored():
            return f"CheckpointStored:{event.uuid}"
        case ev.TrialProgressReported():
            return f"TrialProgressReported:{event.trial_id}:{event.progress:.6f}" + _run(event.allocation_id)
        case ev.ModelCreated() | ev.ModelDeleted():
            return f"{type(event).__name__}:{event.model_id}"
        case ev.ModelVersionRegistered() | ev.ModelVersionDeleted():
            # A version number is taken once: two registrations racing for it are one fact and a duplicate.
            return f"{type(event).__name__}:{event.model_id}:{event.version}"
        case ev.ModelMetadataChanged():
            return f"ModelMetadataChanged:{event.model_id}:{event.change_id}"
        case ev.TrainingMetricsReported():
            return f"TrainingMetricsReported:{event.trial_id}:{event.batch_id}"
        case ev.LogsShipped():
            first = event.lines[0].line_no if event.lines else -1
            return f"LogsShipped:{event.allocation_id}:{first}"
        case ev.MessageDeadLettered():
            return f"dl:{event.consumer}:{event.stream}:{event.stream_seq}"
        case ev.ExperimentContinued():
            return f"ExperimentContinued:{event.experiment_id}:{event.request_id}"
        case ev.TrialContinueRequested():
            return f"TrialContinueRequested:{event.trial_id}:{event.continuation}"
        case _:
            assert_never(event)
