"""Fencing: a run declared lost (its worker cut off past the timeout) was restarted elsewhere; what its worker
still sends once it is reachable again is refused by the scheduler, the searcher and the tracker, and the
worker stamps every trial report with the run it comes from."""

from __future__ import annotations

import msgspec

from schemas import events as ev
from services.scheduler.core import SchedulerCore
from services.searcher.core import SearcherCore
from services.tracker.projection import Fold, Item
from services.worker.link import Identity, refusal
from tests.unit.test_scheduler_core import T0, core_with, created, heartbeat, started, submitted
from tests.unit.test_searcher_core import start

WHO = Identity(experiment_id=1, trial_id=10, allocation_id="10.1")


def _lose_the_worker_of_a_running_trial() -> tuple[SchedulerCore, ev.AllocationAssigned, list[ev.DomainEvent]]:
    core = core_with(submitted(1), created(1, 10))
    core.heartbeat(heartbeat("w1", 1, T0))
    core.heartbeat(heartbeat("w2", 1, T0))
    (first,) = [e for e in core.tick(T0) if isinstance(e, ev.AllocationAssigned)]
    core.handle(first)
    core.handle(started(first, T0))
    core.handle(ev.CheckpointStored(experiment_id=1, trial_id=10, uuid="ck-before", steps_completed=3,
                                    storage="s3://kiln/checkpoints/1", allocation_id=first.allocation_id))
    other = "w2" if first.worker_id == "w1" else "w1"
    core.heartbeat(heartbeat(other, 1, T0 + 30))  # only the other worker is still heard
    out = core.tick(T0 + 30)
    return core, first, out


def test_the_scheduler_declares_the_silent_worker_lost_and_restarts_from_the_checkpoint_it_had() -> None:
    core, first, out = _lose_the_worker_of_a_running_trial()
    (lost,) = [e for e in out if isinstance(e, ev.WorkerLost)]
    assert lost.worker_id == first.worker_id and lost.allocation_ids == [first.allocation_id]
    (again,) = [e for e in out if isinstance(e, ev.AllocationAssigned)]
    assert again.worker_id != first.worker_id and again.latest_checkpoint == "ck-before"


def test_a_lost_run_s_late_checkpoint_never_becomes_the_trial_s_latest() -> None:
    core, first, out = _lose_the_worker_of_a_running_trial()
    for e in out:  # the decisions come back through the stream
        core.handle(e)
    (again,) = [e for e in out if isinstance(e, ev.AllocationAssigned)]
    core.handle(ev.CheckpointStored(experiment_id=1, trial_id=10, uuid="ck-stale", steps_completed=7,
                                    storage="s3://kiln/checkpoints/1", allocation_id=first.allocation_id))
    assert core.state.trials[10].latest_checkpoint == "ck-before"
    core.handle(ev.CheckpointStored(experiment_id=1, trial_id=10, uuid="ck-new", steps_completed=5,
                                    storage="s3://kiln/checkpoints/1", allocation_id=again.allocation_id))
    assert core.state.trials[10].latest_checkpoint == "ck-new"
    # The fence outlives a restart of the scheduler (it is in the snapshot).
    restored = SchedulerCore.restore(core.snapshot())
    assert restored.state.trials[10].lost_allocations == [first.allocation_id]


def test_the_searcher_does_not_decide_on_a_lost_run_s_validations() -> None:
    core = SearcherCore()
    trial = start(core)
    lost = ev.AllocationLost(experiment_id=1, trial_id=trial.trial_id, allocation_id=f"{trial.trial_id}.1",
                             worker_id="w1")
    assert core.handle(lost) == []

    def validation(step: int, allocation_id: str) -> ev.ValidationReported:
        return ev.ValidationReported(experiment_id=1, trial_id=trial.trial_id, steps_completed=step,
                                     metrics={"validation_loss": 0.5}, allocation_id=allocation_id)

    entry = next(iter(core.state.experiments[1].trials.values()))
    core.handle(validation(9, f"{trial.trial_id}.1"))
    assert entry.validated_steps == -1  # fenced
    core.handle(validation(4, f"{trial.trial_id}.2"))
    assert entry.validated_steps == 4
    core.handle(validation(5, ""))  # a report from before runs were stamped still counts
    assert entry.validated_steps == 5


def _tracker(*events: object) -> Fold:
    sub = ev.ExperimentSubmitted(experiment_id=1, config={"name": "x", "entrypoint": "python3 train.py",
                                                          "searcher": {"name": "single", "metric": "loss"}},
                                 config_yaml="", context_digest="d", context_size=1, seed=1)
    f = Fold()
    for i, e in enumerate([sub, ev.TrialCreated(experiment_id=1, trial_id=10, request_id=0, hparams={}, seed=0),
                           *events], 1):
        f.apply(Item(seq=i, ts=1000.0 + i, event=e))
    f.finish()
    return f


def _assigned(alloc: str, worker: str) -> ev.AllocationAssigned:
    return ev.AllocationAssigned(experiment_id=1, trial_id=10, allocation_id=alloc, worker_id=worker, slot_ids=["c"])


def _validated(step: int, alloc: str, host: str) -> ev.ValidationReported:
    return ev.ValidationReported(experiment_id=1, trial_id=10, steps_completed=step,
                                 metrics={"loss": 1.0 / step, "host": host}, allocation_id=alloc)


def test_the_tracker_keeps_a_lost_run_s_late_reports_out_of_the_read_model() -> None:
    f = _tracker(
        _assigned("10.1", "w1"), _validated(1, "10.1", "w1"),
        ev.AllocationLost(experiment_id=1, trial_id=10, allocation_id="10.1", worker_id="w1"),
        ev.TrialRestarting(experiment_id=1, trial_id=10, restarts=1),
        _assigned("10.2", "w2"), _validated(2, "10.2", "w2"),
        # The cut-off worker comes back: its buffered reports arrive late.
        _validated(2, "10.1", "w1"), _validated(3, "10.1", "w1"),
        ev.TrialProgressReported(experiment_id=1, trial_id=10, progress=0.9, allocation_id="10.1"),
        ev.CheckpointStored(experiment_id=1, trial_id=10, uuid="ck-stale", steps_completed=3, storage="s3://k/c",
                            allocation_id="10.1"),
        ev.AllocationExited(experiment_id=1, trial_id=10, allocation_id="10.1", worker_id="w1", exit_code=-15,
                            killed=True),
    )
    hosts = {step: f.metric_rows[(10, "validation", "host", step)][5] for step in (1, 2)}
    assert hosts == {1: "w1", 2: "w2"}
    assert (10, "validation", "host", 3) not in f.metric_rows
    t = f.trials[10]
    assert t["steps_completed"] == 2 and t["progress"] == 0.0 and t["latest_checkpoint"] is None
    assert msgspec.json.decode(t["latest_validation"])["metrics"]["host"] == "w2"
    assert "ck-stale" in f.checkpoints  # the object exists: listed (and collected), just not the trial's
    # The allocation stays lost; its late exit code is recorded.
    assert (f.allocations["10.1"]["end_reason"], f.allocations["10.1"]["exit_code"]) == ("worker lost", -15)


def test_the_worker_refuses_a_report_naming_another_run_and_stamps_its_own() -> None:
    theirs = ev.ValidationReported(experiment_id=1, trial_id=10, steps_completed=1, metrics={}, allocation_id="10.2")
    assert "allocation 10.2" in refusal(WHO, theirs)
    assert refusal(WHO, msgspec.structs.replace(theirs, allocation_id="")) == ""
    assert refusal(WHO, msgspec.structs.replace(theirs, allocation_id="10.1")) == ""


def test_heartbeats_a_cut_off_worker_sent_before_it_was_declared_lost_do_not_bring_it_back() -> None:
    core, first, _ = _lose_the_worker_of_a_running_trial()
    worker = core.state.workers[first.worker_id]
    assert worker.lost and worker.lost_at == T0 + 30
    # Buffered while the link was down, delivered when it came back: stale.
    assert core.heartbeat(heartbeat(first.worker_id, 1, T0 + 5, running=[first.allocation_id])) == []
    assert core.state.workers[first.worker_id].lost
    assert [e for e in core.tick(T0 + 31) if isinstance(e, ev.WorkerLost)] == []  # not lost a second time
    # A heartbeat sent after it was declared lost: it is back, as a new, empty worker.
    core.heartbeat(heartbeat(first.worker_id, 1, T0 + 32, running=[first.allocation_id]))
    assert not core.state.workers[first.worker_id].lost


def test_two_runs_reporting_the_same_step_are_two_facts_one_run_retrying_is_one() -> None:
    from schemas.subjects import dedupe_key

    def v(alloc: str) -> ev.ValidationReported:
        return ev.ValidationReported(experiment_id=1, trial_id=10, steps_completed=7, metrics={"loss": 1.0},
                                     allocation_id=alloc)

    # Keyed by the trial alone, a fenced run's report would be stored and the live run's dropped as its duplicate.
    assert dedupe_key(v("10.1")) != dedupe_key(v("10.2"))
    assert dedupe_key(v("10.2")) == dedupe_key(v("10.2"))
    assert dedupe_key(v("")) == "ValidationReported:10:7"  # reports from before runs were stamped: as they were
    p1, p2 = (ev.TrialProgressReported(experiment_id=1, trial_id=10, progress=0.5, allocation_id=a) for a in ("a", "b"))
    assert dedupe_key(p1) != dedupe_key(p2)
