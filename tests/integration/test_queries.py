"""Read-model queries the gateway serves, against a real Postgres: downsampled series, sorted trials."""

from __future__ import annotations

import math
from typing import Any

import pytest

from schemas import events as ev
from services.gateway import queries
from services.tracker.projection import project_batch
from tests.integration.test_tracker import _ids, _items, _life, conn  # noqa: F401 - conn is a fixture

pytestmark = pytest.mark.integration


async def _trial_with_points(conn: Any, n: int, spike_at: int | None = None) -> int:  # noqa: F811
    e, t = next(_ids), next(_ids)
    await project_batch(conn, "c", _items(_life(e, t)[:2]))
    points = [ev.MetricPoint(steps_completed=s, metrics={"loss": 100.0 if s == spike_at else 1.0 + math.sin(s / 50)})
              for s in range(1, n + 1)]
    batches = [ev.TrainingMetricsReported(experiment_id=e, trial_id=t, batch_id=str(i), points=points[i:i + 5000])
               for i in range(0, n, 5000)]
    await project_batch(conn, "m", _items(batches))
    return t


async def test_a_long_series_is_downsampled_keeping_its_extremes(conn: Any) -> None:  # noqa: F811
    t = await _trial_with_points(conn, 20_000, spike_at=12_345)
    got = await queries.series(conn, t, "training", "loss", 200)
    assert 100 <= len(got) <= 200
    steps = [p.step for p in got]
    assert steps == sorted(steps)
    values = [p.value for p in got]
    assert 100.0 in values and {p.step for p in got if p.value == 100.0} == {12_345}
    assert min(values) == pytest.approx(0.0, abs=1e-3)  # the troughs of the sine survive


async def test_a_short_series_comes_back_whole(conn: Any) -> None:  # noqa: F811
    t = await _trial_with_points(conn, 50)
    got = await queries.series(conn, t, "training", "loss", 200)
    assert [p.step for p in got] == list(range(1, 51))


async def test_trials_sort_by_best_metric_with_nulls_last_and_page(conn: Any) -> None:  # noqa: F811
    e = next(_ids)
    life = _life(e, next(_ids))
    events: list[Any] = [life[0]]
    bests = [0.3, None, 0.1, 0.2]
    trial_ids = [next(_ids) for _ in bests]
    for i, (tid, best) in enumerate(zip(trial_ids, bests, strict=True)):
        events.append(ev.TrialCreated(experiment_id=e, trial_id=tid, request_id=i, hparams={"i": i}, seed=i))
        if best is not None:
            events.append(ev.ValidationReported(experiment_id=e, trial_id=tid, steps_completed=1,
                                                metrics={"loss": best}))
    await project_batch(conn, "c", _items(events))
    await queries.init_connection(conn)  # as on the gateway's connections: jsonb comes back decoded
    rows = await queries.list_trials(conn, e, 10, 0, "best_metric", False)
    assert [r.best_metric for r in rows] == [0.1, 0.2, 0.3, None]
    page = await queries.list_trials(conn, e, 2, 1, "best_metric", True)
    assert [r.best_metric for r in page] == [0.2, 0.1]
