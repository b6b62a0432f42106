"""Placing queued trials: the state turned into the policy's inputs, its answer into events.

``policy.plan`` (``policy.py``) decides who goes where and whom to preempt; this module gives it the free
slots and the queue, and turns its placements into ``AllocationAssigned`` events (one per host, with what
the worker needs to start the run) and its preemptions into ``TrialPreemptRequested``.
"""

from __future__ import annotations

import zlib

from schemas import events as ev
from services.scheduler import lifecycle, policy
from services.scheduler.state import ExperimentKnobs, SchedulerState, TrialRun, holding, holdings

# torch.distributed rendezvous ports for multi-host trials: node 0 listens on one of these, picked from
# the allocation id so every node computes the same one.
RENDEZVOUS_PORTS = range(29400, 30000)


def place(state: SchedulerState) -> list[ev.DomainEvent]:
    """One policy pass: placements, and preemptions for what cannot fit."""
    runs = state.trials
    knobs = state.experiments
    running = [
        policy.Running(trial_id=r.trial_id, experiment_id=r.experiment_id, priority=r.priority,
                       worker_slots=holdings(r), started_order=r.started_order,
                       preempting=r.preempt_requested)
        for r in runs.values() if holding(r)
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
    decided = policy.plan(_hosts(state), running, queued, shares)
    out: list[ev.DomainEvent] = []
    for placement in decided.placements:
        run = runs[placement.trial_id]
        run.attempt += 1
        for assigned in _assignments(state, run, f"{run.trial_id}.{run.attempt}", placement.worker_slots):
            lifecycle.allocation_assigned(state, assigned)
            out.append(assigned)
    for trial_id in decided.preempt:
        run = runs[trial_id]
        if not run.preempt_requested:
            out.append(lifecycle.preempt(run, "a higher-priority trial needs its slots"))
    return out


def _hosts(state: SchedulerState) -> list[policy.Host]:
    """Every live worker with its free slots, in worker-id order."""
    used = {(w, sl) for r in state.trials.values()
            if holding(r) for w, slots in holdings(r).items() for sl in slots}
    return [
        policy.Host(worker_id=w.worker_id, resource_pool=w.resource_pool, slot_ids=list(w.slot_ids),
                    free=[sl for sl in w.slot_ids if (w.worker_id, sl) not in used])
        for w in sorted(state.workers.values(), key=lambda w: w.worker_id)
        if not w.lost
    ]


def _assignments(state: SchedulerState, run: TrialRun, allocation_id: str,
                 worker_slots: dict[str, list[str]]) -> list[ev.AllocationAssigned]:
    """One AllocationAssigned per host; several hosts get their ranks and the rendezvous address."""
    nodes = [ev.AllocationNode(worker_id=w, address=state.workers[w].address, slot_ids=list(slots))
             for w, slots in worker_slots.items()] if len(worker_slots) > 1 else []
    port = RENDEZVOUS_PORTS[zlib.crc32(allocation_id.encode()) % len(RENDEZVOUS_PORTS)] if nodes else 0
    spec = _spec(state, run)
    return [
        ev.AllocationAssigned(
            experiment_id=run.experiment_id, trial_id=run.trial_id, allocation_id=allocation_id,
            worker_id=worker_id, slot_ids=list(slot_ids), restarts=run.restarts,
            latest_checkpoint=run.latest_checkpoint, max_length=run.max_length,
            node_rank=rank, nodes=nodes, master_port=port, spec=spec,
        )
        for rank, (worker_id, slot_ids) in enumerate(worker_slots.items())
    ]


def _spec(state: SchedulerState, run: TrialRun) -> ev.TrialSpec | None:
    """What the worker needs to start the run, from the facts the core folded; None if it lacks them."""
    knobs = state.experiments.get(run.experiment_id)
    if knobs is None or knobs.config is None or run.hparams is None:
        return None  # the worker reports that it cannot start the run
    return ev.TrialSpec(config=knobs.config, context_digest=knobs.context_digest, hparams=run.hparams,
                        seed=run.seed, source_checkpoint=state.sources.get(run.experiment_id))
