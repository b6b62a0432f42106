"""Read-only projections of the scheduler's state for people: the cluster view and the queue.

Nothing here changes the state. The shell publishes ``cluster_view`` to the cluster KV bucket (the gateway
serves it: ``kiln slot list``, ``kiln job list``).
"""

from __future__ import annotations

from schemas import events as ev
from schemas.cluster import AgentView, ClusterView, JobView, SlotView
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
    jobs = [
        JobView(experiment_id=r.experiment_id, trial_id=r.trial_id, state=r.state,
                priority=r.priority, weight=knobs.get(r.experiment_id, ExperimentKnobs()).weight,
                slots=r.slots, resource_pool=r.resource_pool, position=positions.get(r.trial_id),
                worker_id=r.worker_id, preempting=r.preempt_requested)
        for r in sorted(state.trials.values(), key=lambda r: (r.priority, r.queued_order))
        if r.state != "EXITED"
    ]
    return ClusterView(as_of=now, agents=agents, jobs=jobs)


def queue(state: SchedulerState) -> list[TrialRun]:
    """Waiting trials in the order the policy considers them (for `kiln job list`)."""
    return sorted((r for r in state.trials.values() if r.state == "QUEUED"),
                  key=lambda r: (r.priority, r.queued_order))
