"""What `kiln job list` shows: a paused experiment's trials, and requests the pool can never hold."""

from __future__ import annotations

from schemas import events as ev
from services.scheduler.core import SchedulerCore
from tests.unit.test_scheduler_core import T0, created, heartbeat, submitted


def _jobs(core: SchedulerCore) -> dict[int, object]:
    return {j.trial_id: j for j in core.view(T0).jobs}


def test_a_paused_experiments_waiting_trials_show_as_paused_not_queued() -> None:
    core = SchedulerCore()
    core.heartbeat(heartbeat("w1", 1, T0))
    core.handle(submitted(1))
    core.handle(submitted(2))
    core.handle(created(1, 11))
    core.tick(T0)  # placed on the only slot
    core.handle(ev.ExperimentPauseRequested(experiment_id=2))
    core.handle(created(2, 21))  # waits, but its experiment is paused
    core.handle(created(1, 12))  # waits for the slot
    jobs = _jobs(core)
    assert jobs[21].state == "PAUSED" and jobs[21].position is None  # type: ignore[attr-defined]
    assert "paused" in jobs[21].reason  # type: ignore[attr-defined]
    assert jobs[12].state == "QUEUED" and jobs[12].position == 1  # type: ignore[attr-defined]
    assert [r.trial_id for r in core.queue()] == [12]
    core.handle(ev.ExperimentActivateRequested(experiment_id=2))
    assert _jobs(core)[21].state == "QUEUED"  # type: ignore[attr-defined]


def test_a_request_bigger_than_the_pool_says_why_it_waits() -> None:
    core = SchedulerCore()
    core.heartbeat(heartbeat("w1", 2, T0))
    core.handle(submitted(1, slots=8))
    core.handle(created(1, 11))
    core.handle(submitted(2, slots=2, pool="gpus"))
    core.handle(created(2, 21))
    core.handle(submitted(3, slots=2))
    core.handle(created(3, 31))
    core.tick(T0)
    jobs = _jobs(core)
    reason = jobs[11].reason  # type: ignore[attr-defined]
    assert "8 slots" in reason and "2 slots" in reason and "'default'" in reason
    assert "no live worker" in jobs[21].reason  # type: ignore[attr-defined]
    assert jobs[31].reason == ""  # type: ignore[attr-defined]  # placed: fits
    # More workers join: the request now fits and the warning goes.
    core.heartbeat(heartbeat("w2", 2, T0))
    core.heartbeat(heartbeat("w3", 4, T0))
    assert "8 slots" not in _jobs(core)[11].reason  # type: ignore[attr-defined]
