"""The scheduler's side of fine-tune and continue: where a trial's first run starts, and an ended trial requeued."""

from __future__ import annotations

from schemas import events as ev
from schemas.config import config_to_dict, parse_config
from services.scheduler.core import SchedulerCore

T0 = 1000.0
YAML = ("entrypoint: python3 train.py\nsearcher: {name: single, metric: loss, max_length: {batches: 5}}\n"
        "max_restarts: 1\n")
SOURCE = ev.SourceCheckpoint(uuid="src-uuid", experiment_id=3, trial_id=4, steps_completed=5,
                             storage="s3://kiln/checkpoints/3")


def _submitted(yaml: str = YAML, source: ev.SourceCheckpoint | None = None) -> ev.ExperimentSubmitted:
    return ev.ExperimentSubmitted(experiment_id=1, config=config_to_dict(parse_config(yaml)[0]), config_yaml=yaml,
                                  context_digest="sha256:00", context_size=0, seed=1, source_checkpoint=source)


def _core(source: ev.SourceCheckpoint | None = None) -> SchedulerCore:
    core = SchedulerCore()
    core.handle(_submitted(source=source))
    core.handle(ev.TrialCreated(experiment_id=1, trial_id=10, request_id=0, hparams={"lr": 0.1}, seed=3,
                                max_length=5))
    core.heartbeat(ev.WorkerHeartbeat(worker_id="w1", address="10.0.0.1", resource_pool="default",
                                      slots=[ev.Slot(slot_id="cpu0", kind="cpu")], running=[], sent_at=T0))
    return core


def _place(core: SchedulerCore) -> ev.AllocationAssigned:
    (assigned,) = [e for e in core.tick(T0) if isinstance(e, ev.AllocationAssigned)]
    core.handle(assigned)
    core.handle(ev.TrialStarted(experiment_id=1, trial_id=10, allocation_id=assigned.allocation_id,
                                worker_id="w1", started_at=T0))
    return assigned


def _exit(core: SchedulerCore, a: ev.AllocationAssigned, code: int) -> list[ev.DomainEvent]:
    out = core.handle(ev.AllocationExited(experiment_id=1, trial_id=10, allocation_id=a.allocation_id,
                                          worker_id="w1", exit_code=code))
    for e in out:
        core.handle(e)
    return out


def test_every_first_run_of_a_fine_tune_starts_from_the_source_and_a_restart_from_its_own_checkpoint() -> None:
    core = _core(SOURCE)
    first = _place(core)
    assert first.latest_checkpoint == "src-uuid"
    assert first.spec is not None and first.spec.source_checkpoint == SOURCE  # the worker grants reading it
    core.handle(ev.CheckpointStored(experiment_id=1, trial_id=10, uuid="own-1", steps_completed=2,
                                    storage="s3://kiln/checkpoints/1"))
    (restarting,) = _exit(core, first, 1)
    assert isinstance(restarting, ev.TrialRestarting)
    assert _place(core).latest_checkpoint == "own-1"


def test_a_trial_without_a_source_starts_fresh() -> None:
    first = _place(_core())
    assert first.latest_checkpoint is None and first.spec is not None and first.spec.source_checkpoint is None


def test_a_continued_trial_is_queued_again_with_its_latest_checkpoint_the_new_length_and_restarts_from_zero() -> None:
    core = _core()
    a = _place(core)
    core.handle(ev.CheckpointStored(experiment_id=1, trial_id=10, uuid="own-5", steps_completed=5,
                                    storage="s3://kiln/checkpoints/1"))
    restarting = _exit(core, a, 1)
    assert [type(e) for e in restarting] == [ev.TrialRestarting]
    a2 = _place(core)
    (done,) = _exit(core, a2, 0)
    assert isinstance(done, ev.TrialExited) and (done.state, done.continuation, done.restarts) == ("COMPLETED", 0, 1)

    longer = YAML.replace("{batches: 5}", "{batches: 9}").replace("max_restarts: 1", "max_restarts: 3")
    continued = ev.ExperimentContinued(experiment_id=1, config=config_to_dict(parse_config(longer)[0]),
                                       config_yaml=longer, trial_ids=[10], request_id="r")
    # Not ended yet (its ExperimentEnded has not come): the continue changes nothing.
    assert core.handle(continued) == []
    assert core.tick(T0) == []
    core.handle(ev.ExperimentEnded(experiment_id=1, state="COMPLETED"))
    core.handle(continued)
    core.handle(ev.TrialContinueRequested(experiment_id=1, trial_id=10, hparams={"lr": 0.2}, max_length=9,
                                          continuation=1))
    a3 = _place(core)
    assert (a3.latest_checkpoint, a3.max_length, a3.restarts) == ("own-5", 9, 0)
    assert a3.spec is not None and a3.spec.hparams == {"lr": 0.2}
    assert a3.spec.config["searcher"]["max_length"] == {"batches": 9}
    # Its runs after the continue are new facts: numbered by the continue (their dedupe keys differ).
    (restart,) = _exit(core, a3, 1)
    assert isinstance(restart, ev.TrialRestarting) and (restart.restarts, restart.continuation) == (1, 1)
    (end,) = _exit(core, _place(core), 0)
    assert isinstance(end, ev.TrialExited) and (end.state, end.continuation) == ("COMPLETED", 1)
    # A continue request repeated (its echo) does not requeue the trial again.
    core.handle(ev.TrialContinueRequested(experiment_id=1, trial_id=10, hparams={}, max_length=9, continuation=1))
    assert core.tick(T0) == []
