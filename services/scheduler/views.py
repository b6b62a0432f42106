"""Read-only projections of the scheduler's state for people: the cluster view and the queue.

Nothing here changes the state. The shell publishes ``cluster_view`` to the cluster KV bucket (the gateway
serves it: ``kiln slot list``, ``kiln job list``).
"""

from __future__ import annotations

from schemas import events as ev
from schemas.cluster import AgentView, ClusterView, JobState, JobView, SlotView
from services.scheduler.state import ExperimentKnobs, SchedulerState, TrialRun, holding, holdings


def cluster_view(state: SchedulerState, now: float) -> ClusterView:
    """Agents with their slots' occupants, and jobs with queue positions."""
    holders = {(w, sl): r for r in state.trials.values()
               if holding(r) for w, slots in holdings(r).items() for sl in slots}

    def slot_view(worker_id: str, slot: ev.Slot) -> SlotView:
        holder = holders.get((worker_id, slot.slot_id))
        if holder is None:
            return SlotView(slot=slot)
        return SlotView(slot=slot, allocation_id=holder.allocation_id, trial_id=holder.trial_id)

    agents = [
        AgentView(worker_id=w.worker_id, resource_pool=w.resource_pool, address=w.address,
                  last_seen=w.last_seen, lost=w.lost, slots=[slot_view(w.worker_id, sl) for sl in w.slots])
        for w in sorted(state.workers.values(), key=lambda w: w.worker_id)
    ]
    positions = {r.trial_id: i + 1 for i, r in enumerate(queue(state))}
    knobs = state.experiments
    capacity = pool_capacity(state)
    jobs = [
        JobView(experiment_id=r.experiment_id, trial_id=r.trial_id, state=shown_state(state, r),
                priority=r.priority, weight=knobs.get(r.experiment_id, ExperimentKnobs()).weight,
                slots=r.slots, resource_pool=r.resource_pool, position=positions.get(r.trial_id),
                worker_id=r.worker_id, preempting=r.preempt_requested, reason=waiting_reason(state, r, capacity))
        for r in sorted(state.trials.values(), key=lambda r: (r.priority, r.queued_order))
        if r.state != "EXITED"
    ]
    return ClusterView(as_of=now, agents=agents, jobs=jobs)


def _paused(state: SchedulerState, run: TrialRun) -> bool:
    return state.experiments.get(run.experiment_id, ExperimentKnobs()).paused


def shown_state(state: SchedulerState, run: TrialRun) -> JobState:
    """A waiting trial of a paused experiment is PAUSED to people: it is not in the queue."""
    shown = run.state
    if shown == "EXITED":
        raise ValueError(f"trial {run.trial_id} has exited: it holds and wants no slot")
    return "PAUSED" if shown == "QUEUED" and _paused(state, run) else shown


def pool_capacity(state: SchedulerState) -> dict[str, tuple[int, int]]:
    """Per resource pool: (slots, live workers), over the workers not declared lost."""
    out: dict[str, tuple[int, int]] = {}
    for w in state.workers.values():
        if not w.lost:
            slots, workers = out.get(w.resource_pool, (0, 0))
            out[w.resource_pool] = (slots + len(w.slots), workers + 1)
    return out


def waiting_reason(state: SchedulerState, run: TrialRun, capacity: dict[str, tuple[int, int]]) -> str:
    """Why a waiting trial cannot start, when that is not just its turn: "" otherwise."""
    if run.state != "QUEUED":
        return ""
    if _paused(state, run):
        return "experiment paused"
    slots, workers = capacity.get(run.resource_pool, (0, 0))
    if workers == 0:
        return f"no live worker in resource pool {run.resource_pool!r}"
    if run.slots > slots:
        return (f"needs {run.slots} slots; resource pool {run.resource_pool!r} has {slots} slots on {workers} live"
                f" worker{'s' if workers != 1 else ''}: it waits until more join")
    return ""


def queue(state: SchedulerState) -> list[TrialRun]:
    """Waiting trials in the order the policy considers them (for `kiln job list`)."""
    return sorted((r for r in state.trials.values() if r.state == "QUEUED" and not _paused(state, r)),
                  key=lambda r: (r.priority, r.queued_order))
