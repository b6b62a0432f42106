"""The placement policy, table-driven: priority, weighted fair share, caps, gangs, starvation, preemption."""

from __future__ import annotations

from collections import Counter

import pytest

from services.scheduler.policy import Demand, Host, Running, Share, plan


def hosts(*sizes: int, pool: str = "default", used: dict[int, int] | None = None) -> list[Host]:
    """Hosts w0, w1... with the given slot counts; ``used[i]`` slots of host i are taken."""
    out = []
    for i, n in enumerate(sizes):
        slots = [f"s{j}" for j in range(n)]
        taken = (used or {}).get(i, 0)
        out.append(Host(worker_id=f"w{i}", resource_pool=pool, slot_ids=slots, free=slots[taken:]))
    return out


def demands(experiment_id: int, count: int, *, slots: int = 1, priority: int = 42, first: int = 0,
            pool: str = "default") -> list[Demand]:
    """``count`` queued trials of one experiment."""
    base = experiment_id * 1000
    return [Demand(trial_id=base + i, experiment_id=experiment_id, priority=priority, slots=slots,
                   resource_pool=pool, queued_order=first + i) for i in range(count)]


def slots_per_experiment(result: object, queued: list[Demand]) -> Counter[int]:
    """How many slots each experiment got in a plan."""
    exp_of = {d.trial_id: d.experiment_id for d in queued}
    got: Counter[int] = Counter()
    for p in result.placements:  # type: ignore[attr-defined]
        got[exp_of[p.trial_id]] += sum(len(s) for s in p.worker_slots.values())
    return got


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ((1.0, 3.0), {1: 2, 2: 6}),
        ((1.0, 1.0), {1: 4, 2: 4}),
        ((3.0, 1.0), {1: 6, 2: 2}),
        ((1.0, 7.0), {1: 1, 2: 7}),
    ],
)
def test_weighted_fair_share_between_equal_priority_experiments(weights: tuple[float, float],
                                                                 expected: dict[int, int]) -> None:
    """8 slots, both experiments wanting all of them: slots split in proportion to weight."""
    queued = demands(1, 8) + demands(2, 8, first=100)
    shares = {1: Share(weight=weights[0]), 2: Share(weight=weights[1])}
    got = slots_per_experiment(plan(hosts(4, 4), [], queued, shares), queued)
    assert dict(got) == expected


def test_fair_share_counts_what_already_runs() -> None:
    """An experiment already holding slots gets fewer of the free ones."""
    running = [Running(trial_id=1, experiment_id=1, priority=42, worker_slots={"w0": ["s0", "s1", "s2", "s3"]},
                       started_order=0)]
    queued = demands(1, 4) + demands(2, 4, first=100)
    got = slots_per_experiment(plan(hosts(4, 4, used={0: 4}), running, queued, {}), queued)
    assert dict(got) == {2: 4}


def test_lower_priority_number_runs_first_regardless_of_submission_order() -> None:
    queued = demands(1, 3, priority=50) + demands(2, 3, priority=10, first=10)
    result = plan(hosts(2), [], queued, {})
    assert [p.trial_id for p in result.placements] == [2000, 2001]
    assert result.blocked[:1] == [2002]


def test_within_an_experiment_trials_run_in_queue_order() -> None:
    queued = list(reversed(demands(1, 4)))
    result = plan(hosts(2), [], queued, {})
    assert [p.trial_id for p in result.placements] == [1000, 1001]


@pytest.mark.parametrize(("max_slots", "placed"), [(None, 4), (1, 1), (2, 2), (3, 3)])
def test_max_slots_caps_an_experiment(max_slots: int | None, placed: int) -> None:
    queued = demands(1, 4)
    result = plan(hosts(4), [], queued, {1: Share(max_slots=max_slots)})
    assert len(result.placements) == placed


def test_gang_gets_all_its_slots_on_one_host_or_nothing() -> None:
    """A 3-slot trial does not take 2+1 slots on two hosts; it takes the 4-slot host."""
    queued = demands(1, 1, slots=3)
    result = plan(hosts(2, 2, 4), [], queued, {}, span_hosts=False)
    ((placement,),) = [result.placements]
    assert placement.worker_slots == {"w2": ["s0", "s1", "s2"]}
    assert plan(hosts(2, 2), [], queued, {}, span_hosts=False).placements == []


def test_best_fit_keeps_the_big_hole_for_the_big_gang() -> None:
    """A 1-slot trial goes to the nearly full host, so the 4-slot trial behind it still fits."""
    queued = demands(1, 1, slots=1) + demands(2, 1, slots=4, first=10)
    result = plan(hosts(4, 2, used={1: 1}), [], queued, {})
    placed = {p.trial_id: p.worker_slots for p in result.placements}
    assert list(placed[1000]) == ["w1"] and list(placed[2000]) == ["w0"]


def test_a_gang_larger_than_any_host_takes_whole_hosts() -> None:
    queued = demands(1, 1, slots=8)
    result = plan(hosts(4, 4, 4), [], queued, {})
    ((placement,),) = [result.placements]
    assert sorted(placement.worker_slots) == ["w0", "w1"]
    assert all(len(s) == 4 for s in placement.worker_slots.values())
    busy = plan(hosts(4, 4, used={1: 1}), [], queued, {})
    assert busy.placements == []  # a half-used host is not a whole host


def test_a_blocked_gang_reserves_its_host_so_small_trials_cannot_starve_it() -> None:
    """2 of 4 slots are busy; a 4-slot trial waits; 1-slot trials behind it do not take the free slots."""
    running = [Running(trial_id=1, experiment_id=9, priority=42, worker_slots={"w0": ["s0", "s1"]}, started_order=0)]
    queued = demands(1, 1, slots=4) + demands(2, 5, slots=1, first=10)
    result = plan(hosts(4, used={0: 2}), running, queued, {})
    assert result.placements == []
    assert result.blocked[0] == 1000
    # With a second host, the small trials run there instead, and the gang keeps w0 reserved.
    result = plan(hosts(4, 2, used={0: 2}), running, queued, {})
    assert {w for p in result.placements for w in p.worker_slots} == {"w1"}


def test_no_starvation_over_repeated_passes() -> None:
    """Simulate passes where running 1-slot trials finish one by one: the gang runs once its host drains."""
    running = [Running(trial_id=i, experiment_id=9, priority=42, worker_slots={"w0": [f"s{i}"]}, started_order=i)
               for i in range(4)]
    small = demands(2, 50, slots=1, first=10)
    gang = demands(1, 1, slots=4)
    for _ in range(4):
        running.pop(0)  # one finishes
        h = hosts(4)
        taken = {s for r in running for s in r.worker_slots["w0"]}
        h[0].free = [s for s in h[0].slot_ids if s not in taken]
        result = plan(h, running, gang + small, {})
        if result.placements:
            assert [p.trial_id for p in result.placements] == [1000]
            return
    raise AssertionError("the 4-slot gang never ran")


def test_preemption_picks_lower_priority_trials_least_work_lost_first() -> None:
    running = [
        Running(trial_id=1, experiment_id=5, priority=50, worker_slots={"w0": ["s0"]}, started_order=0),
        Running(trial_id=2, experiment_id=5, priority=50, worker_slots={"w0": ["s1"]}, started_order=5),
        Running(trial_id=3, experiment_id=6, priority=10, worker_slots={"w0": ["s2"]}, started_order=9),
    ]
    queued = demands(1, 1, slots=1, priority=10)
    result = plan(hosts(3, used={0: 3}), running, queued, {})
    assert result.preempt == [2]  # priority 50, started last; never the equal-priority trial 3


@pytest.mark.parametrize(("waiting", "victim_priority"), [(50, 50), (50, 10), (42, 42)])
def test_no_preemption_of_equal_or_higher_priority(waiting: int, victim_priority: int) -> None:
    running = [Running(trial_id=1, experiment_id=5, priority=victim_priority, worker_slots={"w0": ["s0"]},
                       started_order=0)]
    result = plan(hosts(1, used={0: 1}), running, demands(1, 1, priority=waiting), {})
    assert result.preempt == []


def test_a_preemption_under_way_is_not_repeated() -> None:
    running = [Running(trial_id=1, experiment_id=5, priority=50, worker_slots={"w0": ["s0"]}, started_order=0,
                       preempting=True)]
    result = plan(hosts(1, used={0: 1}), running, demands(1, 1, priority=10), {})
    assert result.preempt == [] and result.placements == []


def test_a_gang_larger_than_any_host_preempts_whole_hosts_of_lower_priority_only() -> None:
    """Hosts w0..w2 with 2 slots each; w1 holds an equal-priority trial, so w0 and w2 are emptied."""
    running = [
        Running(trial_id=1, experiment_id=5, priority=50, worker_slots={"w0": ["s0"]}, started_order=0),
        Running(trial_id=2, experiment_id=5, priority=50, worker_slots={"w0": ["s1"]}, started_order=1),
        Running(trial_id=3, experiment_id=6, priority=10, worker_slots={"w1": ["s0"]}, started_order=2),
        Running(trial_id=4, experiment_id=5, priority=50, worker_slots={"w2": ["s0", "s1"]}, started_order=3),
    ]
    gang = demands(1, 1, slots=3, priority=10)
    result = plan(hosts(2, 2, 2, used={0: 2, 1: 1, 2: 2}), running, gang, {})
    assert result.placements == []
    assert sorted(result.preempt) == [1, 2, 4]
    # Once they are gone it runs on those two hosts.
    result = plan(hosts(2, 2, 2, used={1: 1}), running[2:3], gang, {})
    assert [sorted(p.worker_slots) for p in result.placements] == [["w0", "w2"]]


def test_a_gang_larger_than_any_host_does_not_preempt_when_whole_hosts_cannot_be_freed() -> None:
    running = [Running(trial_id=t, experiment_id=5, priority=10, worker_slots={f"w{t}": ["s0"]}, started_order=t)
               for t in range(2)]
    result = plan(hosts(2, 2, used={0: 1, 1: 1}), running, demands(1, 1, slots=3, priority=10), {})
    assert result.preempt == [] and result.placements == []


def test_resource_pools_are_kept_apart() -> None:
    queued = demands(1, 2, pool="gpu")
    result = plan(hosts(4, pool="cpu"), [], queued, {})
    assert result.placements == []
    result = plan(hosts(4, pool="cpu") + [Host(worker_id="g", resource_pool="gpu", slot_ids=["c0"], free=["c0"])],
                  [], queued, {})
    assert [list(p.worker_slots) for p in result.placements] == [["g"]]
