"""Streams and subjects: where each event lives on the bus (documented in README "Bus").

Subjects carry routing keys so a consumer can filter without decoding:

    kiln.events.<experiment>.experiment           experiment-level facts
    kiln.events.<experiment>.trial.<trial>        trial-level facts (searcher, trial, scheduler)
    kiln.events.<experiment>.worker.<worker>      allocation commands a worker acts on
    kiln.events.cluster.lost.<worker>             a worker was declared lost
    kiln.metrics.<experiment>.<trial>             training metric batches
    kiln.logs.<experiment>.<trial>                log line batches
    kiln.deadletter.<consumer>                    messages a consumer gave up on
    kiln.heartbeat.<worker>                       core NATS only, never stored
"""

from __future__ import annotations

import re
from typing import assert_never

import msgspec

from schemas import events as ev


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How one JetStream stream is declared."""

    name: str
    subjects: list[str]
    max_age_s: float = 0.0  # 0 = keep forever
    max_bytes: int = -1
    duplicate_window_s: float = 120.0


EVENTS = StreamSpec(name="KILN_EVENTS", subjects=["kiln.events.>"])
METRICS = StreamSpec(name="KILN_METRICS", subjects=["kiln.metrics.>"])
LOGS = StreamSpec(name="KILN_LOGS", subjects=["kiln.logs.>"], max_age_s=14 * 24 * 3600.0, max_bytes=8 << 30)
DEADLETTER = StreamSpec(name="KILN_DEADLETTER", subjects=["kiln.deadletter.>"])
ALL_STREAMS = (EVENTS, METRICS, LOGS, DEADLETTER)

HEARTBEAT_SUBJECT = "kiln.heartbeat.*"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def check_token(value: str, what: str) -> str:
    """Return ``value`` if it can be one subject token (no dots, spaces or wildcards)."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{what} {value!r} must match [A-Za-z0-9_-]+ to be used in a subject")
    return value


def heartbeat_subject(worker_id: str) -> str:
    """Core NATS subject a worker heartbeats on."""
    return f"kiln.heartbeat.{check_token(worker_id, 'worker id')}"


def worker_filter(worker_id: str) -> str:
    """Domain-stream filter for the allocation commands addressed to one worker."""
    return f"kiln.events.*.worker.{check_token(worker_id, 'worker id')}"


def experiment_filter(experiment_id: int) -> str:
    """Domain-stream filter for everything about one experiment (its audit trail)."""
    return f"kiln.events.{experiment_id}.>"


def trial_filter(experiment_id: int, trial_id: int) -> str:
    """Domain-stream filter for the facts about one trial."""
    return f"kiln.events.{experiment_id}.trial.{trial_id}"


def deadletter_subject(consumer: str) -> str:
    """Subject a consumer dead-letters to."""
    return f"kiln.deadletter.{check_token(consumer, 'consumer')}"


def subject_for(event: ev.DomainEvent | ev.MetricEvent | ev.LogEvent | ev.DeadLetterEvent) -> str:
    """The one subject an event is published on."""
    match event:
        case (
            ev.ExperimentSubmitted()
            | ev.ExperimentKillRequested()
            | ev.ExperimentEnded()
            | ev.ExperimentPauseRequested()
            | ev.ExperimentActivateRequested()
            | ev.ExperimentResourcesChanged()
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
        ):
            return f"kiln.events.{event.experiment_id}.trial.{event.trial_id}"
        case ev.WorkerLost():
            return f"kiln.events.cluster.lost.{check_token(event.worker_id, 'worker id')}"
        case ev.TrainingMetricsReported():
            return f"kiln.metrics.{event.experiment_id}.{event.trial_id}"
        case ev.LogsShipped():
            return f"kiln.logs.{event.experiment_id}.{event.trial_id}"
        case ev.MessageDeadLettered():
            return deadletter_subject(event.consumer)
        case _:
            assert_never(event)


def dedupe_key(event: ev.DomainEvent | ev.MetricEvent | ev.LogEvent | ev.DeadLetterEvent) -> str:
    """The ``Nats-Msg-Id`` of an event: the same fact published twice gets the same key."""
    match event:
        case ev.ExperimentSubmitted():
            return f"ExperimentSubmitted:{event.experiment_id}"
        case ev.ExperimentKillRequested():
            return f"ExperimentKillRequested:{event.experiment_id}"
        case ev.ExperimentEnded():
            return f"ExperimentEnded:{event.experiment_id}"
        case ev.ExperimentPauseRequested() | ev.ExperimentActivateRequested():
            # Pause, activate, pause again are distinct facts; a retry of one request is not.
            return f"{type(event).__name__}:{event.experiment_id}:{event.request_id}"
        case ev.ExperimentResourcesChanged():
            return f"ExperimentResourcesChanged:{event.experiment_id}:{event.change_id}"
        case ev.TrialKillRequested():
            return f"TrialKillRequested:{event.trial_id}"
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
            return f"TrialRestarting:{event.trial_id}:{event.restarts}"
        case ev.TrialExited():
            return f"TrialExited:{event.trial_id}"
        case ev.ValidationReported():
            # A restarted trial re-reporting the same step is the same fact: not counted twice.
            return f"ValidationReported:{event.trial_id}:{event.steps_completed}"
        case ev.CheckpointStored():
            return f"CheckpointStored:{event.uuid}"
        case ev.TrialProgressReported():
            return f"TrialProgressReported:{event.trial_id}:{event.progress:.6f}"
        case ev.TrainingMetricsReported():
            return f"TrainingMetricsReported:{event.trial_id}:{event.batch_id}"
        case ev.LogsShipped():
            first = event.lines[0].line_no if event.lines else -1
            return f"LogsShipped:{event.allocation_id}:{first}"
        case ev.MessageDeadLettered():
            return f"dl:{event.consumer}:{event.stream}:{event.stream_seq}"
        case _:
            assert_never(event)
