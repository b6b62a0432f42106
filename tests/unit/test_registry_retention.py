"""Registered checkpoints are never collected: the searcher folds the model registry's events into retention.

Table-driven: one finished trial with three checkpoints, the registry events of a case, then a policy that keeps
nothing (``save_* = 0``). What is collected is every checkpoint but those a live model version names.
"""

from __future__ import annotations

import pytest

from schemas import events as ev
from schemas.config import config_to_dict, parse_config
from services.searcher.core import SearcherCore

YAML = """\
entrypoint: python3 train.py
searcher: {name: single, metric: loss, max_length: {batches: 3}}
"""
EXP = 1
KEEP_NOTHING = ev.CheckpointGCPolicyChanged(experiment_id=EXP, save_experiment_best=0, save_trial_best=0,
                                            save_trial_latest=0, change_id="nothing")


def _trained() -> tuple[SearcherCore, dict[int, str]]:
    """A core whose one trial reported three validations and checkpoints and is still running (nothing collected)."""
    core = SearcherCore()
    cfg, _ = parse_config(YAML)
    (created,) = [e for e in core.handle(ev.ExperimentSubmitted(
        experiment_id=EXP, config=config_to_dict(cfg), config_yaml=YAML, context_digest="sha256:0", context_size=0,
        seed=1)) if isinstance(e, ev.TrialCreated)]
    uuids = {}
    for step, loss in enumerate([0.5, 0.2, 0.4], 1):
        uuids[step] = f"ckpt-{step}"
        core.handle(ev.ValidationReported(experiment_id=EXP, trial_id=created.trial_id, steps_completed=step,
                                          metrics={"loss": loss}))
        core.handle(ev.CheckpointStored(experiment_id=EXP, trial_id=created.trial_id, uuid=uuids[step],
                                        steps_completed=step, storage="s3://kiln/checkpoints/1"))
    return core, uuids


def created(model: int, name: str = "") -> ev.ModelCreated:
    return ev.ModelCreated(model_id=model, name=name or f"model-{model}")


def registered(model: int, version: int, step: int, experiment: int = EXP) -> ev.ModelVersionRegistered:
    return ev.ModelVersionRegistered(model_id=model, version=version, checkpoint_uuid=f"ckpt-{step}",
                                     experiment_id=experiment, trial_id=1)


def version_deleted(model: int, version: int) -> ev.ModelVersionDeleted:
    return ev.ModelVersionDeleted(model_id=model, version=version)


def model_deleted(model: int) -> ev.ModelDeleted:
    return ev.ModelDeleted(model_id=model)


CASES: list[tuple[str, list[ev.DomainEvent], set[int]]] = [
    # (case, the registry's events, the steps whose checkpoints survive a policy that keeps nothing)
    ("nothing registered", [], set()),
    ("a registered version", [created(1), registered(1, 1, 2)], {2}),
    ("two versions of one model", [created(1), registered(1, 1, 1), registered(1, 2, 3)], {1, 3}),
    ("its version deleted", [created(1), registered(1, 1, 2), version_deleted(1, 1)], set()),
    ("another version deleted", [created(1), registered(1, 1, 2), registered(1, 2, 3), version_deleted(1, 2)], {2}),
    ("its model deleted", [created(1), registered(1, 1, 2), registered(1, 2, 3), model_deleted(1)], set()),
    ("in two models, one deleted", [created(1), created(2), registered(1, 1, 2), registered(2, 1, 2),
                                    model_deleted(1)], {2}),
    ("twice in one model, one version deleted", [created(1), registered(1, 1, 2), registered(1, 2, 2),
                                                 version_deleted(1, 1)], {2}),
    ("a model never created", [registered(9, 1, 2)], set()),
    ("a deleted model", [created(1), model_deleted(1), registered(1, 1, 2)], set()),
    # Two registrations racing for one version number: the first in the stream keeps it.
    ("a version number taken", [created(1), registered(1, 1, 2), registered(1, 1, 3)], {2}),
    # Numbers are never reused, not even after the version was deleted.
    ("a deleted version's number", [created(1), registered(1, 1, 1), version_deleted(1, 1), registered(1, 1, 2)],
     set()),
    # A name belongs to one live model: the second create is void, and so is what is registered into it.
    ("a second model of the same name", [created(1, "digits"), created(2, "digits"), registered(2, 1, 2)], set()),
    ("a name freed by a delete", [created(1, "digits"), model_deleted(1), created(2, "digits"),
                                  registered(2, 1, 2)], {2}),
    ("another experiment's checkpoint", [created(1), registered(1, 1, 2, experiment=7)], set()),
    ("redelivered create keeps the versions", [created(1), registered(1, 1, 2), created(1)], {2}),
]


@pytest.mark.parametrize(("events", "survivors"), [(e, s) for _, e, s in CASES], ids=[c for c, _, _ in CASES])
def test_retention_never_collects_a_registered_checkpoint(events: list[ev.DomainEvent], survivors: set[int]) -> None:
    core, uuids = _trained()
    for event in events:
        assert core.handle(event) == []  # registering decides nothing by itself
    out = core.handle(KEEP_NOTHING)
    out += core.handle(ev.TrialExited(experiment_id=EXP, trial_id=1, state="COMPLETED"))
    collected = {c.uuid for e in out if isinstance(e, ev.CheckpointGCRequested) for c in e.checkpoints}
    assert collected == {uuids[s] for s in uuids if s not in survivors}


def test_protection_survives_a_snapshot_and_a_later_unregister_makes_it_collectable_again() -> None:
    core, uuids = _trained()
    for event in (created(1), registered(1, 1, 2)):
        core.handle(event)
    core = SearcherCore.restore(core.snapshot())
    out = core.handle(ev.TrialExited(experiment_id=EXP, trial_id=1, state="COMPLETED"))
    out += core.handle(KEEP_NOTHING)
    assert {c.uuid for e in out if isinstance(e, ev.CheckpointGCRequested) for c in e.checkpoints} == \
        {uuids[1], uuids[3]}
    # Unregistered, it waits for the next retention decision (as in Determined), then goes.
    assert core.handle(version_deleted(1, 1)) == []
    again = core.handle(ev.CheckpointGCPolicyChanged(experiment_id=EXP, save_trial_latest=0, change_id="again"))
    assert [[c.uuid for c in e.checkpoints] for e in again if isinstance(e, ev.CheckpointGCRequested)] == \
        [[uuids[2]]]
