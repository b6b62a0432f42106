"""The searcher's retention decisions: which checkpoints it asks to collect, when, and only once."""

from __future__ import annotations

from schemas import events as ev
from schemas.config import config_to_dict, parse_config
from services.searcher.core import SearcherCore

YAML = """\
entrypoint: model_def:Trial
searcher: {name: random, metric: loss, max_trials: 2, max_length: {batches: 10}}
hyperparameters: {lr: {type: double, minval: 0.01, maxval: 0.1}}
"""


def _submit(core: SearcherCore, yaml: str = YAML) -> list[ev.TrialCreated]:
    cfg, _ = parse_config(yaml)
    out = core.handle(ev.ExperimentSubmitted(experiment_id=1, config=config_to_dict(cfg), config_yaml=yaml,
                                             context_digest="sha256:0", context_size=0, seed=3))
    return [e for e in out if isinstance(e, ev.TrialCreated)]


def _train(core: SearcherCore, trial: int, losses: list[float]) -> list[ev.DomainEvent]:
    out: list[ev.DomainEvent] = []
    for step, loss in enumerate(losses, 1):
        out += core.handle(ev.ValidationReported(experiment_id=1, trial_id=trial, steps_completed=step,
                                                 metrics={"loss": loss}))
        out += core.handle(ev.CheckpointStored(experiment_id=1, trial_id=trial, uuid=f"t{trial}-{step}",
                                               steps_completed=step, storage="s3://kiln/checkpoints/1"))
    return out


def _gc(events: list[ev.DomainEvent]) -> list[list[str]]:
    return [[c.uuid for c in e.checkpoints] for e in events if isinstance(e, ev.CheckpointGCRequested)]


def test_a_finished_trial_keeps_its_best_and_latest_by_default() -> None:
    core = SearcherCore()
    t1, t2 = (t.trial_id for t in _submit(core))
    assert _gc(_train(core, t1, [0.5, 0.3, 0.4, 0.6])) == []  # running: nothing collected
    out = core.handle(ev.TrialExited(experiment_id=1, trial_id=t1, state="COMPLETED"))
    assert _gc(out) == [[f"t{t1}-1", f"t{t1}-3"]]  # kept: best (step 2) and latest (step 4)
    assert _gc(_train(core, t2, [0.9, 0.8])) == []  # the other trial still runs


def test_policy_change_applies_to_finished_trials_and_is_decided_once() -> None:
    core = SearcherCore()
    t1, t2 = (t.trial_id for t in _submit(core))
    _train(core, t1, [0.5, 0.3])
    _train(core, t2, [0.2, 0.9])
    out = core.handle(ev.TrialExited(experiment_id=1, trial_id=t1, state="COMPLETED"))
    out += core.handle(ev.TrialExited(experiment_id=1, trial_id=t2, state="COMPLETED"))
    assert sorted(u for batch in _gc(out) for u in batch) == [f"t{t1}-1"]  # t2: best is step 1, latest step 2
    snapshot = core.snapshot()
    change = ev.CheckpointGCPolicyChanged(experiment_id=1, save_experiment_best=1, save_trial_best=0,
                                          save_trial_latest=0, change_id="x")
    first = core.handle(change)
    assert _gc(first) == [[f"t{t1}-2", f"t{t2}-2"]]  # only the experiment's best (t2 step 1) stays
    assert _gc(core.handle(change)) == []  # asked once
    # Deterministic: from the same snapshot, the same decision (same dedupe key on the bus).
    assert SearcherCore.restore(snapshot).handle(change) == first


def test_protected_checkpoints_survive() -> None:
    core = SearcherCore()
    t1, _ = (t.trial_id for t in _submit(core))
    _train(core, t1, [0.5, 0.3, 0.4])
    core.state.experiments[1].retention.protected.add(f"t{t1}-1")
    out = core.handle(ev.TrialExited(experiment_id=1, trial_id=t1, state="COMPLETED"))
    assert _gc(out) == []  # step 1 protected, step 2 best, step 3 latest


def test_deleted_checkpoints_are_forgotten_and_config_policy_is_read() -> None:
    core = SearcherCore()
    yaml = YAML + "checkpoint_storage: {type: shared_fs, host_path: /tmp, save_trial_best: 0, save_trial_latest: 2}\n"
    t1, _ = (t.trial_id for t in _submit(core, yaml))
    _train(core, t1, [0.1, 0.3, 0.4])
    core.handle(ev.CheckpointsDeleted(experiment_id=1, uuids=[f"t{t1}-3"], reason="user"))
    out = core.handle(ev.TrialExited(experiment_id=1, trial_id=t1, state="COMPLETED"))
    assert _gc(out) == []  # two latest of what is left (steps 1, 2) are kept
