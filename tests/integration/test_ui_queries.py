"""The web UI's reads against a real Postgres: the experiments page (filters, sorts, paging and the total over a
couple of thousand experiments) and the series of every trial of an experiment in one query, with wall times."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import events as ev
from services.gateway import queries
from services.tracker.projection import project_batch
from tests.integration.test_tracker import CONFIG, _ids, _items, conn  # noqa: F401 - conn is a fixture

pytestmark = pytest.mark.integration

N = 2000  # experiments in the page tests' read model


def _submitted(eid: int, name: str, owner: str, labels: list[str], smaller_is_better: bool = True,
               searcher: str = "single") -> ev.ExperimentSubmitted:
    extra = {"max_trials": 2} if searcher == "random" else {}
    config = {**CONFIG, "name": name, "labels": labels,
              "searcher": {**CONFIG["searcher"], "name": searcher, "smaller_is_better": smaller_is_better, **extra}}
    return ev.ExperimentSubmitted(experiment_id=eid, config=config, config_yaml=f"name: {name}",
                                  context_digest="sha256:x", context_size=1, seed=1, submitted_by=owner,
                                  submitted_at=1000.0 + eid)


async def _page(conn: Any, sort: str = "id", descending: bool = True, limit: int = 50, offset: int = 0,  # noqa: F811
                **where: Any) -> Any:
    return await queries.experiments_page(conn, queries.ExperimentFilter(**where), sort, descending, limit, offset)


@pytest.fixture
async def many(conn: Any) -> Any:  # noqa: F811
    """N experiments: every 10th owned by bob, every 7th labelled "keep", every 500th with trials and metrics."""
    events: list[Any] = []
    for i in range(1, N + 1):
        events.append(_submitted(i, f"exp-{i:04d}", "bob" if i % 10 == 0 else "ann", ["keep"] if i % 7 == 0 else []))
    # Experiment 500: smaller is better, trials with 0.3 and 0.1 (best 0.1). 1000: larger is better (best 0.9).
    # 1500: a trial without a metric. 2000: none.
    events[999] = _submitted(1000, "exp-1000", "bob", [], smaller_is_better=False, searcher="random")
    tid = 10_000
    for eid, values in ((500, [0.3, 0.1]), (1000, [0.2, 0.9]), (1500, [None])):
        for v in values:
            tid += 1
            events.append(ev.TrialCreated(experiment_id=eid, trial_id=tid, request_id=tid, hparams={}, seed=1))
            if v is not None:
                events.append(ev.ValidationReported(experiment_id=eid, trial_id=tid, steps_completed=1,
                                                    metrics={"loss": v}))
    events.append(ev.ExperimentEnded(experiment_id=2, state="COMPLETED"))
    await project_batch(conn, "c", _items(events))
    await queries.init_connection(conn)
    return conn


async def test_the_page_is_newest_first_with_trial_counts_best_trials_and_the_total(many: Any) -> None:
    page = await _page(many, limit=3)
    assert page.total == N and (page.offset, page.limit) == (0, 3)
    assert [e.id for e in page.experiments] == [2000, 1999, 1998]
    deeper = await _page(many, limit=3, offset=500)
    assert [e.id for e in deeper.experiments] == [1500, 1499, 1498]
    assert deeper.experiments[0].num_trials == 1 and deeper.experiments[0].best_trial is None
    best = {e.id: e.best_trial for e in (await _page(many, sort="num_trials", limit=3)).experiments}
    assert best[500] is not None and best[500].best_metric == 0.1  # smaller is better
    assert best[1000] is not None and best[1000].best_metric == 0.9  # larger is better
    assert (await _page(many, offset=N)).experiments == [] and (await _page(many, offset=N)).total == N


async def test_filters_combine_and_the_total_counts_what_matches(many: Any) -> None:
    bob = await _page(many, owner="bob", limit=1000)
    assert bob.total == N // 10 and all(e.submitted_by == "bob" for e in bob.experiments)
    both = await _page(many, owner="bob", label="keep", limit=1000)
    assert {e.id for e in both.experiments} == {i for i in range(70, N + 1, 70)}
    assert both.total == len(both.experiments)
    named = await _page(many, name="XP-19")  # contains, ignoring case
    assert named.total == 100 and all("exp-19" in e.name for e in named.experiments)
    assert (await _page(many, name="%")).total == 0  # the text is matched as it is, not as a pattern
    assert (await _page(many, state="COMPLETED")).total == 1
    assert [e.id for e in (await _page(many, searcher="random")).experiments] == [1000]
    assert (await _page(many, archived=True)).total == 0 and (await _page(many, archived=False)).total == N


async def test_every_sort_key_pages_consistently(many: Any) -> None:
    for sort in queries.EXPERIMENT_SORTS:
        for descending in (False, True):
            pages = [await _page(many, sort=sort, descending=descending, limit=700, offset=o) for o in (0, 700, 1400)]
            ids = [e.id for p in pages for e in p.experiments]
            assert sorted(ids) == list(range(1, N + 1)), sort  # every experiment once across the pages
    by_name = await _page(many, sort="name", descending=False, limit=2)
    assert [e.name for e in by_name.experiments] == ["exp-0001", "exp-0002"]
    by_best = await _page(many, sort="best_metric", descending=True, limit=3)
    assert [e.id for e in by_best.experiments][:2] == [1000, 500]  # 0.9, 0.1; those without one come last
    by_best = await _page(many, sort="best_metric", descending=False, limit=2)
    assert [e.id for e in by_best.experiments] == [500, 1000]
    by_trials = await _page(many, sort="num_trials", descending=True, limit=3)
    assert {e.id for e in by_trials.experiments[:2]} == {500, 1000}


async def test_the_series_of_many_trials_come_in_one_query_with_wall_times(conn: Any) -> None:  # noqa: F811
    e = next(_ids)
    trials = [next(_ids) for _ in range(3)]
    events: list[Any] = [_submitted(e, "curves", "ann", [])]
    for k, t in enumerate(trials):
        events.append(ev.TrialCreated(experiment_id=e, trial_id=t, request_id=k, hparams={}, seed=1))
    for k, t in enumerate(trials[:2]):  # the third reports nothing
        points = [ev.MetricPoint(steps_completed=s, metrics={"loss": 1.0 / s + k, "acc": 0.5}, reported_at=5000.0 + s)
                  for s in range(1, 301)]
        events.append(ev.TrainingMetricsReported(experiment_id=e, trial_id=t, batch_id="b", points=points))
    await project_batch(conn, "c", _items(events))
    got = await queries.series_of_trials(conn, trials, "training", "loss", 100)
    assert set(got) == set(trials[:2])
    for k, t in enumerate(trials[:2]):
        points = got[t]
        assert 50 <= len(points) <= 100
        assert points[0].step == 1 and points[0].value == pytest.approx(1.0 + k) and points[0].wall_time == 5001.0
        assert all(p.wall_time == 5000.0 + p.step for p in points)
    whole = await queries.series_of_trials(conn, trials, "training", "loss", 1000)
    assert [p.step for p in whole[trials[0]]] == list(range(1, 301))
    assert await queries.series(conn, trials[1], "training", "loss", 1000) == whole[trials[1]]
    assert await queries.experiment_trial_ids(conn, e) == trials
    names = await queries.experiment_metric_names(conn, e)
    assert [(n.kind, n.name, n.trials) for n in names] == [("training", "acc", 2), ("training", "loss", 2)]
