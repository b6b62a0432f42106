"""The tracker's fold of a continue: the experiment and its trial run again, progress starts over."""

from __future__ import annotations

from typing import Any

from schemas import events as ev
from services.tracker.projection import Fold, Item

E, T = 1, 10
CONFIG = {"name": "x", "entrypoint": "python3 train.py", "searcher": {"name": "single", "metric": "loss"}}


def _fold(*events: Any) -> Fold:
    f = Fold()
    for i, e in enumerate(events, 1):
        f.apply(Item(seq=i, ts=1000.0 + i, event=e))
    f.finish()
    return f


def _life() -> list[Any]:
    return [
        ev.ExperimentSubmitted(experiment_id=E, config=CONFIG, config_yaml="a: 1\n", context_digest="d",
                               context_size=1, seed=1, submitted_at=100.0),
        ev.TrialCreated(experiment_id=E, trial_id=T, request_id=0, hparams={"lr": 0.1}, seed=0, max_length=5,
                        planned_trials=1),
        ev.TrialProgressReported(experiment_id=E, trial_id=T, progress=1.0),
        ev.TrialExited(experiment_id=E, trial_id=T, state="ERROR", exit_code=1, restarts=2, reason="boom"),
        ev.ExperimentEnded(experiment_id=E, state="ERROR", reason="every trial errored"),
    ]


def _continued(config: dict[str, Any] | None = None) -> ev.ExperimentContinued:
    return ev.ExperimentContinued(experiment_id=E, config=config or CONFIG, config_yaml="a: 2\n", trial_ids=[T],
                                  request_id="r")


def test_a_continue_reopens_the_experiment_and_its_trial() -> None:
    renamed = {**CONFIG, "name": "longer"}
    f = _fold(*_life(), _continued(renamed),
              ev.TrialContinueRequested(experiment_id=E, trial_id=T, hparams={"lr": 0.2}, max_length=9,
                                        continuation=1))
    x, t = f.experiments[E], f.trials[T]
    assert (x["state"], x["ended_at"], x["end_reason"], x["config_yaml"], x["name"]) == \
        ("ACTIVE", None, "", "a: 2\n", "longer")
    assert (t["state"], t["ended_at"], t["exit_code"], t["restarts"], t["max_length"], t["hparams"]) == \
        ("QUEUED", None, None, 0, 9, '{"lr":0.2}')
    assert x["progress"] == 0.0 and t["progress"] == 0.0  # started over, as Determined resets it
    # It ends again: the second end is recorded like the first.
    f.apply(Item(seq=20, ts=2000.0, event=ev.TrialExited(experiment_id=E, trial_id=T, state="COMPLETED",
                                                         exit_code=0, continuation=1)))
    f.apply(Item(seq=21, ts=2001.0, event=ev.ExperimentEnded(experiment_id=E, state="COMPLETED", continuation=1)))
    f.finish()
    assert (x["state"], x["ended_at"].timestamp(), x["progress"], t["state"]) == ("COMPLETED", 2001.0, 1.0,
                                                                                   "COMPLETED")


def test_a_continue_of_an_experiment_still_running_changes_nothing() -> None:
    life = _life()[:3]
    f = _fold(*life, _continued({**CONFIG, "name": "other"}))
    assert (f.experiments[E]["state"], f.experiments[E]["name"], f.experiments[E]["config_yaml"]) == \
        ("ACTIVE", "x", "a: 1\n")


def test_a_name_the_override_did_not_touch_stays_as_the_user_set_it() -> None:
    f = _fold(*_life(), ev.ExperimentMetadataChanged(experiment_id=E, name="renamed", change_id="c"), _continued())
    assert f.experiments[E]["name"] == "renamed"
