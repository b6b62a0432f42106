"""The scheduler's pure core: trial demand and worker heartbeats in, placement decisions out.

Three kinds of input, each one method returning the events it decides: ``handle`` (a domain event, routed
by ``_HANDLERS``), ``heartbeat`` (a worker's statement of its slots) and ``tick`` (the clock). No I/O, no
clock of its own: time comes in as an argument, so tests drive it. The state snapshots to bytes.

Where things are:

* ``state.py``: the data (``SchedulerState`` and its parts) and the snapshot encoding;
* ``lifecycle.py``: a trial run's transitions (queued, placed, running, ended, restarted, paused, killed,
  preempted) and workers lost or reconciled;
* ``placement.py``: one pass of ``policy.py`` over the free slots and the queue;
* ``views.py``: the cluster view and the queue, for people;
* here: which event goes to which transition, and what a tick does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from schemas import events as ev
from schemas.cluster import ClusterView
from services.scheduler import lifecycle, placement, views
from services.scheduler.placement import RENDEZVOUS_PORTS
from services.scheduler.state import (
    ExperimentKnobs,
    RunState,
    SchedulerState,
    TrialRun,
    WorkerView,
    decode_state,
    encode_state,
    knobs_from_config,
)

__all__ = [
    "RENDEZVOUS_PORTS",
    "ExperimentKnobs",
    "RunState",
    "SchedulerCore",
    "SchedulerState",
    "TrialRun",
    "WorkerView",
    "knobs_from_config",
]

Handler = Callable[[SchedulerState, Any], list[ev.DomainEvent]]


class SchedulerCore:
    """Places queued trials on free slots, restarts failed ones, notices lost workers."""

    def __init__(self, state: SchedulerState | None = None, worker_timeout_s: float = 10.0,
                 preempt_timeout_s: float = 60.0) -> None:
        self.state = state or SchedulerState()
        self.worker_timeout_s = worker_timeout_s
        self.preempt_timeout_s = preempt_timeout_s

    def snapshot(self) -> bytes:
        """The whole state as bytes."""
        return encode_state(self.state)

    @classmethod
    def restore(cls, data: bytes, worker_timeout_s: float = 10.0, preempt_timeout_s: float = 60.0) -> SchedulerCore:
        """A core from a snapshot."""
        return cls(decode_state(data), worker_timeout_s, preempt_timeout_s)

    # -- inputs ------------------------------------------------------------------------------------

    def handle(self, event: ev.DomainEvent) -> list[ev.DomainEvent]:
        """Apply one domain event; return what the scheduler decides because of it."""
        # One handler per DomainEvent type (``_HANDLERS``, checked complete by a test).
        return _HANDLERS[type(event)](self.state, event)

    def heartbeat(self, hb: ev.WorkerHeartbeat) -> list[ev.DomainEvent]:
        """Record a worker's slots; a worker coming back after being lost is a new, empty one."""
        return lifecycle.record_heartbeat(self.state, hb)

    def resume(self, now: float) -> None:
        """After a restart, give every known worker a fresh timeout before judging it lost."""
        lifecycle.give_workers_time(self.state, now)

    def tick(self, now: float) -> list[ev.DomainEvent]:
        """Declare silent workers lost, kill runs that ignore a preemption, then place what fits."""
        return (lifecycle.lose_silent_workers(self.state, now, self.worker_timeout_s)
                + lifecycle.enforce_preemptions(self.state, now, self.preempt_timeout_s)
                + placement.place(self.state))

    # -- views (read-only) -------------------------------------------------------------------------

    def view(self, now: float) -> ClusterView:
        """Agents with their slots' occupants, and jobs with queue positions (for people)."""
        return views.cluster_view(self.state, now)

    def queue(self) -> list[TrialRun]:
        """Waiting trials in the order the policy considers them (for `kiln job list`)."""
        return views.queue(self.state)


def _records(apply: Callable[[SchedulerState, Any], None]) -> Handler:
    """A handler for a fact the scheduler only records: it decides nothing because of it."""

    def handler(state: SchedulerState, event: Any) -> list[ev.DomainEvent]:
        apply(state, event)
        return []

    return handler


def _ignored(state: SchedulerState, event: Any) -> list[ev.DomainEvent]:
    """A handler for an event the scheduler has no use for."""
    return []


# Every DomainEvent type, and what the scheduler does with it. Its own decisions come back through the
# stream too: applying them again is a no-op (lifecycle.py).
_HANDLERS: dict[type, Handler] = {
    # experiments
    ev.ExperimentSubmitted: _records(lifecycle.experiment_submitted),
    ev.ExperimentKillRequested: lifecycle.experiment_kill_requested,
    ev.ExperimentPauseRequested: lifecycle.experiment_pause_requested,
    ev.ExperimentActivateRequested: _records(lifecycle.experiment_activated),
    ev.ExperimentResourcesChanged: _records(lifecycle.resources_changed),
    ev.ExperimentEnded: _records(lifecycle.experiment_ended),
    ev.ExperimentContinued: _records(lifecycle.experiment_continued),
    # a trial's demand
    ev.TrialCreated: lifecycle.trial_created,
    ev.TrialKillRequested: lifecycle.trial_kill_requested,
    ev.TrialStopRequested: lifecycle.stop_requested,
    ev.TrialResumeRequested: _records(lifecycle.resume_requested),
    ev.TrialContinueRequested: _records(lifecycle.trial_continue_requested),
    # a run
    ev.AllocationAssigned: _records(lifecycle.allocation_assigned),
    ev.TrialStarted: _records(lifecycle.trial_started),
    ev.CheckpointStored: _records(lifecycle.checkpoint_stored),
    ev.TrialPreemptRequested: _records(lifecycle.preempt_requested),
    ev.TrialPaused: _records(lifecycle.trial_paused),
    ev.AllocationExited: lifecycle.allocation_exited,
    ev.AllocationLost: lifecycle.allocation_lost,
    ev.TrialRestarting: _records(lifecycle.trial_restarting),
    ev.TrialExited: _records(lifecycle.trial_exited),
    ev.WorkerLost: _records(lifecycle.worker_lost),
    # Decided together with the state change they report (applied when decided), or not the scheduler's
    # concern.
    ev.TrialPreempted: _ignored,
    ev.AllocationKillRequested: _ignored,
    ev.ValidationReported: _ignored,
    ev.TrialProgressReported: _ignored,
    # Checkpoint retention is the searcher's and the gateway's: no slot changes hands.
    ev.CheckpointGCPolicyChanged: _ignored,
    ev.ExperimentDeleted: _ignored,
    ev.ExperimentMetadataChanged: _ignored,  # names and labels do not schedule anything
    ev.CheckpointGCRequested: _ignored,
    ev.CheckpointsDeleted: _ignored,
    # The model registry names checkpoints; it places nothing.
    ev.ModelCreated: _ignored,
    ev.ModelVersionRegistered: _ignored,
    ev.ModelMetadataChanged: _ignored,
    ev.ModelVersionDeleted: _ignored,
    ev.ModelDeleted: _ignored,
}
