"""The scheduler's pure core: trial demand and worker heartbeats in, placement decisions out.

Three kinds of input, each one method returning the events it decides: ``handle`` (a domain event),
``heartbeat`` (a worker's statement of its slots) and ``tick`` (the clock). No I/O, no clock of its own:
time comes in as an argument, so tests drive it. The state snapshots to bytes.

Decided events are applied to the state at once (so the next tick does not place a trial twice) and
again when they come back through the stream, where applying them is a no-op.
"""

from __future__ import annotations

import zlib
from typing import Any, Literal

import msgspec

from schemas import events as ev
from schemas.cluster import AgentView, ClusterView, JobView, SlotView
from schemas.config import (
    DEFAULT_MAX_RESTARTS,
    DEFAULT_PRIORITY,
    ConfigError,
    ExperimentConfig,
    ResourcesConfig,
    config_from_wire,
)
from services.scheduler import policy

RunState = Literal["QUEUED", "ASSIGNED", "RUNNING", "PAUSED", "EXITED"]
# An experiment's knobs before (or without) its config: the config's own defaults.
_RESOURCES = ResourcesConfig()
# torch.distributed rendezvous ports for multi-host trials: node 0 listens on one of these, picked from
# the allocation id so every node computes the same one.
RENDEZVOUS_PORTS = range(29400, 30000)


class WorkerView(msgspec.Struct, kw_only=True):
    """A worker as its heartbeats describe it."""

    worker_id: str
    resource_pool: str
    slot_ids: list[str]
    last_seen: float
    address: str = ""
    lost: bool = False
    slots: list[ev.Slot] = []


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


class SchedulerState(msgspec.Struct, kw_only=True):
    """Everything the scheduler knows; serialised whole into its snapshot."""

    workers: dict[str, WorkerView] = {}
    trials: dict[int, TrialRun] = {}
    experiments: dict[int, ExperimentKnobs] = {}
    next_order: int = 0
    next_start: int = 0


_SNAPSHOT_ENCODER = msgspec.msgpack.Encoder()
_SNAPSHOT_DECODER = msgspec.msgpack.Decoder(SchedulerState)


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


def _knobs_of(event: ev.ExperimentSubmitted) -> ExperimentKnobs:
    try:
        knobs = knobs_from_config(config_from_wire(event.config))
    except ConfigError:
        # A config this version cannot read: the searcher ends the experiment (ERROR) and creates no trial.
        return ExperimentKnobs()
    knobs.config, knobs.context_digest = event.config, event.context_digest
    return knobs


class SchedulerCore:
    """Places queued trials on free slots, restarts failed ones, notices lost workers."""

    def __init__(self, state: SchedulerState | None = None, worker_timeout_s: float = 10.0,
                 preempt_timeout_s: float = 60.0) -> None:
        self.state = state or SchedulerState()
        self.worker_timeout_s = worker_timeout_s
        self.preempt_timeout_s = preempt_timeout_s

    def snapshot(self) -> bytes:
        """The whole state as bytes."""
        return _SNAPSHOT_ENCODER.encode(self.state)

    @classmethod
    def restore(cls, data: bytes, worker_timeout_s: float = 10.0, preempt_timeout_s: float = 60.0) -> SchedulerCore:
        """A core from a snapshot."""
        return cls(_SNAPSHOT_DECODER.decode(data), worker_timeout_s, preempt_timeout_s)

    # -- inputs ------------------------------------------------------------------------------------

    def handle(self, event: ev.DomainEvent) -> list[ev.DomainEvent]:
        """Apply one domain event; return what the scheduler decides because of it."""
        match event:
            case ev.ExperimentSubmitted():
                self.state.experiments.setdefault(event.experiment_id, _knobs_of(event))
                return []
            case ev.TrialCreated():
                return self._trial_created(event)
            case ev.ExperimentKillRequested():
                return self._kill_experiment(event.experiment_id)
            case ev.ExperimentPauseRequested():
                return self._pause_experiment(event.experiment_id)
            case ev.ExperimentActivateRequested():
                self.state.experiments.setdefault(event.experiment_id, ExperimentKnobs()).paused = False
                return []
            case ev.ExperimentResourcesChanged():
                self._change_resources(event)
                return []
            case ev.TrialKillRequested():
                return self._kill_trial(event.trial_id, "killed by user")
            case ev.TrialPreemptRequested():
                run = self.state.trials.get(event.trial_id)
                if run is not None and run.allocation_id == event.allocation_id and run.state in ("ASSIGNED", "RUNNING"):
                    run.preempt_requested = True
                return []
            case ev.TrialPreempted():
                return []
            case ev.AllocationAssigned():
                self._assigned(event)
                return []
            case ev.TrialStarted():
                run = self.state.trials.get(event.trial_id)
                if run is not None and run.allocation_id == event.allocation_id and run.state == "ASSIGNED":
                    run.state = "RUNNING"
                    run.started_at = event.started_at
                    run.started_order = self.state.next_start
                    self.state.next_start += 1
                return []
            case ev.CheckpointStored():
                run = self.state.trials.get(event.trial_id)
                if run is not None:
                    run.latest_checkpoint = event.uuid
                return []
            case ev.TrialStopRequested():
                return self._stop_requested(event.trial_id)
            case ev.TrialResumeRequested():
                return self._resume_requested(event.trial_id, event.max_length)
            case ev.TrialPaused():
                run = self.state.trials.get(event.trial_id)
                if run is not None and run.state in ("ASSIGNED", "RUNNING") and run.allocation_id == event.allocation_id:
                    run.state = "PAUSED"
                return []
            case ev.AllocationExited():
                if event.node_rank and event.exit_code == 0:
                    return []  # a multi-host run ends with node 0's exit, or with the first failure
                return self._allocation_ended(event.trial_id, event.allocation_id, event.exit_code, event.reason)
            case ev.AllocationLost():
                return self._allocation_ended(event.trial_id, event.allocation_id, None, "worker lost")
            case ev.TrialRestarting():
                self._requeue(event.trial_id, event.restarts)
                return []
            case ev.TrialExited():
                run = self.state.trials.get(event.trial_id)
                if run is not None:
                    run.state = "EXITED"
                return []
            case ev.WorkerLost():
                worker = self.state.workers.get(event.worker_id)
                if worker is not None:
                    worker.lost = True
                return []
            case _:
                return []

    def heartbeat(self, hb: ev.WorkerHeartbeat) -> list[ev.DomainEvent]:
        """Record a worker's slots; a worker coming back after being lost is a new, empty one."""
        worker = self.state.workers.get(hb.worker_id)
        if worker is None or worker.lost:
            worker = WorkerView(worker_id=hb.worker_id, resource_pool=hb.resource_pool, slot_ids=[], last_seen=0.0)
            self.state.workers[hb.worker_id] = worker
        worker.resource_pool = hb.resource_pool
        worker.slot_ids = [s.slot_id for s in hb.slots]
        worker.slots = list(hb.slots)
        worker.last_seen = max(worker.last_seen, hb.sent_at)
        worker.address = hb.address
        return self._reconcile(worker, hb)

    def resume(self, now: float) -> None:
        """After a restart, give every known worker a fresh timeout before judging it lost."""
        for worker in self.state.workers.values():
            worker.last_seen = max(worker.last_seen, now)

    def tick(self, now: float) -> list[ev.DomainEvent]:
        """Declare silent workers lost, kill runs that ignore a preemption, then place what fits."""
        out: list[ev.DomainEvent] = []
        for worker in list(self.state.workers.values()):
            if not worker.lost and now - worker.last_seen > self.worker_timeout_s:
                out += self._lose_worker(worker)
        for run in self.state.trials.values():
            if not run.preempt_requested or run.state not in ("ASSIGNED", "RUNNING") or run.kill_requested:
                continue
            if not run.preempt_since:
                run.preempt_since = now
            elif now - run.preempt_since > self.preempt_timeout_s:
                run.kill_requested = True
                out += _kill_requests(run, f"ignored preemption for {self.preempt_timeout_s:.0f}s")
        return out + self._place(now)

    # -- internals ---------------------------------------------------------------------------------

    def _trial_created(self, event: ev.TrialCreated) -> list[ev.DomainEvent]:
        if event.trial_id in self.state.trials:
            return []
        knobs = self.state.experiments.setdefault(event.experiment_id, ExperimentKnobs())
        run = TrialRun(
            experiment_id=event.experiment_id,
            trial_id=event.trial_id,
            slots=knobs.slots_per_trial,
            priority=knobs.priority,
            resource_pool=knobs.resource_pool,
            max_restarts=knobs.max_restarts,
            queued_order=self.state.next_order,
            max_length=event.max_length,
            hparams=event.hparams,
            seed=event.seed,
        )
        self.state.next_order += 1
        self.state.trials[event.trial_id] = run
        if knobs.killed:
            # Created before the searcher saw the kill: never run it.
            run.state = "EXITED"
            return [ev.TrialExited(experiment_id=run.experiment_id, trial_id=run.trial_id, state="CANCELED",
                                   reason="experiment killed")]
        return []

    def _kill_experiment(self, experiment_id: int) -> list[ev.DomainEvent]:
        knobs = self.state.experiments.setdefault(experiment_id, ExperimentKnobs())
        knobs.killed = True
        out: list[ev.DomainEvent] = []
        for run in self.state.trials.values():
            if run.experiment_id != experiment_id or run.state == "EXITED":
                continue
            if run.state in ("QUEUED", "PAUSED"):
                run.state = "EXITED"
                out.append(ev.TrialExited(experiment_id=experiment_id, trial_id=run.trial_id, state="CANCELED",
                                          restarts=run.restarts, reason="experiment killed"))
            elif not run.kill_requested:
                run.kill_requested = True
                out += _kill_requests(run, "experiment killed")
        return out

    def _pause_experiment(self, experiment_id: int) -> list[ev.DomainEvent]:
        """Hold the experiment's queue and ask its running trials to checkpoint and give back their slots."""
        knobs = self.state.experiments.setdefault(experiment_id, ExperimentKnobs())
        knobs.paused = True
        return [self._preempt(run, "experiment paused") for run in self.state.trials.values()
                if run.experiment_id == experiment_id and run.state in ("ASSIGNED", "RUNNING")
                and not run.preempt_requested]

    def _preempt(self, run: TrialRun, reason: str) -> ev.TrialPreemptRequested:
        run.preempt_requested = True
        return ev.TrialPreemptRequested(experiment_id=run.experiment_id, trial_id=run.trial_id,
                                        allocation_id=run.allocation_id, reason=reason)

    def _kill_trial(self, trial_id: int, reason: str) -> list[ev.DomainEvent]:
        run = self.state.trials.get(trial_id)
        if run is None or run.state == "EXITED":
            return []
        if run.state in ("QUEUED", "PAUSED"):
            run.state = "EXITED"
            return [ev.TrialExited(experiment_id=run.experiment_id, trial_id=trial_id, state="CANCELED",
                                   restarts=run.restarts, reason=reason)]
        if run.kill_requested:
            return []
        run.kill_requested = True
        return _kill_requests(run, reason)

    def _change_resources(self, event: ev.ExperimentResourcesChanged) -> None:
        knobs = self.state.experiments.setdefault(event.experiment_id, ExperimentKnobs())
        if event.priority is not None:
            knobs.priority = event.priority
            for run in self.state.trials.values():
                if run.experiment_id == event.experiment_id:
                    run.priority = event.priority
        if event.weight is not None:
            knobs.weight = event.weight
        if event.max_slots is not None:
            knobs.max_slots = event.max_slots if event.max_slots > 0 else None

    def _assigned(self, event: ev.AllocationAssigned) -> None:
        run = self.state.trials.get(event.trial_id)
        attempt = _attempt(event.allocation_id)
        if run is None or run.state == "EXITED" or event.restarts < run.restarts or attempt < run.attempt:
            return  # a late echo of a placement a later decision (restart, pause) already replaced
        # The log is the truth: adopt what it says even if our in-memory decision differed.
        if event.node_rank:
            if event.allocation_id == run.allocation_id:
                run.peers[event.worker_id] = list(event.slot_ids)
            return
        if event.allocation_id != run.allocation_id:
            run.peers = {}
        run.attempt = attempt
        run.allocation_id = event.allocation_id
        run.worker_id = event.worker_id
        run.slot_ids = list(event.slot_ids)
        run.assigned_length = event.max_length if event.max_length is not None else run.max_length
        if run.state == "QUEUED":
            run.state = "ASSIGNED"

    def _allocation_ended(
        self, trial_id: int, allocation_id: str, exit_code: int | None, reason: str
    ) -> list[ev.DomainEvent]:
        run = self.state.trials.get(trial_id)
        if run is None or run.allocation_id != allocation_id or run.state not in ("ASSIGNED", "RUNNING"):
            return []  # stale or already handled
        others: list[ev.DomainEvent] = []
        if run.peers and exit_code != 0:
            # The other hosts of a multi-host run would wait for the failed one forever: stop them.
            others = _kill_requests(run, f"a host of the allocation failed: {reason or f'exit code {exit_code}'}")
        return others + self._run_ended(run, allocation_id, exit_code, reason)

    def _run_ended(self, run: TrialRun, allocation_id: str, exit_code: int | None,
                   reason: str) -> list[ev.DomainEvent]:
        trial_id = run.trial_id
        run.worker_id, run.slot_ids, run.peers = "", [], {}
        base = {"experiment_id": run.experiment_id, "trial_id": trial_id, "restarts": run.restarts}
        if (run.kill_requested and not run.preempt_requested) or \
                self.state.experiments.get(run.experiment_id, ExperimentKnobs()).killed:
            run.state = "EXITED"
            return [ev.TrialExited(**base, state="CANCELED", exit_code=exit_code, reason="killed")]
        if run.preempt_requested and (exit_code == 0 or run.kill_requested):
            # It checkpointed and left (or was killed for ignoring the request): back to the queue,
            # not counted as a restart.
            run.preempt_requested, run.preempt_since, run.kill_requested = False, 0.0, False
            run.state = "QUEUED"
            return [ev.TrialPreempted(experiment_id=run.experiment_id, trial_id=trial_id, allocation_id=allocation_id)]
        if exit_code == 0:
            return self._finished_run(run, allocation_id)
        if run.restarts < run.max_restarts:
            self._requeue(trial_id, run.restarts + 1)
            return [ev.TrialRestarting(experiment_id=run.experiment_id, trial_id=trial_id, restarts=run.restarts,
                                       reason=reason or f"exit code {exit_code}")]
        run.state = "EXITED"
        why = reason or f"exit code {exit_code}"
        return [ev.TrialExited(**base, state="ERROR", exit_code=exit_code,
                               reason=f"{why}; max_restarts ({run.max_restarts}) reached")]

    def _finished_run(self, run: TrialRun, allocation_id: str) -> list[ev.DomainEvent]:
        """A run exited 0: the trial is done, or (promotion search) paused, or already promoted."""
        knobs = self.state.experiments.get(run.experiment_id, ExperimentKnobs())
        trained = run.assigned_length
        short = trained is not None and knobs.full_length is not None and trained < knobs.full_length
        if run.stop_requested or not knobs.pausable or not short:
            run.state = "EXITED"
            return [ev.TrialExited(experiment_id=run.experiment_id, trial_id=run.trial_id, state="COMPLETED",
                                   exit_code=0, restarts=run.restarts)]
        paused = ev.TrialPaused(experiment_id=run.experiment_id, trial_id=run.trial_id,
                                allocation_id=allocation_id, length=trained)
        # Promoted while it was still running: straight back to the queue.
        run.state = "QUEUED" if (run.max_length or 0) > (trained or 0) else "PAUSED"
        return [paused]

    def _stop_requested(self, trial_id: int) -> list[ev.DomainEvent]:
        """The searcher closed the trial: a paused one ends now, a running one when it exits."""
        run = self.state.trials.get(trial_id)
        if run is None or run.stop_requested:
            return []
        run.stop_requested = True
        if run.state in ("PAUSED", "QUEUED"):
            run.state = "EXITED"
            return [ev.TrialExited(experiment_id=run.experiment_id, trial_id=trial_id, state="COMPLETED",
                                   restarts=run.restarts, reason="closed by the searcher")]
        return []

    def _resume_requested(self, trial_id: int, max_length: int) -> list[ev.DomainEvent]:
        """A promotion: train further, from the latest checkpoint."""
        run = self.state.trials.get(trial_id)
        if run is None or run.state == "EXITED" or (run.max_length or 0) >= max_length:
            return []
        run.max_length = max_length
        if run.state == "PAUSED":
            run.state = "QUEUED"
        return []

    def _requeue(self, trial_id: int, restarts: int) -> None:
        run = self.state.trials.get(trial_id)
        if run is None or run.restarts >= restarts:
            return
        run.restarts = restarts
        run.state = "QUEUED"
        run.worker_id, run.slot_ids, run.peers = "", [], {}
        run.preempt_requested, run.preempt_since = False, 0.0

    def _lose_worker(self, worker: WorkerView) -> list[ev.DomainEvent]:
        worker.lost = True
        victims = [r for r in self.state.trials.values()
                   if r.state in ("ASSIGNED", "RUNNING") and worker.worker_id in _holdings(r)]
        out: list[ev.DomainEvent] = [
            ev.WorkerLost(worker_id=worker.worker_id, last_seen=worker.last_seen,
                          allocation_ids=[r.allocation_id for r in victims])
        ]
        for run in victims:
            lost = ev.AllocationLost(experiment_id=run.experiment_id, trial_id=run.trial_id,
                                     allocation_id=run.allocation_id, worker_id=worker.worker_id)
            out.append(lost)
            out += self._allocation_ended(run.trial_id, run.allocation_id, None, "worker lost")
        return out

    def _reconcile(self, worker: WorkerView, hb: ev.WorkerHeartbeat) -> list[ev.DomainEvent]:
        """A run the worker no longer knows (it restarted) is lost, unless it just finished."""
        known = set(hb.running) | set(hb.finished)
        out: list[ev.DomainEvent] = []
        for run in list(self.state.trials.values()):
            # Only judge runs started well before this heartbeat was sent: an older heartbeat
            # can overtake the TrialStarted event.
            if (worker.worker_id not in _holdings(run) or run.state != "RUNNING"
                    or run.allocation_id in known or hb.sent_at < run.started_at + 5.0):
                continue
            out.append(ev.AllocationLost(experiment_id=run.experiment_id, trial_id=run.trial_id,
                                         allocation_id=run.allocation_id, worker_id=worker.worker_id))
            out += self._allocation_ended(run.trial_id, run.allocation_id, None, "worker no longer runs it")
        return out

    def _hosts(self) -> list[policy.Host]:
        used = {(w, sl) for r in self.state.trials.values()
                if r.state in ("ASSIGNED", "RUNNING") for w, slots in _holdings(r).items() for sl in slots}
        return [
            policy.Host(worker_id=w.worker_id, resource_pool=w.resource_pool, slot_ids=list(w.slot_ids),
                        free=[sl for sl in w.slot_ids if (w.worker_id, sl) not in used])
            for w in sorted(self.state.workers.values(), key=lambda w: w.worker_id)
            if not w.lost
        ]

    def _place(self, now: float) -> list[ev.DomainEvent]:
        """One policy pass (policy.py): placements, and preemptions for what cannot fit."""
        runs = self.state.trials
        knobs = self.state.experiments
        running = [
            policy.Running(trial_id=r.trial_id, experiment_id=r.experiment_id, priority=r.priority,
                           worker_slots=_holdings(r), started_order=r.started_order,
                           preempting=r.preempt_requested)
            for r in runs.values() if r.state in ("ASSIGNED", "RUNNING")
        ]
        queued = [
            policy.Demand(trial_id=r.trial_id, experiment_id=r.experiment_id, priority=r.priority, slots=r.slots,
                          resource_pool=r.resource_pool, queued_order=r.queued_order)
            for r in runs.values()
            if r.state == "QUEUED" and not knobs.get(r.experiment_id, ExperimentKnobs()).paused
        ]
        if not queued:
            return []
        shares = {e: policy.Share(weight=k.weight, max_slots=k.max_slots) for e, k in knobs.items()}
        decided = policy.plan(self._hosts(), running, queued, shares)
        out: list[ev.DomainEvent] = []
        for placement in decided.placements:
            run = runs[placement.trial_id]
            run.attempt += 1
            for assigned in self._assignments(run, f"{run.trial_id}.{run.attempt}", placement.worker_slots):
                self._assigned(assigned)
                out.append(assigned)
        for trial_id in decided.preempt:
            run = runs[trial_id]
            if not run.preempt_requested:
                out.append(self._preempt(run, "a higher-priority trial needs its slots"))
        return out

    def _assignments(self, run: TrialRun, allocation_id: str,
                     worker_slots: dict[str, list[str]]) -> list[ev.AllocationAssigned]:
        """One AllocationAssigned per host; several hosts get their ranks and the rendezvous address."""
        nodes = [ev.AllocationNode(worker_id=w, address=self.state.workers[w].address, slot_ids=list(slots))
                 for w, slots in worker_slots.items()] if len(worker_slots) > 1 else []
        port = RENDEZVOUS_PORTS[zlib.crc32(allocation_id.encode()) % len(RENDEZVOUS_PORTS)] if nodes else 0
        spec = self._spec(run)
        return [
            ev.AllocationAssigned(
                experiment_id=run.experiment_id, trial_id=run.trial_id, allocation_id=allocation_id,
                worker_id=worker_id, slot_ids=list(slot_ids), restarts=run.restarts,
                latest_checkpoint=run.latest_checkpoint, max_length=run.max_length,
                node_rank=rank, nodes=nodes, master_port=port, spec=spec,
            )
            for rank, (worker_id, slot_ids) in enumerate(worker_slots.items())
        ]

    def _spec(self, run: TrialRun) -> ev.TrialSpec | None:
        """What the worker needs to start the run, from the facts this core folded; None if it lacks them."""
        knobs = self.state.experiments.get(run.experiment_id)
        if knobs is None or knobs.config is None or run.hparams is None:
            return None  # the worker reports that it cannot start the run
        return ev.TrialSpec(config=knobs.config, context_digest=knobs.context_digest, hparams=run.hparams,
                            seed=run.seed)

    def view(self, now: float) -> ClusterView:
        """Agents with their slots' occupants, and jobs with queue positions (for people)."""
        holders = {(w, sl): r for r in self.state.trials.values()
                   if r.state in ("ASSIGNED", "RUNNING") for w, slots in _holdings(r).items() for sl in slots}

        def slot_view(worker_id: str, slot: ev.Slot) -> SlotView:
            holder = holders.get((worker_id, slot.slot_id))
            if holder is None:
                return SlotView(slot=slot)
            return SlotView(slot=slot, allocation_id=holder.allocation_id, trial_id=holder.trial_id)

        agents = [
            AgentView(worker_id=w.worker_id, resource_pool=w.resource_pool, address=w.address,
                      last_seen=w.last_seen, lost=w.lost, slots=[slot_view(w.worker_id, sl) for sl in w.slots])
            for w in sorted(self.state.workers.values(), key=lambda w: w.worker_id)
        ]
        positions = {r.trial_id: i + 1 for i, r in enumerate(self.queue())}
        knobs = self.state.experiments
        jobs = [
            JobView(experiment_id=r.experiment_id, trial_id=r.trial_id, state=r.state,  # type: ignore[arg-type]
                    priority=r.priority, weight=knobs.get(r.experiment_id, ExperimentKnobs()).weight,
                    slots=r.slots, resource_pool=r.resource_pool, position=positions.get(r.trial_id),
                    worker_id=r.worker_id, preempting=r.preempt_requested)
            for r in sorted(self.state.trials.values(), key=lambda r: (r.priority, r.queued_order))
            if r.state != "EXITED"
        ]
        return ClusterView(as_of=now, agents=agents, jobs=jobs)

    def queue(self) -> list[TrialRun]:
        """Waiting trials in the order the policy considers them (for `kiln job list`)."""
        return sorted((r for r in self.state.trials.values() if r.state == "QUEUED"),
                      key=lambda r: (r.priority, r.queued_order))


def _holdings(run: TrialRun) -> dict[str, list[str]]:
    """Every host a run holds slots on (worker id -> slot ids); empty when it holds none."""
    if not run.worker_id:
        return {}
    return {run.worker_id: run.slot_ids, **run.peers}


def _kill_requests(run: TrialRun, reason: str) -> list[ev.DomainEvent]:
    """Ask every host of the run's allocation to kill its process."""
    return [ev.AllocationKillRequested(experiment_id=run.experiment_id, trial_id=run.trial_id,
                                       allocation_id=run.allocation_id, worker_id=w, reason=reason)
            for w in _holdings(run)]


def _attempt(allocation_id: str) -> int:
    """The attempt number in an allocation id ``<trial>.<attempt>``."""
    try:
        return int(allocation_id.rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return 0
