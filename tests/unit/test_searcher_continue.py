"""The searcher's side of ``kiln experiment continue``: an ended search reopens for the trials a user continued."""

from __future__ import annotations

import msgspec

from schemas import events as ev
from schemas.config import config_to_dict, parse_config
from services.searcher.core import SearcherCore
from services.searcher.methods import ContinueTrial, GridSearch, RandomSearch, SearchContext, SingleSearch

SINGLE = """\
entrypoint: python3 train.py
hyperparameters:
  lr: {type: double, minval: 0.001, maxval: 0.1}
  width: 8
searcher: {name: single, metric: loss, max_length: {batches: 5}}
"""
RANDOM = """\
entrypoint: python3 train.py
hyperparameters: {lr: {type: double, minval: 0.001, maxval: 0.1}}
searcher: {name: random, metric: loss, max_trials: 3, max_concurrent_trials: 3, max_length: {batches: 5}}
"""


def _config(yaml: str) -> dict[str, object]:
    return config_to_dict(parse_config(yaml)[0])


def _submit(core: SearcherCore, yaml: str, experiment_id: int = 1) -> list[ev.TrialCreated]:
    out = core.handle(ev.ExperimentSubmitted(experiment_id=experiment_id, config=_config(yaml), config_yaml=yaml,
                                             context_digest="sha256:00", context_size=0, seed=11))
    created = [e for e in out if isinstance(e, ev.TrialCreated)]
    for c in created:
        assert core.handle(c) == []
    return created


def _exit(core: SearcherCore, trial: ev.TrialCreated | int, state: str = "COMPLETED", continuation: int = 0,
          experiment_id: int = 1) -> list[ev.DomainEvent]:
    trial_id = trial if isinstance(trial, int) else trial.trial_id
    return core.handle(ev.TrialExited(experiment_id=experiment_id, trial_id=trial_id, state=state,  # type: ignore[arg-type]
                                      continuation=continuation))


def _continued(trial_ids: list[int], yaml: str = SINGLE, experiment_id: int = 1) -> ev.ExperimentContinued:
    return ev.ExperimentContinued(experiment_id=experiment_id, config=_config(yaml), config_yaml=yaml,
                                  trial_ids=trial_ids, request_id="r1")


def test_a_single_trial_trains_on_to_the_longer_length_and_the_experiment_ends_again() -> None:
    core = SearcherCore()
    (trial,) = _submit(core, SINGLE)
    (ended,) = [e for e in _exit(core, trial) if isinstance(e, ev.ExperimentEnded)]
    assert (ended.state, ended.continuation) == ("COMPLETED", 0)
    core.handle(ended)

    longer = SINGLE.replace("{batches: 5}", "{batches: 12}")
    (again,) = core.handle(_continued([trial.trial_id], longer))
    assert isinstance(again, ev.TrialContinueRequested)
    # The same trial, to the continued config's length, with the hyperparameters it had (same seed and request).
    assert (again.trial_id, again.max_length, again.continuation) == (trial.trial_id, 12, 1)
    assert again.hparams == trial.hparams

    # It exits again: the experiment ends again, as a new fact (its own dedupe key).
    (ended2,) = [e for e in _exit(core, trial, continuation=1) if isinstance(e, ev.ExperimentEnded)]
    assert (ended2.state, ended2.continuation) == ("COMPLETED", 1)


def test_a_continue_of_an_experiment_that_has_not_ended_changes_nothing() -> None:
    core = SearcherCore()
    (trial,) = _submit(core, SINGLE)
    before = core.snapshot()
    assert core.handle(_continued([trial.trial_id])) == []
    assert core.snapshot() == before


def test_a_second_continue_sent_in_a_race_is_ignored() -> None:
    core = SearcherCore()
    (trial,) = _submit(core, SINGLE)
    core.handle(next(e for e in _exit(core, trial) if isinstance(e, ev.ExperimentEnded)))
    assert len(core.handle(_continued([trial.trial_id]))) == 1
    assert core.handle(_continued([trial.trial_id])) == []  # reopened already: not ended


def test_a_changed_hyperparameter_reaches_the_continued_trial() -> None:
    core = SearcherCore()
    (trial,) = _submit(core, SINGLE)
    core.handle(next(e for e in _exit(core, trial, "ERROR") if isinstance(e, ev.ExperimentEnded)))
    (again,) = core.handle(_continued([trial.trial_id], SINGLE.replace("width: 8", "width: 16")))
    assert isinstance(again, ev.TrialContinueRequested)
    assert again.hparams["width"] == 16 and again.hparams["lr"] == trial.hparams["lr"]


def test_random_search_reruns_the_trials_that_did_not_complete_and_ends_when_they_have() -> None:
    core = SearcherCore()
    t1, t2, t3 = _submit(core, RANDOM)
    assert _exit(core, t1) == []
    assert _exit(core, t2, "ERROR") == []
    (ended,) = [e for e in _exit(core, t3, "CANCELED") if isinstance(e, ev.ExperimentEnded)]
    core.handle(ended)

    out = core.handle(_continued([t2.trial_id, t3.trial_id], RANDOM))
    assert [(e.trial_id, e.hparams) for e in out if isinstance(e, ev.TrialContinueRequested)] == \
        [(t2.trial_id, t2.hparams), (t3.trial_id, t3.hparams)]
    assert _exit(core, t2, continuation=1) == []  # one still runs: no end, and no new trial (the budget is used)
    (ended2,) = _exit(core, t3, continuation=1)
    assert isinstance(ended2, ev.ExperimentEnded) and (ended2.state, ended2.continuation) == ("COMPLETED", 1)


def test_a_killed_random_search_goes_on_where_it_stopped() -> None:
    # Killed with one trial of three done: the search never counted the others' exits (the kill ended them),
    # so once they complete after the continue it creates the remaining trials as if it had never been killed.
    core = SearcherCore()
    created = _submit(core, RANDOM.replace("max_trials: 3, max_concurrent_trials: 3", "max_trials: 4, "
                                                                                       "max_concurrent_trials: 2"))
    t1, t2 = created
    assert _exit(core, t1) != []  # the next trial
    core.handle(ev.ExperimentKillRequested(experiment_id=1))
    trials = [e for e in core.state.experiments[1].trials.values()]
    assert len(trials) == 3
    ended: list[ev.DomainEvent] = []
    for entry in trials[1:]:
        ended += _exit(core, entry.trial_id, "CANCELED")
    (end,) = ended
    assert isinstance(end, ev.ExperimentEnded) and end.state == "CANCELED"
    core.handle(end)
    rerun = [e.trial_id for e in trials[1:]]
    out = core.handle(_continued(rerun, RANDOM))
    assert [e.trial_id for e in out if isinstance(e, ev.TrialContinueRequested)] == rerun
    new = [e for e in _exit(core, rerun[0], continuation=1) if isinstance(e, ev.TrialCreated)]
    assert len(new) == 1  # the fourth trial, which the kill kept from being created
    core.handle(new[0])
    assert _exit(core, rerun[1], continuation=1) == []
    (done,) = _exit(core, new[0])
    assert isinstance(done, ev.ExperimentEnded) and done.state == "COMPLETED"


def test_the_continued_search_snapshots_and_restores() -> None:
    core = SearcherCore()
    (trial,) = _submit(core, SINGLE)
    core.handle(next(e for e in _exit(core, trial) if isinstance(e, ev.ExperimentEnded)))
    core.handle(_continued([trial.trial_id], SINGLE.replace("{batches: 5}", "{batches: 9}")))
    restored = SearcherCore.restore(core.snapshot())
    assert restored.snapshot() == core.snapshot()
    (ended,) = [e for e in _exit(restored, trial, continuation=1) if isinstance(e, ev.ExperimentEnded)]
    assert ended.continuation == 1


def test_methods_take_back_the_exit_they_counted() -> None:
    cfg = parse_config(SINGLE)[0]
    ctx = SearchContext(cfg, 3)
    single = SingleSearch()
    single.initial_trials(ctx)
    single.trial_exited(ctx, 0, "errored")
    (cont,) = single.trial_continued(ctx, 0, "errored")
    assert single.exited == 0 and isinstance(cont, ContinueTrial) and cont.max_length == 5
    assert single.trial_continued(ctx, 0, None)  # not counted (killed): nothing to take back
    assert single.exited == 0

    rnd = RandomSearch(max_trials=2, max_concurrent_trials=2)
    rnd.initial_trials(SearchContext(parse_config(RANDOM)[0], 3))
    rnd.trial_exited(ctx, 0, "errored")
    rnd.trial_continued(ctx, 0, "errored")
    assert (rnd.exited, rnd.errored) == (0, 0)

    grid_cfg = parse_config(SINGLE.replace("name: single", "name: grid").replace(
        "{type: double, minval: 0.001, maxval: 0.1}", "{type: categorical, vals: [0.1, 0.2]}"))[0]
    gctx = SearchContext(grid_cfg, 3)
    grid = GridSearch()
    grid.initial_trials(gctx)
    grid.trial_exited(gctx, 1, "canceled")
    (g,) = grid.trial_continued(gctx, 1, "canceled")
    assert isinstance(g, ContinueTrial) and g.hparams["lr"] == 0.2 and grid.exited == 0
    assert msgspec.json.decode(msgspec.json.encode(g), type=ContinueTrial) == g
