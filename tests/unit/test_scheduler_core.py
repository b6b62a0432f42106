"""The scheduler's pure core: trials and heartbeats in, placements, restarts and losses out."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import pytest

from schemas import events as ev
from schemas.config import config_to_dict, parse_config
from services.scheduler.core import SchedulerCore

TIMEOUT = 10.0
T0 = 1000.0


def submitted(
    experiment_id: int,
    *,
    slots: int = 1,
    priority: int | None = None,
    pool: str = "default",
    max_restarts: int = 5,
) -> ev.ExperimentSubmitted:
    """An ExperimentSubmitted whose config carries these scheduling knobs."""
    yaml = (
        "entrypoint: model_def:Trial\n"
        "searcher: {name: single, metric: loss, max_length: {batches: 10}}\n"
        f"max_restarts: {max_restarts}\n"
        f"resources: {{slots_per_trial: {slots}, resource_pool: {pool}"
        + (f", priority: {priority}" if priority is not None else "")
        + "}\n"
    )
    cfg, _ = parse_config(yaml)
    return ev.ExperimentSubmitted(
        experiment_id=experiment_id,
        config=config_to_dict(cfg),
        config_yaml=yaml,
        context_digest="sha256:00",
        context_size=0,
        seed=1,
    )


def created(experiment_id: int, trial_id: int) -> ev.TrialCreated:
    return ev.TrialCreated(experiment_id=experiment_id, trial_id=trial_id, request_id=trial_id, hparams={}, seed=0)


def heartbeat(
    worker_id: str,
    slots: int,
    at: float,
    *,
    pool: str = "default",
    running: Sequence[str] = (),
    finished: Sequence[str] = (),
) -> ev.WorkerHeartbeat:
    return ev.WorkerHeartbeat(
        worker_id=worker_id,
        address="10.0.0.1",
        resource_pool=pool,
        slots=[ev.Slot(slot_id=f"{worker_id}-gpu{i}", kind="cuda") for i in range(slots)],
        running=list(running),
        finished=list(finished),
        sent_at=at,
    )


def alloc_exited(a: ev.AllocationAssigned, exit_code: int | None, reason: str = "") -> ev.AllocationExited:
    return ev.AllocationExited(
        experiment_id=a.experiment_id,
        trial_id=a.trial_id,
        allocation_id=a.allocation_id,
        worker_id=a.worker_id,
        exit_code=exit_code,
        reason=reason,
        node_rank=a.node_rank,
    )


def started(a: ev.AllocationAssigned, at: float) -> ev.TrialStarted:
    return ev.TrialStarted(
        experiment_id=a.experiment_id,
        trial_id=a.trial_id,
        allocation_id=a.allocation_id,
        worker_id=a.worker_id,
        started_at=at,
    )


def echo(core: SchedulerCore, decided: Sequence[ev.DomainEvent]) -> None:
    """Feed decided events back, as the stream does; each must be a no-op on the state."""
    for event in decided:
        before = core.snapshot()
        assert core.handle(event) == [], type(event).__name__
        assert core.snapshot() == before, type(event).__name__


def assigned(out: Sequence[ev.DomainEvent]) -> list[ev.AllocationAssigned]:
    return [e for e in out if isinstance(e, ev.AllocationAssigned)]


def only_assignment(out: Sequence[ev.DomainEvent]) -> ev.AllocationAssigned:
    got = assigned(out)
    assert len(got) == 1, out
    return got[0]


def core_with(*events: ev.DomainEvent) -> SchedulerCore:
    core = SchedulerCore(worker_timeout_s=TIMEOUT)
    for event in events:
        assert core.handle(event) == []
    return core


def run_to_start(core: SchedulerCore, at: float = T0) -> ev.AllocationAssigned:
    """Place the one queued trial, echo the placement, and mark it started at ``at``."""
    a = only_assignment(core.tick(at))
    echo(core, [a])
    core.handle(started(a, at))
    return a


# --- placement ---------------------------------------------------------------------------------


def test_queued_trial_is_placed_on_a_worker_with_enough_free_slots() -> None:
    sub = submitted(1, slots=2)
    core = core_with(sub, created(1, 10))
    assert core.heartbeat(heartbeat("w1", 2, T0)) == []
    out = core.tick(T0)
    assert out == [
        ev.AllocationAssigned(
            experiment_id=1,
            trial_id=10,
            allocation_id="10.1",
            worker_id="w1",
            slot_ids=["w1-gpu0", "w1-gpu1"],
            restarts=0,
            latest_checkpoint=None,
            spec=ev.TrialSpec(config=sub.config, context_digest=sub.context_digest, hparams={}, seed=0),
        )
    ]
    # Placed once: the next tick does not place it again.
    assert core.tick(T0 + 1) == []


def test_every_placement_carries_what_the_worker_needs_to_start_the_run() -> None:
    """Self-contained: config, code context, hyperparameters and seed, on every host, on every attempt."""
    sub = submitted(1, slots=3)
    trial = ev.TrialCreated(experiment_id=1, trial_id=10, request_id=0, hparams={"lr": 0.1, "opt": {"m": 0.9}},
                            seed=1234, max_length=50)
    core = core_with(sub, trial)
    core.heartbeat(heartbeat("w1", 2, T0))
    core.heartbeat(heartbeat("w2", 2, T0))
    first = core.tick(T0)
    echo(core, first)
    crashed = core.handle(alloc_exited(first[0], 1))
    echo(core, crashed)
    second = [e for e in core.tick(T0) if isinstance(e, ev.AllocationAssigned)]
    expected = ev.TrialSpec(config=sub.config, context_digest="sha256:00", hparams={"lr": 0.1, "opt": {"m": 0.9}},
                            seed=1234)
    placements = [a for a in first + second if isinstance(a, ev.AllocationAssigned)]
    assert [(a.allocation_id, a.node_rank) for a in placements] == [("10.1", 0), ("10.1", 1), ("10.2", 0), ("10.2", 1)]
    assert all(a.spec == expected and a.max_length == 50 for a in placements)
    # The spec survives the snapshot.
    restored = SchedulerCore.restore(core.snapshot())
    assert restored.snapshot() == core.snapshot()


def test_a_trial_known_only_from_an_older_snapshot_is_placed_without_a_spec() -> None:
    state = msgspec.msgpack.decode(core_with(submitted(1), created(1, 10)).snapshot())
    for knobs in state["experiments"].values():
        del knobs["config"], knobs["context_digest"]
    for run in state["trials"].values():
        del run["hparams"], run["seed"]
    core = SchedulerCore.restore(msgspec.msgpack.encode(state), worker_timeout_s=TIMEOUT)
    core.heartbeat(heartbeat("w1", 1, T0))
    assert only_assignment(core.tick(T0)).spec is None  # the worker says it cannot start it


def test_nothing_is_placed_without_heartbeats() -> None:
    core = core_with(submitted(1), created(1, 10))
    assert core.tick(T0) == []
    assert core.tick(T0 + 100) == []


@pytest.mark.parametrize(
    ("trial_slots", "trial_pool", "workers", "placed_on"),
    [
        (1, "default", [("w1", 1, "default")], ["w1"]),
        (2, "default", [("w1", 1, "default")], []),  # too few slots
        (1, "gpu", [("w1", 4, "default")], []),  # wrong pool
        (1, "gpu", [("w1", 4, "default"), ("w2", 1, "gpu")], ["w2"]),
        (4, "default", [("w1", 2, "default"), ("w2", 1, "default")], []),  # gang: all or nothing
        (4, "default", [("w1", 2, "default"), ("w2", 2, "default")], ["w1", "w2"]),  # whole hosts
        (4, "default", [("w1", 2, "default"), ("w2", 4, "default")], ["w2"]),  # one host preferred
        (1, "default", [("big", 4, "default"), ("small", 1, "default")], ["small"]),  # best fit
    ],
)
def test_placement_needs_enough_slots_in_the_right_pool(
    trial_slots: int, trial_pool: str, workers: list[tuple[str, int, str]], placed_on: list[str]
) -> None:
    core = core_with(submitted(1, slots=trial_slots, pool=trial_pool), created(1, 10))
    for worker_id, slots, pool in workers:
        core.heartbeat(heartbeat(worker_id, slots, T0, pool=pool))
    got = assigned(core.tick(T0))
    assert [a.worker_id for a in got] == placed_on
    assert sum(len(a.slot_ids) for a in got) == (trial_slots if placed_on else 0)
    for a in got:
        assert all(s.startswith(f"{a.worker_id}-") for s in a.slot_ids)


def test_a_gang_that_fits_nowhere_stays_queued_while_a_smaller_trial_runs() -> None:
    core = core_with(submitted(1, slots=4), created(1, 10), submitted(2, slots=2), created(2, 20))
    core.heartbeat(heartbeat("w1", 2, T0))
    core.heartbeat(heartbeat("w2", 1, T0))
    a = only_assignment(core.tick(T0))
    assert (a.trial_id, len(a.slot_ids)) == (20, 2)
    assert core.tick(T0 + 1) == []  # the 4-slot trial is still waiting
    core.heartbeat(heartbeat("w3", 4, T0 + 1))
    b = only_assignment(core.tick(T0 + 1))
    assert (b.trial_id, b.worker_id, len(b.slot_ids)) == (10, "w3", 4)


# --- trials spanning hosts ----------------------------------------------------------------------


def spanning_run(at: float = T0) -> tuple[SchedulerCore, list[ev.AllocationAssigned]]:
    """A 3-slot trial on two 2-slot hosts, placed, echoed and started."""
    core = core_with(submitted(1, slots=3), created(1, 10))
    core.heartbeat(heartbeat("w1", 2, at))
    core.heartbeat(heartbeat("w2", 2, at))
    parts = assigned(core.tick(at))
    echo(core, parts)
    core.handle(started(parts[0], at))
    return core, parts


def test_a_gang_larger_than_any_host_gets_one_assignment_per_host_with_ranks_and_one_rendezvous() -> None:
    core, parts = spanning_run()
    assert [(a.worker_id, a.node_rank, a.slot_ids) for a in parts] == [
        ("w1", 0, ["w1-gpu0", "w1-gpu1"]),
        ("w2", 1, ["w2-gpu0"]),  # exactly the slots still missing: one process per slot
    ]
    assert len({a.allocation_id for a in parts}) == 1
    assert parts[0].nodes == parts[1].nodes == [
        ev.AllocationNode(worker_id="w1", address="10.0.0.1", slot_ids=["w1-gpu0", "w1-gpu1"]),
        ev.AllocationNode(worker_id="w2", address="10.0.0.1", slot_ids=["w2-gpu0"]),
    ]
    assert parts[0].master_port == parts[1].master_port and 29400 <= parts[0].master_port < 30000
    # Every slot it holds shows as taken, on both hosts; the host's spare slot stays free.
    view = core.view(T0)
    held = {(ag.worker_id, sv.slot.slot_id) for ag in view.agents for sv in ag.slots if sv.trial_id == 10}
    assert held == {("w1", "w1-gpu0"), ("w1", "w1-gpu1"), ("w2", "w2-gpu0")}
    assert core.tick(T0 + 1) == []


def test_a_spanning_run_ends_with_node_zero_not_with_an_earlier_peer() -> None:
    core, (chief, peer) = spanning_run()
    assert core.handle(alloc_exited(peer, 0)) == []
    out = core.handle(alloc_exited(chief, 0))
    assert [type(e).__name__ for e in out] == ["TrialExited"]
    assert out[0].state == "COMPLETED"


def test_a_failed_host_of_a_spanning_run_stops_the_others_and_the_trial_restarts_on_fresh_slots() -> None:
    core, (chief, peer) = spanning_run()
    out = core.handle(alloc_exited(peer, 1, "rank 2 crashed"))
    kills = [e for e in out if isinstance(e, ev.AllocationKillRequested)]
    assert sorted(k.worker_id for k in kills) == ["w1", "w2"]
    assert {k.allocation_id for k in kills} == {chief.allocation_id}
    assert [type(e).__name__ for e in out if not isinstance(e, ev.AllocationKillRequested)] == ["TrialRestarting"]
    assert core.handle(alloc_exited(chief, 1)) == []  # the chief, killed, is stale now
    again = assigned(core.tick(T0 + 1))
    assert [(a.allocation_id, a.node_rank) for a in again] == [("10.2", 0), ("10.2", 1)]
    assert all(a.restarts == 1 for a in again)


def test_losing_one_host_of_a_spanning_run_restarts_it() -> None:
    core, (chief, peer) = spanning_run()
    core.heartbeat(heartbeat("w1", 2, T0 + TIMEOUT, running=[chief.allocation_id]))
    out = core.tick(T0 + TIMEOUT + 1)
    names = [type(e).__name__ for e in out]
    assert names[:2] == ["WorkerLost", "AllocationLost"]
    assert "TrialRestarting" in names
    assert sorted(e.worker_id for e in out if isinstance(e, ev.AllocationKillRequested)) == ["w1", "w2"]


def test_killing_a_spanning_trial_asks_every_host() -> None:
    core, (chief, _) = spanning_run()
    out = core.handle(ev.TrialKillRequested(experiment_id=1, trial_id=10))
    assert sorted((e.worker_id, e.allocation_id) for e in out) == [("w1", chief.allocation_id),
                                                                   ("w2", chief.allocation_id)]


def test_slots_are_never_handed_out_twice() -> None:
    core = core_with(submitted(1, slots=2), *(created(1, t) for t in (1, 2, 3)))
    core.heartbeat(heartbeat("w1", 5, T0))
    got = assigned(core.tick(T0))
    assert [a.trial_id for a in got] == [1, 2]
    used = [s for a in got for s in a.slot_ids]
    assert len(used) == len(set(used)) == 4


@pytest.mark.parametrize(
    ("trials", "order"),
    [
        # (experiment, priority, trial) in creation order -> order of placement on one slot
        ([(1, 50, 10), (2, 10, 20), (3, None, 30)], [20, 30, 10]),  # default priority is 42
        ([(1, None, 10), (2, None, 20), (3, None, 30)], [10, 20, 30]),  # FIFO
        ([(1, 5, 10), (1, 5, 11), (2, 1, 20), (1, 5, 12)], [20, 10, 11, 12]),
        ([(1, 99, 10), (2, 41, 20), (3, 43, 30), (4, None, 40)], [20, 40, 30, 10]),
    ],
)
def test_lower_priority_value_first_then_fifo(trials: list[tuple[int, int | None, int]], order: list[int]) -> None:
    core = SchedulerCore(worker_timeout_s=TIMEOUT)
    for experiment_id, priority, trial_id in trials:
        core.handle(submitted(experiment_id, priority=priority))
        core.handle(created(experiment_id, trial_id))
    core.heartbeat(heartbeat("w1", 1, T0))
    placed: list[int] = []
    for _ in trials:
        a = only_assignment(core.tick(T0))
        echo(core, [a])
        placed.append(a.trial_id)
        # Its exit frees the slot for the next one.
        done = core.handle(alloc_exited(a, 0))
        assert [(type(e), e.state) for e in done] == [(ev.TrialExited, "COMPLETED")]  # type: ignore[attr-defined]
        echo(core, done)
    assert placed == order
    assert core.tick(T0) == []


def test_knobs_are_read_through_the_typed_config_even_with_fields_a_later_version_added() -> None:
    event = submitted(1, slots=2, pool="gpu", priority=7)
    newer = msgspec.structs.replace(event, config={**event.config, "added_later": 1,
                                                   "resources": {**event.config["resources"], "gpu_kind": "x"}})
    core = core_with(newer, created(1, 10))
    core.heartbeat(heartbeat("w1", 4, T0, pool="default"))
    assert core.tick(T0) == []  # its pool is "gpu"
    core.heartbeat(heartbeat("w2", 4, T0, pool="gpu"))
    a = only_assignment(core.tick(T0))
    assert (a.worker_id, len(a.slot_ids)) == ("w2", 2)
    assert [j.priority for j in core.view(T0).jobs] == [7]


def test_a_config_this_version_cannot_read_leaves_the_default_knobs() -> None:
    event = submitted(1, slots=2, priority=7)
    skewed = msgspec.structs.replace(event, config={**event.config, "max_restarts": "many"})
    core = core_with(skewed, created(1, 10))
    assert [(j.priority, j.slots) for j in core.view(T0).jobs] == [(42, 1)]


def test_allocation_exit_frees_the_slots_for_the_next_trial() -> None:
    core = core_with(submitted(1, slots=2), created(1, 10), created(1, 11))
    core.heartbeat(heartbeat("w1", 2, T0))
    first = run_to_start(core)
    assert first.trial_id == 10
    assert core.tick(T0 + 1) == []
    out = core.handle(alloc_exited(first, 0))
    assert out == [ev.TrialExited(experiment_id=1, trial_id=10, state="COMPLETED", exit_code=0, restarts=0)]
    second = only_assignment(core.tick(T0 + 2))
    assert (second.trial_id, second.allocation_id, second.slot_ids) == (11, "11.1", first.slot_ids)


def test_echo_of_its_own_assignment_is_a_no_op() -> None:
    core = core_with(submitted(1), created(1, 10))
    core.heartbeat(heartbeat("w1", 1, T0))
    out = core.tick(T0)
    echo(core, out)
    echo(core, out)  # and again, redelivered
    assert core.tick(T0 + 1) == []


def test_redelivered_trial_created_does_not_queue_it_twice() -> None:
    core = core_with(submitted(1), created(1, 10))
    before = core.snapshot()
    assert core.handle(created(1, 10)) == []
    assert core.snapshot() == before


# --- failures and restarts ---------------------------------------------------------------------


@pytest.mark.parametrize("max_restarts", [0, 1, 3])
def test_failures_restart_from_the_latest_checkpoint_until_max_restarts(max_restarts: int) -> None:
    core = core_with(submitted(1, max_restarts=max_restarts), created(1, 10))
    core.heartbeat(heartbeat("w1", 1, T0))
    checkpoint: str | None = None
    for attempt in range(1, max_restarts + 2):
        a = run_to_start(core)
        assert (a.allocation_id, a.restarts, a.latest_checkpoint) == (f"10.{attempt}", attempt - 1, checkpoint)
        checkpoint = f"ckpt-{attempt}"
        core.handle(ev.CheckpointStored(experiment_id=1, trial_id=10, uuid=checkpoint, steps_completed=attempt,
                                        storage="s3://b"))
        out = core.handle(alloc_exited(a, 3))
        if attempt <= max_restarts:
            assert out == [ev.TrialRestarting(experiment_id=1, trial_id=10, restarts=attempt, reason="exit code 3")]
            echo(core, out)
        else:
            assert len(out) == 1 and isinstance(out[0], ev.TrialExited)
            assert (out[0].state, out[0].exit_code, out[0].restarts) == ("ERROR", 3, max_restarts)
            assert f"max_restarts ({max_restarts})" in out[0].reason
            echo(core, out)
    assert core.tick(T0) == []


def test_exit_reason_is_carried_into_the_restart() -> None:
    core = core_with(submitted(1), created(1, 10))
    core.heartbeat(heartbeat("w1", 1, T0))
    a = run_to_start(core)
    out = core.handle(alloc_exited(a, None, reason="image pull failed"))
    assert out == [ev.TrialRestarting(experiment_id=1, trial_id=10, restarts=1, reason="image pull failed")]


def test_stale_exit_of_an_earlier_allocation_is_ignored() -> None:
    core = core_with(submitted(1), created(1, 10))
    core.heartbeat(heartbeat("w1", 1, T0))
    first = run_to_start(core)
    echo(core, core.handle(alloc_exited(first, 1)))
    second = run_to_start(core)
    assert second.allocation_id == "10.2"
    before = core.snapshot()
    assert core.handle(alloc_exited(first, 1)) == []  # redelivered exit of 10.1
    assert core.snapshot() == before


@pytest.mark.parametrize(("silence", "lost"), [(TIMEOUT - 0.5, False), (TIMEOUT, False), (TIMEOUT + 0.5, True)])
def test_a_silent_worker_is_lost_after_the_timeout(silence: float, lost: bool) -> None:
    core = core_with(submitted(1), created(1, 10))
    core.heartbeat(heartbeat("w1", 1, T0))
    a = run_to_start(core)
    out = core.tick(T0 + silence)
    if not lost:
        assert out == []
        return
    assert out == [
        ev.WorkerLost(worker_id="w1", last_seen=T0, allocation_ids=["10.1"]),
        ev.AllocationLost(experiment_id=1, trial_id=10, allocation_id="10.1", worker_id="w1"),
        ev.TrialRestarting(experiment_id=1, trial_id=10, restarts=1, reason="worker lost"),
    ]
    echo(core, out)
    assert a.worker_id == "w1"
    assert core.tick(T0 + silence + 1) == []  # not lost twice, nowhere to run
    # Another worker picks the trial up with the next attempt.
    core.heartbeat(heartbeat("w2", 1, T0 + silence + 1))
    b = only_assignment(core.tick(T0 + silence + 1))
    assert (b.allocation_id, b.worker_id, b.restarts) == ("10.2", "w2", 1)


def test_a_lost_worker_that_comes_back_is_a_fresh_empty_worker() -> None:
    core = core_with(submitted(1), created(1, 10))
    core.heartbeat(heartbeat("w1", 1, T0))
    run_to_start(core)
    echo(core, core.tick(T0 + TIMEOUT + 1))
    later = T0 + TIMEOUT + 2
    assert core.heartbeat(heartbeat("w1", 1, later)) == []
    b = only_assignment(core.tick(later))
    assert (b.allocation_id, b.worker_id) == ("10.2", "w1")


@pytest.mark.parametrize(
    ("sent_after_start", "running", "finished", "lost"),
    [
        (6.0, [], [], True),  # the worker restarted and forgot it
        (6.0, ["10.1"], [], False),
        (6.0, [], ["10.1"], False),  # it just finished; the exit is on its way
        (4.0, [], [], False),  # the heartbeat may predate TrialStarted
        (6.0, ["99.1"], ["98.1"], True),
    ],
)
def test_a_heartbeat_that_forgets_a_running_allocation_loses_it(
    sent_after_start: float, running: list[str], finished: list[str], lost: bool
) -> None:
    core = core_with(submitted(1), created(1, 10))
    core.heartbeat(heartbeat("w1", 1, T0))
    run_to_start(core, at=T0)
    out = core.heartbeat(heartbeat("w1", 1, T0 + sent_after_start, running=running, finished=finished))
    if not lost:
        assert out == []
        return
    assert out == [
        ev.AllocationLost(experiment_id=1, trial_id=10, allocation_id="10.1", worker_id="w1"),
        ev.TrialRestarting(experiment_id=1, trial_id=10, restarts=1, reason="worker no longer runs it"),
    ]
    echo(core, out)
    assert only_assignment(core.tick(T0 + sent_after_start)).allocation_id == "10.2"


def test_late_echoes_of_decisions_already_applied_change_nothing() -> None:
    # A restored scheduler replays its own tick decisions from the stream after state that already
    # contains what followed them: an old placement must not be adopted again.
    core = core_with(submitted(1), created(1, 10))
    core.heartbeat(heartbeat("w1", 1, T0))
    decided = core.tick(T0)  # 10.1 on w1, not yet echoed
    later = T0 + TIMEOUT + 1
    core.heartbeat(heartbeat("w2", 1, later))
    decided += core.tick(later)  # w1 lost, 10.1 lost, restart, 10.2 on w2
    assert [a.allocation_id for a in assigned(decided)] == ["10.1", "10.2"]
    echo(core, decided)
    b = assigned(decided)[1]
    assert core.handle(alloc_exited(b, 0)) == [
        ev.TrialExited(experiment_id=1, trial_id=10, state="COMPLETED", exit_code=0, restarts=1)
    ]


# --- kill --------------------------------------------------------------------------------------


def test_kill_cancels_queued_trials_and_asks_workers_to_kill_running_ones() -> None:
    core = core_with(submitted(1), created(1, 10), created(1, 11), submitted(2), created(2, 20))
    core.heartbeat(heartbeat("w1", 1, T0))
    running = run_to_start(core)
    assert running.trial_id == 10
    out = core.handle(ev.ExperimentKillRequested(experiment_id=1))
    by_type = {type(e): e for e in out}
    assert len(out) == 2
    assert by_type[ev.TrialExited] == ev.TrialExited(
        experiment_id=1, trial_id=11, state="CANCELED", restarts=0, reason="experiment killed"
    )
    assert by_type[ev.AllocationKillRequested] == ev.AllocationKillRequested(
        experiment_id=1, trial_id=10, allocation_id="10.1", worker_id="w1", reason="experiment killed"
    )
    echo(core, out)
    assert core.handle(ev.ExperimentKillRequested(experiment_id=1)) == []  # redelivered
    # The worker kills it; whatever the exit code, the trial is canceled, not restarted.
    done = core.handle(alloc_exited(running, 137))
    assert [(type(e), e.trial_id) for e in done] == [(ev.TrialExited, 10)]
    assert done[0].state == "CANCELED"  # type: ignore[attr-defined]
    echo(core, done)
    # A trial the searcher created before it saw the kill never runs.
    late = core.handle(created(1, 12))
    assert [(type(e), e.trial_id) for e in late] == [(ev.TrialExited, 12)]
    assert late[0].state == "CANCELED"  # type: ignore[attr-defined]
    # The other experiment is untouched and gets the freed slot.
    other = only_assignment(core.tick(T0 + 1))
    assert (other.experiment_id, other.trial_id) == (2, 20)


def test_kill_of_a_trial_on_a_lost_worker_cancels_it() -> None:
    core = core_with(submitted(1), created(1, 10))
    core.heartbeat(heartbeat("w1", 1, T0))
    run_to_start(core)
    echo(core, core.handle(ev.ExperimentKillRequested(experiment_id=1)))
    out = core.tick(T0 + TIMEOUT + 1)
    assert [type(e) for e in out] == [ev.WorkerLost, ev.AllocationLost, ev.TrialExited]
    assert out[-1].state == "CANCELED"  # type: ignore[attr-defined]


# --- restore -----------------------------------------------------------------------------------


def busy_core() -> SchedulerCore:
    core = core_with(submitted(1, slots=2, priority=7), created(1, 10), created(1, 11), submitted(2), created(2, 20))
    core.heartbeat(heartbeat("w1", 2, T0))
    core.heartbeat(heartbeat("w2", 1, T0, pool="other"))
    a = run_to_start(core)
    core.handle(ev.CheckpointStored(experiment_id=1, trial_id=a.trial_id, uuid="c1", steps_completed=5,
                                    storage="s3://b"))
    echo(core, core.handle(alloc_exited(a, 1)))
    return core


def test_snapshot_restore_snapshot_is_byte_equal() -> None:
    data = busy_core().snapshot()
    restored = SchedulerCore.restore(data, worker_timeout_s=TIMEOUT)
    assert restored.snapshot() == data


def test_a_restored_core_decides_like_the_original() -> None:
    original = busy_core()
    restored = SchedulerCore.restore(original.snapshot(), worker_timeout_s=TIMEOUT)
    for now in (T0 + 1, T0 + TIMEOUT + 1):
        assert msgspec.json.encode(restored.tick(now)) == msgspec.json.encode(original.tick(now))


def test_resume_gives_known_workers_a_fresh_timeout() -> None:
    core = core_with(submitted(1), created(1, 10))
    core.heartbeat(heartbeat("w1", 1, T0))
    run_to_start(core)
    data = core.snapshot()
    restart_at = T0 + 3600.0  # the scheduler was down for an hour

    without = SchedulerCore.restore(data, worker_timeout_s=TIMEOUT)
    assert [type(e) for e in without.tick(restart_at)][0] is ev.WorkerLost

    resumed = SchedulerCore.restore(data, worker_timeout_s=TIMEOUT)
    resumed.resume(restart_at)
    assert resumed.tick(restart_at + TIMEOUT - 1) == []
    # Still silent a full timeout after the restart: now it is lost.
    assert [type(e) for e in resumed.tick(restart_at + TIMEOUT + 1)][0] is ev.WorkerLost
