"""Placement policy: a pure function from the cluster's free slots and the queue to placements.

Rules, in order (Determined's priority scheduler with fair share):

* Lower ``priority`` runs first (1..99, default 42).
* Among experiments of equal priority, slots are shared by ``weight``: the next trial comes from the
  experiment whose ``used slots / weight`` is lowest, so with enough demand weights 1:3 on 8 slots end at
  2:6. ``max_slots`` caps an experiment.
* Gangs: a trial gets all its slots at once or none. One host is preferred (the best fit, which keeps
  big holes for big gangs); a trial larger than any host takes whole free hosts (the last one only for
  the slots still missing).
* No starvation: a trial that cannot fit reserves the hosts it is waiting for, so trials behind it cannot
  keep taking those slots; it fits as soon as they drain.
* Preemption: a trial that cannot fit may take slots from running trials of strictly lower priority
  (a larger number); the victims are asked to checkpoint and stop, and come back later. A gang larger
  than any host empties whole hosts that run only lower-priority trials.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable

import msgspec


class Host(msgspec.Struct, kw_only=True):
    """A worker's schedulable slots."""

    worker_id: str
    resource_pool: str
    slot_ids: list[str]
    free: list[str]


class Running(msgspec.Struct, frozen=True, kw_only=True):
    """A trial holding slots now."""

    trial_id: int
    experiment_id: int
    priority: int
    worker_slots: dict[str, list[str]]  # worker id -> slot ids
    started_order: int  # larger = started later (less work lost if preempted)
    preempting: bool = False


class Demand(msgspec.Struct, frozen=True, kw_only=True):
    """A queued trial."""

    trial_id: int
    experiment_id: int
    priority: int
    slots: int
    resource_pool: str
    queued_order: int


class Share(msgspec.Struct, frozen=True, kw_only=True):
    """An experiment's fair-share knobs."""

    weight: float = 1.0
    max_slots: int | None = None


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """Put a trial on these slots (one or several whole hosts)."""

    trial_id: int
    worker_slots: dict[str, list[str]]


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """What one scheduling pass decides."""

    placements: list[Placement]
    preempt: list[int]  # trial ids to ask to stop and requeue
    blocked: list[int]  # trial ids that wait, in queue order (for `kiln job list`)


def plan(hosts: Iterable[Host], running: Iterable[Running], queued: Iterable[Demand],
         shares: dict[int, Share], *, span_hosts: bool = True) -> Plan:
    """One scheduling pass over the whole queue (``span_hosts``: may a gang take several whole hosts)."""
    hosts = [msgspec.structs.replace(h, free=list(h.free)) for h in hosts]
    by_worker = {h.worker_id: h for h in hosts}
    pools: dict[str, list[Host]] = defaultdict(list)
    for h in hosts:
        pools[h.resource_pool].append(h)
    running = list(running)
    on_host: dict[str, list[Running]] = defaultdict(list)
    used: dict[int, int] = defaultdict(int)
    for r in running:
        used[r.experiment_id] += sum(len(s) for s in r.worker_slots.values())
        for wid in r.worker_slots:
            on_host[wid].append(r)
    # A blocked demand that found no victims: identical ones behind it will not either, until a
    # placement or preemption changes the hosts (the cache is cleared then).
    no_victims: set[tuple[int, int, str]] = set()
    reserved: set[str] = set()
    placements: list[Placement] = []
    preempt: list[int] = []
    blocked: list[int] = []

    levels: dict[int, list[Demand]] = defaultdict(list)
    for d in queued:
        levels[d.priority].append(d)
    for priority in sorted(levels):
        for d in _fair_order(levels[priority], shares, used):
            share = shares.get(d.experiment_id, Share())
            if share.max_slots is not None and used[d.experiment_id] + d.slots > share.max_slots:
                blocked.append(d.trial_id)
                continue
            in_pool = pools.get(d.resource_pool, [])
            pool = [h for h in in_pool if h.worker_id not in reserved]
            chosen = _fit(pool, d.slots, span_hosts)
            if chosen is not None:
                for wid, slots in chosen.items():
                    host = by_worker[wid]
                    host.free = [s for s in host.free if s not in set(slots)]
                placements.append(Placement(trial_id=d.trial_id, worker_slots=chosen))
                used[d.experiment_id] += d.slots
                no_victims.clear()
                continue
            blocked.append(d.trial_id)
            key = (d.priority, d.slots, d.resource_pool)
            if key not in no_victims:
                victims = _victims(d, in_pool, on_host, preempt, span_hosts)
                if victims:
                    preempt += victims
                    no_victims.clear()
                else:
                    no_victims.add(key)
            reserved |= _reservation(d, in_pool, span_hosts)
    return Plan(placements=placements, preempt=preempt, blocked=blocked)


def _fair_order(demands: list[Demand], shares: dict[int, Share], used: dict[int, int]) -> Iterable[Demand]:
    """Yield demands so that the experiment furthest below its weighted share goes next.

    ``used`` is read live: the caller updates it after each placement, and the heap is re-keyed lazily.
    """
    per_exp: dict[int, list[Demand]] = defaultdict(list)
    for d in sorted(demands, key=lambda d: d.queued_order):
        per_exp[d.experiment_id].append(d)
    heap = [(_ratio(e, shares, used), q[0].queued_order, e) for e, q in per_exp.items()]
    heapq.heapify(heap)
    while heap:
        ratio, order, exp = heapq.heappop(heap)
        current = _ratio(exp, shares, used)
        if current != ratio:  # its usage changed since it was keyed
            heapq.heappush(heap, (current, order, exp))
            continue
        queue = per_exp[exp]
        yield queue.pop(0)
        if queue:
            heapq.heappush(heap, (_ratio(exp, shares, used), queue[0].queued_order, exp))


def _ratio(experiment_id: int, shares: dict[int, Share], used: dict[int, int]) -> float:
    return used[experiment_id] / max(shares.get(experiment_id, Share()).weight, 1e-9)


def _fit(pool: list[Host], slots: int, span_hosts: bool = True) -> dict[str, list[str]] | None:
    """Slots for a gang: the best-fitting single host, else whole free hosts, else None."""
    if slots == 0:
        if not pool:
            return None
        host = max(pool, key=lambda h: (len(h.free), h.worker_id))
        return {host.worker_id: []}
    single = [h for h in pool if len(h.free) >= slots]
    if single:
        host = min(single, key=lambda h: (len(h.free), h.worker_id))
        return {host.worker_id: host.free[:slots]}
    if not span_hosts:
        return None
    whole = sorted((h for h in pool if h.slot_ids and len(h.free) == len(h.slot_ids)),
                   key=lambda h: (-len(h.free), h.worker_id))
    chosen: dict[str, list[str]] = {}
    total = 0
    for host in whole:
        if total >= slots:
            break
        # A spanning trial takes whole hosts; the last one only the slots still missing, since the
        # trial runs exactly one process per slot.
        chosen[host.worker_id] = host.free[:slots - total]
        total += len(chosen[host.worker_id])
    return chosen if total >= slots else None


def _victims(d: Demand, pool: list[Host], on_host: dict[str, list[Running]], already: list[int],
             span_hosts: bool) -> list[int]:
    """Lower-priority trials whose slots would let ``d`` fit on one host, least work lost first."""
    if d.slots == 0:
        return []
    if span_hosts and not any(len(h.slot_ids) >= d.slots for h in pool):
        return _spanning_victims(d, pool, on_host, already)
    best: list[int] | None = None
    for host in pool:
        if len(host.slot_ids) < d.slots:
            continue
        here = on_host.get(host.worker_id, [])
        if any(r.preempting or r.trial_id in already for r in here if r.priority > d.priority):
            return []  # a preemption for this host is already under way: wait for it
        candidates = sorted((r for r in here if r.priority > d.priority),
                            key=lambda r: (-r.priority, -r.started_order))
        free = len(host.free)
        picked: list[int] = []
        for r in candidates:
            if free >= d.slots:
                break
            free += len(r.worker_slots[host.worker_id])
            picked.append(r.trial_id)
        if free >= d.slots and (best is None or len(picked) < len(best)):
            best = picked
    return best or []


def _spanning_victims(d: Demand, pool: list[Host], on_host: dict[str, list[Running]],
                      already: list[int]) -> list[int]:
    """For a gang larger than any host: empty whole hosts that hold only lower-priority trials,
    the hosts with the fewest such trials first."""
    emptiable: list[tuple[int, str, Host, list[Running]]] = []
    for host in pool:
        here = on_host.get(host.worker_id, [])
        if any(r.priority <= d.priority for r in here):
            continue  # an equal or higher priority trial keeps this host
        if any(r.preempting or r.trial_id in already for r in here):
            return []  # a preemption is already under way: wait for it
        emptiable.append((len(here), host.worker_id, host, here))
    picked: list[int] = []
    total = 0
    for _, _, host, here in sorted(emptiable, key=lambda e: (e[0], e[1])):
        if total >= d.slots:
            break
        picked += [r.trial_id for r in here if r.trial_id not in picked]
        total += len(host.slot_ids)
    return picked if total >= d.slots else []


def _reservation(d: Demand, pool: list[Host], span_hosts: bool) -> set[str]:
    """The host(s) a blocked gang waits for: the single host closest to fitting, or whole hosts."""
    if d.slots == 0 or not pool:
        return set()
    big_enough = [h for h in pool if len(h.slot_ids) >= d.slots]
    if big_enough:
        return {max(big_enough, key=lambda h: (len(h.free), h.worker_id)).worker_id}
    if not span_hosts:
        return set()  # it can never fit here: holding hosts for it would only starve the others
    hosts = sorted(pool, key=lambda h: (-len(h.free), h.worker_id))
    chosen, total = set(), 0
    for host in hosts:
        if total >= d.slots:
            break
        chosen.add(host.worker_id)
        total += len(host.slot_ids)
    return chosen if total >= d.slots else set()
