"""Scheduler core: preemption, pause/activate, trial kill, changed knobs, the queue view."""

from __future__ import annotations

import msgspec

from schemas import events as ev
from services.scheduler.core import SchedulerCore
from tests.unit.test_scheduler_core import (
    T0,
    alloc_exited,
    assigned,
    core_with,
    created,
    echo,
    heartbeat,
    only_assignment,
    started,
    submitted,
)


def of(kind: type, out: list[ev.DomainEvent]) -> list:  # type: ignore[type-arg]
    return [e for e in out if isinstance(e, kind)]


def running_low_priority() -> tuple[SchedulerCore, ev.AllocationAssigned]:
    """One 1-slot worker busy with a priority-50 trial."""
    core = core_with(submitted(1, priority=50), created(1, 10), submitted(2, priority=10))
    core.heartbeat(heartbeat("w1", 1, T0))
    low = only_assignment(core.tick(T0))
    core.handle(started(low, T0))
    return core, low


def test_a_higher_priority_trial_preempts_a_lower_one_which_requeues_without_a_restart() -> None:
    core, low = running_low_priority()
    out = core.handle(created(2, 20)) + core.tick(T0 + 1)
    (req,) = of(ev.TrialPreemptRequested, out)
    assert (req.trial_id, req.allocation_id) == (10, low.allocation_id)
    echo(core, out)
    assert core.tick(T0 + 2) == []  # no second request, nothing placed while the slot is held
    out = core.handle(alloc_exited(low, 0))
    assert [type(e) for e in out] == [ev.TrialPreempted]
    high = only_assignment(core.tick(T0 + 3))
    assert high.trial_id == 20
    core.handle(started(high, T0 + 3))
    done = core.handle(alloc_exited(high, 0))
    assert of(ev.TrialExited, done)[0].trial_id == 20
    again = only_assignment(core.tick(T0 + 4))
    assert (again.trial_id, again.restarts, again.allocation_id) == (10, 0, "10.2")


def test_a_trial_ignoring_preemption_is_killed_after_the_timeout_and_still_requeued() -> None:
    core, low = running_low_priority()
    core.preempt_timeout_s = 30.0
    core.handle(created(2, 20))
    core.tick(T0 + 1)  # the request
    core.tick(T0 + 2)  # the clock starts for it
    core.heartbeat(heartbeat("w1", 1, T0 + 20, running=[low.allocation_id]))
    assert of(ev.AllocationKillRequested, core.tick(T0 + 20)) == []
    core.heartbeat(heartbeat("w1", 1, T0 + 40, running=[low.allocation_id]))
    (kill,) = of(ev.AllocationKillRequested, core.tick(T0 + 40))
    assert kill.allocation_id == low.allocation_id
    out = core.handle(alloc_exited(low, -9, "killed"))
    assert [type(e) for e in out] == [ev.TrialPreempted]


def test_pause_preempts_running_trials_holds_the_queue_and_activate_resumes_from_checkpoint() -> None:
    core = core_with(submitted(1), created(1, 10), created(1, 11))
    core.heartbeat(heartbeat("w1", 1, T0))
    run = only_assignment(core.tick(T0))
    core.handle(started(run, T0))
    core.handle(ev.CheckpointStored(experiment_id=1, trial_id=run.trial_id, uuid="ck-1", steps_completed=5,
                                    storage="s3://kiln/checkpoints"))
    out = core.handle(ev.ExperimentPauseRequested(experiment_id=1, request_id="p"))
    assert [e.trial_id for e in of(ev.TrialPreemptRequested, out)] == [run.trial_id]
    core.handle(alloc_exited(run, 0))
    assert core.tick(T0 + 1) == []  # paused: the free slot stays free
    core.handle(ev.ExperimentActivateRequested(experiment_id=1, request_id="a"))
    again = only_assignment(core.tick(T0 + 2))
    assert (again.trial_id, again.latest_checkpoint) == (run.trial_id, "ck-1")


def test_killing_one_trial_leaves_the_others() -> None:
    core = core_with(submitted(1), created(1, 10), created(1, 11), created(1, 12))
    core.heartbeat(heartbeat("w1", 1, T0))
    run = only_assignment(core.tick(T0))
    (kill,) = core.handle(ev.TrialKillRequested(experiment_id=1, trial_id=run.trial_id))
    assert isinstance(kill, ev.AllocationKillRequested)
    (queued_kill,) = core.handle(ev.TrialKillRequested(experiment_id=1, trial_id=12))
    assert isinstance(queued_kill, ev.TrialExited) and queued_kill.state == "CANCELED"
    (exited,) = core.handle(alloc_exited(run, -15, "killed"))
    assert (exited.trial_id, exited.state) == (run.trial_id, "CANCELED")
    assert only_assignment(core.tick(T0 + 1)).trial_id == 11


def test_raising_an_experiment_s_priority_reorders_the_queue() -> None:
    core = core_with(submitted(1), created(1, 10), submitted(2), created(2, 20))
    core.handle(ev.ExperimentResourcesChanged(experiment_id=2, priority=5, change_id="c"))
    core.heartbeat(heartbeat("w1", 1, T0))
    assert only_assignment(core.tick(T0)).trial_id == 20
    assert [r.trial_id for r in core.queue()] == [10]


def test_max_slots_change_caps_an_experiment() -> None:
    core = core_with(submitted(1), *(created(1, t) for t in (10, 11, 12)))
    core.handle(ev.ExperimentResourcesChanged(experiment_id=1, max_slots=2, change_id="c"))
    core.heartbeat(heartbeat("w1", 4, T0))
    assert len(assigned(core.tick(T0))) == 2


def test_weights_from_the_config_split_a_worker() -> None:
    core = core_with(submitted(1), *(created(1, t) for t in range(10, 18)),
                     submitted(2), *(created(2, t) for t in range(20, 28)))
    core.handle(ev.ExperimentResourcesChanged(experiment_id=2, weight=3.0, change_id="w"))
    core.heartbeat(heartbeat("w1", 8, T0))
    got = assigned(core.tick(T0))
    assert sum(1 for a in got if a.experiment_id == 1) == 2
    assert sum(1 for a in got if a.experiment_id == 2) == 6


def test_an_experiment_submitted_paused_places_nothing_until_activated() -> None:
    core = core_with(msgspec.structs.replace(submitted(1), paused=True), created(1, 10))
    core.heartbeat(heartbeat("w1", 1, T0))
    assert core.tick(T0) == []  # created paused: the queue is held from the first event
    core.handle(ev.ExperimentActivateRequested(experiment_id=1, request_id="a"))
    assert only_assignment(core.tick(T0 + 1)).trial_id == 10
