"""Experiment progress is work done over work planned and never goes backwards, whatever the batching."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from schemas import events as ev
from services.searcher.core import SearcherCore
from services.tracker.projection import Fold, Item, search_progress

E = 1
RANDOM4 = {"name": "x", "entrypoint": "python3 train.py",
           "hyperparameters": {"lr": {"type": "double", "minval": 0.01, "maxval": 0.9}},
           "searcher": {"name": "random", "metric": "loss", "max_trials": 4, "max_concurrent_trials": 2,
                        "max_length": {"batches": 5}}}


def _log() -> list[Any]:
    """A random search of 4 trials, 2 at a time: each trial created when one before it exits."""
    out: list[Any] = [ev.ExperimentSubmitted(experiment_id=E, config=RANDOM4, config_yaml="", context_digest="d",
                                             context_size=1, seed=1)]
    out += [ev.TrialCreated(experiment_id=E, trial_id=t, request_id=t, hparams={}, seed=0,
                             planned_trials=4) for t in (1, 2)]
    for first, then in ((1, 3), (2, 4), (3, None), (4, None)):
        out += [ev.TrialProgressReported(experiment_id=E, trial_id=first, progress=p) for p in (0.2, 0.6, 0.4, 1.0)]
        out.append(ev.TrialExited(experiment_id=E, trial_id=first, state="COMPLETED"))
        if then is not None:
            out.append(ev.TrialCreated(experiment_id=E, trial_id=then, request_id=then, hparams={}, seed=0,
                                       planned_trials=4))
    return out


def _fold_in_batches(log: list[Any], cuts: tuple[int, ...]) -> list[float]:
    """Fold ``log`` cut at ``cuts`` as the tracker does (rows and trial shares reloaded per batch); the
    experiment's progress after each batch."""
    experiments: dict[int, dict[str, Any]] = {}
    trials: dict[int, dict[str, Any]] = {}
    seen = []
    bounds = [0, *cuts, len(log)]
    for lo, hi in itertools.pairwise(bounds):
        shares = {tid: 1.0 if t["ended_at"] is not None else t["progress"] for tid, t in trials.items()}
        f = Fold(experiments=experiments, trials=trials, progress_of={E: shares} if experiments else None)
        for i in range(lo, hi):
            f.apply(Item(seq=i + 1, ts=1000.0 + i, event=log[i]))
        f.finish()
        experiments, trials = f.experiments, f.trials
        seen.append(experiments[E]["progress"])
    return seen


@pytest.mark.parametrize(("shares", "planned", "expected"), [
    ([], 4, 0.0), ([0.5], 4, 0.125), ([1.0, 1.0], 4, 0.5), ([1.0, 1.0, 1.0, 1.0], 4, 1.0),
    ([1.0, 0.5, 0.5], 2, 2 / 3),  # more trials than planned widen the denominator
    ([0.5], 0, 0.5),  # a plan that cannot be read: the trials there are
])
def test_search_progress_is_work_done_over_trials_planned(shares: list[float], planned: int, expected: float) -> None:
    assert math.isclose(search_progress(shares, planned), expected)


def test_the_searcher_states_its_plan_in_every_trial_it_creates() -> None:
    core = SearcherCore()
    out = core.handle(ev.ExperimentSubmitted(experiment_id=E, config=RANDOM4, config_yaml="", context_digest="d",
                                             context_size=1, seed=1))
    created = [e for e in out if isinstance(e, ev.TrialCreated)]
    assert len(created) == 2 and {e.planned_trials for e in created} == {4}


def test_progress_never_goes_backwards_and_is_the_same_whatever_the_batching() -> None:
    log = _log()
    whole = _fold_in_batches(log, ())[-1]
    every = _fold_in_batches(log, tuple(range(1, len(log))))
    assert every == sorted(every), every  # monotone, event by event
    assert every[-1] == whole == 1.0  # every trial exited: the planned work is done
    for cuts in [(3,), (5, 9), (2, 7, 12, 18), tuple(range(2, len(log), 3))]:
        assert _fold_in_batches(log, cuts)[-1] == whole
    # Partway: after the first two trials exit (trial 3 and 4 created, nothing reported) half is done.
    upto = log.index(next(e for e in log if isinstance(e, ev.TrialCreated) and e.trial_id == 4)) + 1
    assert _fold_in_batches(log[:upto], ())[-1] == 0.5
