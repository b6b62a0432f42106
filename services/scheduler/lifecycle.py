"""A trial run's life on the cluster, as transitions over ``SchedulerState``.

QUEUED → ASSIGNED (placed, ``placement.py``) → RUNNING → EXITED, or back to QUEUED (restarted after a
failure, preempted, promoted) or to PAUSED (a promotion search's rung reached; resumed to QUEUED). Workers
come and go: a silent one is lost, and so are the runs it held; a heartbeat that no longer lists a run
loses that run.

Each function mutates the state it is given and returns the events it decides (an empty list when it only
records a fact). A decided event is applied at once (so the next tick does not place a trial twice) and
again when it comes back through the stream, where applying it is a no-op. No I/O and no clock: time comes
in as ``now``.
"""

from __future__ import annotations

from schemas import events as ev
from schemas.config import ConfigError, config_from_wire
from services.scheduler.state import (
    ExperimentKnobs,
    SchedulerState,
    TrialRun,
    WorkerView,
    fence,
    fenced,
    holding,
    holdings,
    knobs_of,
)

# -- experiments -----------------------------------------------------------------------------------


def experiment_submitted(state: SchedulerState, e: ev.ExperimentSubmitted) -> None:
    """Learn an experiment's knobs (the first submission counts), and a fine-tune's source checkpoint."""
    if e.experiment_id in state.experiments:
        return
    state.experiments[e.experiment_id] = knobs_of(e)
    if e.source_checkpoint is not None:
        state.sources[e.experiment_id] = e.source_checkpoint


def experiment_kill_requested(state: SchedulerState, e: ev.ExperimentKillRequested) -> list[ev.DomainEvent]:
    """End the experiment's waiting trials now and ask its placed ones to be killed."""
    experiment_id = e.experiment_id
    knobs = state.experiments.setdefault(experiment_id, ExperimentKnobs())
    knobs.killed = True
    out: list[ev.DomainEvent] = []
    for run in state.trials.values():
        if run.experiment_id != experiment_id or run.state == "EXITED":
            continue
        if run.state in ("QUEUED", "PAUSED"):
            run.state = "EXITED"
            out.append(ev.TrialExited(experiment_id=experiment_id, trial_id=run.trial_id, state="CANCELED",
                                      restarts=run.restarts, reason="experiment killed",
                                      continuation=_nth(state, run)))
        elif not run.kill_requested:
            run.kill_requested = True
            out += kill_requests(run, "experiment killed")
    return out


def experiment_pause_requested(state: SchedulerState, e: ev.ExperimentPauseRequested) -> list[ev.DomainEvent]:
    """Hold the experiment's queue and ask its running trials to checkpoint and give back their slots."""
    knobs = state.experiments.setdefault(e.experiment_id, ExperimentKnobs())
    knobs.paused = True
    return [preempt(run, "experiment paused") for run in state.trials.values()
            if run.experiment_id == e.experiment_id and holding(run) and not run.preempt_requested]


def experiment_activated(state: SchedulerState, e: ev.ExperimentActivateRequested) -> None:
    """Release the experiment's queue."""
    state.experiments.setdefault(e.experiment_id, ExperimentKnobs()).paused = False


def resources_changed(state: SchedulerState, e: ev.ExperimentResourcesChanged) -> None:
    """New priority (for its trials too), weight or slot cap; ``max_slots`` ≤ 0 lifts the cap."""
    knobs = state.experiments.setdefault(e.experiment_id, ExperimentKnobs())
    if e.priority is not None:
        knobs.priority = e.priority
        for run in state.trials.values():
            if run.experiment_id == e.experiment_id:
                run.priority = e.priority
    if e.weight is not None:
        knobs.weight = e.weight
    if e.max_slots is not None:
        knobs.max_slots = e.max_slots if e.max_slots > 0 else None


def experiment_ended(state: SchedulerState, e: ev.ExperimentEnded) -> None:
    """Remember that the experiment ended: only an ended experiment may be continued."""
    state.ended.add(e.experiment_id)


def experiment_continued(state: SchedulerState, e: ev.ExperimentContinued) -> None:
    """A user continued the ended experiment: its knobs come from the continued config (priority, weight and
    max_slots stay as set on the experiment) and its queue is open again; the trials themselves come back
    with the searcher's TrialContinueRequested. A continue of an experiment that has not ended changes nothing."""
    knobs = state.experiments.get(e.experiment_id)
    if knobs is None or e.experiment_id not in state.ended:
        return
    try:
        config = config_from_wire(e.config)
    except ConfigError:
        return  # the searcher ignores it too: it reopens nothing
    state.ended.discard(e.experiment_id)
    knobs.killed = knobs.paused = False
    knobs.config = e.config
    knobs.slots_per_trial = config.resources.slots_per_trial
    knobs.resource_pool = config.resource_pool
    knobs.max_restarts = config.max_restarts
    knobs.pausable = config.pausable
    knobs.full_length = config.full_length


def trial_continue_requested(state: SchedulerState, e: ev.TrialContinueRequested) -> None:
    """An ended trial trains again: queued with the continued config's knobs, resuming from its latest
    checkpoint, its restarts counted from 0 (as Determined's continue)."""
    run = state.trials.get(e.trial_id)
    if run is None or run.state != "EXITED" or e.continuation <= state.continuations.get(e.trial_id, 0):
        return
    knobs = state.experiments.get(e.experiment_id, ExperimentKnobs())
    state.continuations[e.trial_id] = e.continuation
    run.state = "QUEUED"
    run.hparams = e.hparams
    run.max_length = e.max_length
    run.restarts = 0
    run.slots, run.resource_pool, run.max_restarts = knobs.slots_per_trial, knobs.resource_pool, knobs.max_restarts
    run.kill_requested = run.stop_requested = run.preempt_requested = False
    run.preempt_since = 0.0
    run.worker_id, run.slot_ids, run.peers = "", [], {}
    run.queued_order = state.next_order
    state.next_order += 1


# -- a trial's demand ------------------------------------------------------------------------------


def trial_created(state: SchedulerState, e: ev.TrialCreated) -> list[ev.DomainEvent]:
    """Queue the new trial with its experiment's knobs; cancel it at once if the experiment is killed."""
    if e.trial_id in state.trials:
        return []
    knobs = state.experiments.setdefault(e.experiment_id, ExperimentKnobs())
    run = TrialRun(
        experiment_id=e.experiment_id,
        trial_id=e.trial_id,
        slots=knobs.slots_per_trial,
        priority=knobs.priority,
        resource_pool=knobs.resource_pool,
        max_restarts=knobs.max_restarts,
        queued_order=state.next_order,
        max_length=e.max_length,
        hparams=e.hparams,
        seed=e.seed,
    )
    state.next_order += 1
    state.trials[e.trial_id] = run
    if (source := state.sources.get(e.experiment_id)) is not None:
        # A fine-tune: the first run starts from the source's weights; its own checkpoints take over from there.
        run.latest_checkpoint = source.uuid
    if knobs.killed:
        # Created before the searcher saw the kill: never run it.
        run.state = "EXITED"
        return [ev.TrialExited(experiment_id=run.experiment_id, trial_id=run.trial_id, state="CANCELED",
                               reason="experiment killed")]
    return []


def trial_kill_requested(state: SchedulerState, e: ev.TrialKillRequested) -> list[ev.DomainEvent]:
    """A user kills one trial."""
    return kill_trial(state, e.trial_id, "killed by user")


def kill_trial(state: SchedulerState, trial_id: int, reason: str) -> list[ev.DomainEvent]:
    """A waiting trial ends now; a placed one is asked to be killed (once)."""
    run = state.trials.get(trial_id)
    if run is None or run.state == "EXITED":
        return []
    if run.state in ("QUEUED", "PAUSED"):
        run.state = "EXITED"
        return [ev.TrialExited(experiment_id=run.experiment_id, trial_id=trial_id, state="CANCELED",
                               restarts=run.restarts, reason=reason, continuation=_nth(state, run))]
    if run.kill_requested:
        return []
    run.kill_requested = True
    return kill_requests(run, reason)


def stop_requested(state: SchedulerState, e: ev.TrialStopRequested) -> list[ev.DomainEvent]:
    """The searcher closed the trial: a paused one ends now, a running one when it exits."""
    run = state.trials.get(e.trial_id)
    if run is None or run.stop_requested:
        return []
    run.stop_requested = True
    if run.state in ("PAUSED", "QUEUED"):
        run.state = "EXITED"
        return [ev.TrialExited(experiment_id=run.experiment_id, trial_id=e.trial_id, state="COMPLETED",
                               restarts=run.restarts, reason="closed by the searcher", continuation=_nth(state, run))]
    return []


def resume_requested(state: SchedulerState, e: ev.TrialResumeRequested) -> None:
    """A promotion: train further, from the latest checkpoint."""
    run = state.trials.get(e.trial_id)
    if run is None or run.state == "EXITED" or (run.max_length or 0) >= e.max_length:
        return
    run.max_length = e.max_length
    if run.state == "PAUSED":
        run.state = "QUEUED"


# -- a run: placed, started, preempted, ended -------------------------------------------------------


def allocation_assigned(state: SchedulerState, e: ev.AllocationAssigned) -> None:
    """Adopt a placement (ours, decided a moment ago or read back from the log)."""
    run = state.trials.get(e.trial_id)
    attempt = _attempt(e.allocation_id)
    if run is None or run.state == "EXITED" or e.restarts < run.restarts or attempt < run.attempt:
        return  # a late echo of a placement a later decision (restart, pause) already replaced
    # The log is the truth: adopt what it says even if our in-memory decision differed.
    if e.node_rank:
        if e.allocation_id == run.allocation_id:
            run.peers[e.worker_id] = list(e.slot_ids)
        return
    if e.allocation_id != run.allocation_id:
        run.peers = {}
    run.attempt = attempt
    run.allocation_id = e.allocation_id
    run.worker_id = e.worker_id
    run.slot_ids = list(e.slot_ids)
    run.assigned_length = e.max_length if e.max_length is not None else run.max_length
    if run.state == "QUEUED":
        run.state = "ASSIGNED"


def trial_started(state: SchedulerState, e: ev.TrialStarted) -> None:
    """The placed run's process started."""
    run = state.trials.get(e.trial_id)
    if run is not None and run.allocation_id == e.allocation_id and run.state == "ASSIGNED":
        run.state = "RUNNING"
        run.started_at = e.started_at
        run.started_order = state.next_start
        state.next_start += 1


def checkpoint_stored(state: SchedulerState, e: ev.CheckpointStored) -> None:
    """The checkpoint its next run starts from (never one a run declared lost stored after it was: fenced)."""
    run = state.trials.get(e.trial_id)
    if run is not None and not fenced(run, e.allocation_id):
        run.latest_checkpoint = e.uuid


def preempt_requested(state: SchedulerState, e: ev.TrialPreemptRequested) -> None:
    """Record a request to checkpoint and give back the slots (ours, or read back from the log)."""
    run = state.trials.get(e.trial_id)
    if run is not None and run.allocation_id == e.allocation_id and holding(run):
        run.preempt_requested = True


def preempt(run: TrialRun, reason: str) -> ev.TrialPreemptRequested:
    """Ask a placed run to checkpoint and give back its slots."""
    run.preempt_requested = True
    return ev.TrialPreemptRequested(experiment_id=run.experiment_id, trial_id=run.trial_id,
                                    allocation_id=run.allocation_id, reason=reason)


def enforce_preemptions(state: SchedulerState, now: float, timeout_s: float) -> list[ev.DomainEvent]:
    """Kill runs that ignored a preemption request for longer than ``timeout_s``."""
    out: list[ev.DomainEvent] = []
    for run in state.trials.values():
        if not run.preempt_requested or not holding(run) or run.kill_requested:
            continue
        if not run.preempt_since:
            run.preempt_since = now
        elif now - run.preempt_since > timeout_s:
            run.kill_requested = True
            out += kill_requests(run, f"ignored preemption for {timeout_s:.0f}s")
    return out


def trial_paused(state: SchedulerState, e: ev.TrialPaused) -> None:
    """The run reached its rung and left its slots."""
    run = state.trials.get(e.trial_id)
    if run is not None and holding(run) and run.allocation_id == e.allocation_id:
        run.state = "PAUSED"


def allocation_exited(state: SchedulerState, e: ev.AllocationExited) -> list[ev.DomainEvent]:
    """A host's process of the run exited."""
    if e.node_rank and e.exit_code == 0:
        return []  # a multi-host run ends with node 0's exit, or with the first failure
    return allocation_ended(state, e.trial_id, e.allocation_id, e.exit_code, e.reason)


def allocation_lost(state: SchedulerState, e: ev.AllocationLost) -> list[ev.DomainEvent]:
    """A run's worker was lost, or no longer runs it: what the run still reports is fenced from now on."""
    run = state.trials.get(e.trial_id)
    if run is not None:
        fence(run, e.allocation_id)
    return allocation_ended(state, e.trial_id, e.allocation_id, None, "worker lost")


def allocation_ended(
    state: SchedulerState, trial_id: int, allocation_id: str, exit_code: int | None, reason: str
) -> list[ev.DomainEvent]:
    """The current run ended (exit code None: it was lost); stale or repeated ends change nothing."""
    run = state.trials.get(trial_id)
    if run is None or run.allocation_id != allocation_id or not holding(run):
        return []  # stale or already handled
    others: list[ev.DomainEvent] = []
    if run.peers and exit_code != 0:
        # The other hosts of a multi-host run would wait for the failed one forever: stop them.
        others = kill_requests(run, f"a host of the allocation failed: {reason or f'exit code {exit_code}'}")
    return others + _run_ended(state, run, allocation_id, exit_code, reason)


def _run_ended(state: SchedulerState, run: TrialRun, allocation_id: str, exit_code: int | None,
               reason: str) -> list[ev.DomainEvent]:
    """Where the trial goes next: canceled, back to the queue (preempted, restarted), done, or failed."""
    trial_id = run.trial_id
    run.worker_id, run.slot_ids, run.peers = "", [], {}
    base = {"experiment_id": run.experiment_id, "trial_id": trial_id, "restarts": run.restarts,
            "continuation": _nth(state, run)}
    if (run.kill_requested and not run.preempt_requested) or \
            state.experiments.get(run.experiment_id, ExperimentKnobs()).killed:
        run.state = "EXITED"
        return [ev.TrialExited(**base, state="CANCELED", exit_code=exit_code, reason="killed")]
    if run.preempt_requested and (exit_code == 0 or run.kill_requested):
        # It checkpointed and left (or was killed for ignoring the request): back to the queue,
        # not counted as a restart.
        run.preempt_requested, run.preempt_since, run.kill_requested = False, 0.0, False
        run.state = "QUEUED"
        return [ev.TrialPreempted(experiment_id=run.experiment_id, trial_id=trial_id, allocation_id=allocation_id)]
    if exit_code == 0:
        return _finished_run(state, run, allocation_id)
    if run.restarts < run.max_restarts:
        _requeue(state, trial_id, run.restarts + 1)
        return [ev.TrialRestarting(experiment_id=run.experiment_id, trial_id=trial_id, restarts=run.restarts,
                                   reason=reason or f"exit code {exit_code}", continuation=_nth(state, run))]
    run.state = "EXITED"
    why = reason or f"exit code {exit_code}"
    return [ev.TrialExited(**base, state="ERROR", exit_code=exit_code,
                           reason=f"{why}; max_restarts ({run.max_restarts}) reached")]


def _finished_run(state: SchedulerState, run: TrialRun, allocation_id: str) -> list[ev.DomainEvent]:
    """A run exited 0: the trial is done, or (promotion search) paused, or already promoted."""
    knobs = state.experiments.get(run.experiment_id, ExperimentKnobs())
    trained = run.assigned_length
    short = trained is not None and knobs.full_length is not None and trained < knobs.full_length
    if run.stop_requested or not knobs.pausable or not short:
        run.state = "EXITED"
        return [ev.TrialExited(experiment_id=run.experiment_id, trial_id=run.trial_id, state="COMPLETED",
                               exit_code=0, restarts=run.restarts, continuation=_nth(state, run))]
    paused = ev.TrialPaused(experiment_id=run.experiment_id, trial_id=run.trial_id,
                            allocation_id=allocation_id, length=trained)
    # Promoted while it was still running: straight back to the queue.
    run.state = "QUEUED" if (run.max_length or 0) > (trained or 0) else "PAUSED"
    return [paused]


def trial_restarting(state: SchedulerState, e: ev.TrialRestarting) -> None:
    """Back to the queue for restart number ``e.restarts`` (ours, or read back from the log)."""
    _requeue(state, e.trial_id, e.restarts)


def _requeue(state: SchedulerState, trial_id: int, restarts: int) -> None:
    run = state.trials.get(trial_id)
    if run is None or run.restarts >= restarts:
        return
    run.restarts = restarts
    run.state = "QUEUED"
    run.worker_id, run.slot_ids, run.peers = "", [], {}
    run.preempt_requested, run.preempt_since = False, 0.0


def trial_exited(state: SchedulerState, e: ev.TrialExited) -> None:
    """The trial is over."""
    run = state.trials.get(e.trial_id)
    if run is not None:
        run.state = "EXITED"


def _nth(state: SchedulerState, run: TrialRun) -> int:
    """Which continue of its experiment the run belongs to (0: the first run): numbers its exit and restarts."""
    return state.continuations.get(run.trial_id, 0)


def kill_requests(run: TrialRun, reason: str) -> list[ev.DomainEvent]:
    """Ask every host of the run's allocation to kill its process."""
    return [ev.AllocationKillRequested(experiment_id=run.experiment_id, trial_id=run.trial_id,
                                       allocation_id=run.allocation_id, worker_id=w, reason=reason)
            for w in holdings(run)]


def _attempt(allocation_id: str) -> int:
    """The attempt number in an allocation id ``<trial>.<attempt>``."""
    try:
        return int(allocation_id.rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return 0


# -- workers ---------------------------------------------------------------------------------------


def record_heartbeat(state: SchedulerState, hb: ev.WorkerHeartbeat) -> list[ev.DomainEvent]:
    """Record a worker's slots; a worker coming back after being lost is a new, empty one."""
    worker = state.workers.get(hb.worker_id)
    if worker is not None and worker.lost and hb.sent_at <= worker.lost_at:
        # Sent before it was declared lost, delivered now: its client buffered it while the network was cut.
        # It says nothing about the worker now (and would only get it declared lost a second time).
        return []
    if worker is None or worker.lost:
        worker = WorkerView(worker_id=hb.worker_id, resource_pool=hb.resource_pool, slot_ids=[], last_seen=0.0)
        state.workers[hb.worker_id] = worker
    worker.resource_pool = hb.resource_pool
    worker.slot_ids = [s.slot_id for s in hb.slots]
    worker.slots = list(hb.slots)
    worker.last_seen = max(worker.last_seen, hb.sent_at)
    worker.address = hb.address
    return _reconcile(state, worker, hb)


def _reconcile(state: SchedulerState, worker: WorkerView, hb: ev.WorkerHeartbeat) -> list[ev.DomainEvent]:
    """A run the worker no longer knows (it restarted) is lost, unless it just finished."""
    known = set(hb.running) | set(hb.finished)
    out: list[ev.DomainEvent] = []
    for run in list(state.trials.values()):
        # Only judge runs started well before this heartbeat was sent: an older heartbeat
        # can overtake the TrialStarted event.
        if (worker.worker_id not in holdings(run) or run.state != "RUNNING"
                or run.allocation_id in known or hb.sent_at < run.started_at + 5.0):
            continue
        out.append(ev.AllocationLost(experiment_id=run.experiment_id, trial_id=run.trial_id,
                                     allocation_id=run.allocation_id, worker_id=worker.worker_id))
        fence(run, run.allocation_id)
        out += allocation_ended(state, run.trial_id, run.allocation_id, None, "worker no longer runs it")
    return out


def give_workers_time(state: SchedulerState, now: float) -> None:
    """After a restart (or a bus outage), give every known worker a fresh timeout before judging it lost."""
    for worker in state.workers.values():
        worker.last_seen = max(worker.last_seen, now)


def lose_silent_workers(state: SchedulerState, now: float, timeout_s: float) -> list[ev.DomainEvent]:
    """Declare workers silent for longer than ``timeout_s`` lost, with the runs they held."""
    out: list[ev.DomainEvent] = []
    for worker in list(state.workers.values()):
        if not worker.lost and now - worker.last_seen > timeout_s:
            worker.lost_at = now
            out += _lose_worker(state, worker)
    return out


def _lose_worker(state: SchedulerState, worker: WorkerView) -> list[ev.DomainEvent]:
    worker.lost = True
    victims = [r for r in state.trials.values() if holding(r) and worker.worker_id in holdings(r)]
    out: list[ev.DomainEvent] = [
        ev.WorkerLost(worker_id=worker.worker_id, last_seen=worker.last_seen,
                      allocation_ids=[r.allocation_id for r in victims])
    ]
    for run in victims:
        lost = ev.AllocationLost(experiment_id=run.experiment_id, trial_id=run.trial_id,
                                 allocation_id=run.allocation_id, worker_id=worker.worker_id)
        out.append(lost)
        fence(run, run.allocation_id)
        out += allocation_ended(state, run.trial_id, run.allocation_id, None, "worker lost")
    return out


def worker_lost(state: SchedulerState, e: ev.WorkerLost) -> None:
    """Record a loss (ours, read back from the log)."""
    worker = state.workers.get(e.worker_id)
    if worker is not None:
        worker.lost = True
