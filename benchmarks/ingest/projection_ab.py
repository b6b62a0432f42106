"""A/B of the tracker's projection, no NATS: today's ``project_batch`` against a proposed projector.

Both fold the very same ``Item``s (the ingest workload's metric batches, and a 1,000-trial experiment's
domain events) into fresh schemas of one Postgres, one connection, in chunks of a given size (256: the
tracker's fetch; 2,000: replay's batch). Repetitions interleave the variants; medians are reported, and
every table's digest is compared between the variants so the proposal is shown to write the same rows.

The proposal (not applied to services/; this file only measures it):

* metrics: COPY the batch's rows straight into ``metric_points`` inside a savepoint and fold the
  per-metric summaries in Python (last/min/max of the rows already in memory), upserting a few hundred
  summary rows with one ``unnest`` statement. Only when the COPY hits a duplicate key (a restarted trial
  re-reporting a step) does it roll back to the savepoint and take today's staging-table upsert path.
* domain events: consecutive statements with the same SQL text are sent as one ``executemany``
  (asyncpg pipelines it) instead of one round trip each; any read flushes what is pending first, so the
  statements run in exactly the same order as today.

Usage: .venv/bin/python benchmarks/ingest/projection_ab.py [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench_run  # noqa: E402  (also puts the repo on sys.path)
import workload  # noqa: E402
from schemas import events as ev  # noqa: E402
from schemas import readmodel  # noqa: E402
from services.tracker import projection as pj  # noqa: E402
from services.tracker.replay import digests  # noqa: E402

_SUMMARY_UPSERT = (
    "INSERT INTO metric_summaries (trial_id, kind, name, last_step, last_value, min_value, max_value)"
    " SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::float8[], $6::float8[],"
    " $7::float8[])"
    " ON CONFLICT (trial_id, kind, name) DO UPDATE SET"
    " last_value = CASE WHEN EXCLUDED.last_step >= metric_summaries.last_step"
    " THEN EXCLUDED.last_value ELSE metric_summaries.last_value END,"
    " last_step = GREATEST(metric_summaries.last_step, EXCLUDED.last_step),"
    " min_value = LEAST(metric_summaries.min_value, EXCLUDED.min_value),"
    " max_value = GREATEST(metric_summaries.max_value, EXCLUDED.max_value)"
)


class _BatchingConn:
    """Stands in for the connection inside the projector: ``execute`` calls with the same SQL as the
    previous one are queued and sent together with ``executemany``; anything else flushes first."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._sql: str | None = None
        self._args: list[tuple[Any, ...]] = []

    async def execute(self, sql: str, *args: Any) -> None:
        if sql != self._sql:
            await self.flush()
            self._sql = sql
        self._args.append(args)

    async def flush(self) -> None:
        if self._sql is not None and self._args:
            if len(self._args) == 1:
                await self._conn.execute(self._sql, *self._args[0])
            else:
                await self._conn.executemany(self._sql, self._args)
        self._sql, self._args = None, []

    async def fetchrow(self, *a: Any, **k: Any) -> Any:
        await self.flush()
        return await self._conn.fetchrow(*a, **k)

    async def executemany(self, *a: Any, **k: Any) -> Any:
        await self.flush()
        return await self._conn.executemany(*a, **k)

    async def copy_records_to_table(self, *a: Any, **k: Any) -> Any:
        await self.flush()
        return await self._conn.copy_records_to_table(*a, **k)

    def transaction(self) -> Any:
        return self._conn.transaction()


class ProposedProjector(pj._Projector):
    """Today's projector with the two changes described in the module docstring."""

    def __init__(self, conn: Any) -> None:
        self.real = conn
        self.batching = _BatchingConn(conn)
        super().__init__(self.batching)

    async def flush(self) -> None:
        await self.batching.flush()
        await super().flush()
        await self.batching.flush()

    async def _flush_points(self) -> None:
        rows = list(self.metric_rows.values())
        try:
            async with self.real.transaction():  # a savepoint inside project_batch's transaction
                await self.real.copy_records_to_table("metric_points", records=rows, columns=pj._POINT_COLUMNS)
        except asyncpg.UniqueViolationError:
            await super()._flush_points()  # a step reported again: today's staging + upsert path
            return
        summary: dict[tuple[int, str, str], list[Any]] = {}
        for trial_id, kind, name, step, value, _text, _at in rows:
            s = summary.get((trial_id, kind, name))
            finite_or_inf = value if value is not None and not math.isnan(value) else None
            if s is None:
                summary[(trial_id, kind, name)] = [step, value, finite_or_inf, finite_or_inf]
                continue
            if step > s[0]:
                s[0], s[1] = step, value
            if finite_or_inf is not None:
                s[2] = finite_or_inf if s[2] is None else min(s[2], finite_or_inf)
                s[3] = finite_or_inf if s[3] is None else max(s[3], finite_or_inf)
        cols: list[list[Any]] = [[], [], [], [], [], [], []]
        for (trial_id, kind, name), (step, last, lo, hi) in summary.items():
            for col, v in zip(cols, (trial_id, kind, name, step, last, lo, hi), strict=True):
                col.append(v)
        await self.real.execute(_SUMMARY_UPSERT, *cols)


TIMES: dict[str, float] = {}


class TimedProjector(pj._Projector):
    """Today's projector, each statement of the metric flush timed (the SQL is today's, verbatim)."""

    async def apply(self, item: pj.Item) -> None:
        t0 = time.perf_counter()
        await super().apply(item)
        TIMES["python: decode-side folding (apply)"] = TIMES.get("python: decode-side folding (apply)", 0.0) + (
            time.perf_counter() - t0)

    async def _flush_points(self) -> None:
        c = self.conn
        steps: list[tuple[str, Any]] = [
            ("CREATE TEMP TABLE IF NOT EXISTS", lambda: c.execute(
                "CREATE TEMP TABLE IF NOT EXISTS metric_staging (LIKE metric_points) ON COMMIT DELETE ROWS")),
            ("COPY into the temp staging table", lambda: c.copy_records_to_table(
                "metric_staging", records=list(self.metric_rows.values()), columns=pj._POINT_COLUMNS)),
            ("INSERT … ON CONFLICT DO UPDATE into metric_points", lambda: c.execute(
                "INSERT INTO metric_points SELECT * FROM metric_staging"
                " ON CONFLICT (trial_id, kind, name, step) DO UPDATE SET value = EXCLUDED.value,"
                " text_value = EXCLUDED.text_value, reported_at = EXCLUDED.reported_at")),
            ("summary fold (window + upsert)", lambda: c.execute(
                "INSERT INTO metric_summaries (trial_id, kind, name, last_step, last_value, min_value, max_value)"
                " SELECT DISTINCT ON (trial_id, kind, name) trial_id, kind, name, step, value,"
                " min(value) FILTER (WHERE value <> 'NaN') OVER w, max(value) FILTER (WHERE value <> 'NaN') OVER w"
                " FROM metric_staging WINDOW w AS (PARTITION BY trial_id, kind, name)"
                " ORDER BY trial_id, kind, name, step DESC"
                " ON CONFLICT (trial_id, kind, name) DO UPDATE SET"
                " last_value = CASE WHEN EXCLUDED.last_step >= metric_summaries.last_step"
                " THEN EXCLUDED.last_value ELSE metric_summaries.last_value END,"
                " last_step = GREATEST(metric_summaries.last_step, EXCLUDED.last_step),"
                " min_value = LEAST(metric_summaries.min_value, EXCLUDED.min_value),"
                " max_value = GREATEST(metric_summaries.max_value, EXCLUDED.max_value)")),
        ]
        for name, step in steps:
            t0 = time.perf_counter()
            await step()
            TIMES[name] = TIMES.get(name, 0.0) + time.perf_counter() - t0


async def project_batch_with(conn: Any, consumer: str, items: list[pj.Item], cls: type) -> int:
    """``project_batch`` with another projector class (same position bookkeeping)."""
    async with conn.transaction():
        row = await conn.fetchrow("SELECT last_seq FROM projection_positions WHERE consumer = $1 FOR UPDATE", consumer)
        last = row["last_seq"] if row else 0
        fresh = [i for i in items if i.seq > last]
        if not fresh:
            return 0
        projector = cls(conn)
        for item in fresh:
            await projector.apply(item)
        await projector.flush()
        await conn.execute(
            "INSERT INTO projection_positions (consumer, last_seq) VALUES ($1, $2)"
            " ON CONFLICT (consumer) DO UPDATE SET last_seq = EXCLUDED.last_seq", consumer, max(i.seq for i in fresh))
        return len(fresh)


def metric_items(trials: int, batches: int, steps: int) -> list[pj.Item]:
    """The ingest workload's metric batches in stream order (batch-major, like concurrent trials)."""
    events = {i: bench_run.metric_events(1, 1000 + i, i, batches, steps) for i in range(trials)}
    items = []
    for b in range(batches):
        for i in range(trials):
            items.append(pj.Item(seq=len(items) + 1, ts=workload.T0 + len(items), event=events[i][b]))
    return items


def domain_items(trials: int, validations: int) -> list[pj.Item]:
    """ExperimentSubmitted, a TrialCreated per trial, then the validations, round-robin over trials."""
    rng = random.Random(7)
    config = {"name": "ab", "searcher": {"name": "random", "metric": "val_loss", "smaller_is_better": True}}
    evs: list[Any] = [ev.ExperimentSubmitted(experiment_id=1, config=config, config_yaml="", context_digest="0" * 64,
                                             context_size=0, seed=1, submitted_at=workload.T0)]
    evs += [ev.TrialCreated(experiment_id=1, trial_id=t, request_id=t, hparams={"lr": rng.random()}, seed=t)
            for t in range(1, trials + 1)]
    base = {t: rng.uniform(0.2, 1.0) for t in range(1, trials + 1)}
    for v in range(validations):
        evs += [ev.ValidationReported(experiment_id=1, trial_id=t, steps_completed=100 * (v + 1),
                                      metrics={"val_loss": base[t] * 0.9 ** v, "val_acc": 1 - base[t] * 0.9 ** v / 2},
                                      reported_at=workload.T0 + v) for t in range(1, trials + 1)]
    return [pj.Item(seq=k + 1, ts=workload.T0 + k, event=e) for k, e in enumerate(evs)]


async def one(conn: Any, schema: str, items: list[pj.Item], chunk: int, proposed: bool | type,
              ) -> tuple[float, dict[str, str]]:
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await readmodel.migrate(conn, schema)
    await conn.execute(f'SET search_path TO "{schema}"')
    t0 = time.perf_counter()
    for k in range(0, len(items), chunk):
        part = items[k:k + chunk]
        if proposed is True:
            await project_batch_with(conn, "ab", part, ProposedProjector)
        elif proposed is False:
            await pj.project_batch(conn, "ab", part)
        else:
            await project_batch_with(conn, "ab", part, proposed)
    seconds = time.perf_counter() - t0
    await conn.execute("SET search_path TO public")
    d = await digests(conn, schema)
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return seconds, d


# Proposed series SQL: the step range from one aggregate, then one hash aggregate per bucket whose
# min(ARRAY[value, step]) / max(ARRAY[value, -step]) pick the same (step, value) as today's two
# DISTINCT ON sorts (lowest value, earliest step; highest value, earliest step; NaN sorts highest in both).
SERIES_PROPOSED = (
    "WITH s AS (SELECT count(*) AS n, min(step) AS lo, max(step) AS hi FROM metric_points"
    "           WHERE trial_id = $1 AND kind = $2 AND name = $3 AND value IS NOT NULL),"
    " b AS (SELECT CASE WHEN s.n <= $4 THEN p.step"
    "                   ELSE ((p.step - s.lo) * $5) / GREATEST(s.hi - s.lo + 1, 1) END AS bucket,"
    "              min(ARRAY[p.value, p.step::float8]) AS lo, max(ARRAY[p.value, -p.step::float8]) AS hi"
    "       FROM metric_points p, s WHERE p.trial_id = $1 AND p.kind = $2 AND p.name = $3 AND p.value IS NOT NULL"
    "       GROUP BY 1)"
    " SELECT lo[2]::bigint AS step, lo[1] AS value FROM b UNION SELECT (-hi[2])::bigint, hi[1] FROM b ORDER BY step"
)


async def series_ab(conn: Any, args: argparse.Namespace) -> dict[str, list[float]]:
    """Today's ``queries.series`` against SERIES_PROPOSED on a 100k-point series among other trials' points."""
    from services.gateway import queries

    await conn.execute('DROP SCHEMA IF EXISTS "ab_series" CASCADE')
    await readmodel.migrate(conn, "ab_series")
    await conn.execute('SET search_path TO "ab_series"')
    # The series (trial 1) among 2M other points (trials 2..41), with a few NaNs, as in a live table.
    await conn.execute(
        "INSERT INTO metric_points SELECT t, 'training', 'loss', s,"
        " CASE WHEN s % 9973 = 0 THEN 'NaN'::float8 ELSE exp(-s / 4000.0) + random() * 0.05 END, NULL, now()"
        " FROM generate_series(1, 41) t, generate_series(0, $1 - 1) s WHERE t = 1 OR s < 50000", args.series_points)
    await conn.execute("VACUUM ANALYZE metric_points")
    out: dict[str, list[float]] = {"today (queries.series)": [], "proposed (one hash aggregate)": []}
    buckets = 500
    for k in range(args.query_calls + 3):
        for name in (list(out) if k % 2 == 0 else list(out)[::-1]):
            t0 = time.perf_counter()
            if name.startswith("today"):
                rows = await queries.series(conn, 1, "training", "loss", 1000)
                today = rows
            else:
                rows = [dict(r) for r in await conn.fetch(SERIES_PROPOSED, 1, "training", "loss", 1000, buckets)]
                proposed = rows
            if k >= 3:
                out[name].append(time.perf_counter() - t0)
        if k == 0 and [(r["step"], repr(r["value"])) for r in today] != [(r["step"], repr(r["value"])) for r in proposed]:
            raise RuntimeError("proposed series SQL returns different rows")
    await conn.execute("SET search_path TO public")
    await conn.execute('DROP SCHEMA "ab_series" CASCADE')
    return out


async def main_async(bench: bench_run.Bench, args: argparse.Namespace) -> None:
    metrics = metric_items(args.trials, args.batches, 500)
    points = workload.total_points(args.trials, args.batches, 500)
    domain = domain_items(args.summary_trials, args.validations)
    cases = [("metrics", metrics, 256), ("metrics", metrics, 2000), ("domain", domain, 2000)]
    times: dict[tuple[str, int, bool], list[float]] = {}
    conn = await asyncpg.connect(bench.dsn)
    try:
        for rep in range(args.reps):
            for name, items, chunk in cases:
                got = {}
                for proposed in ((False, True) if rep % 2 == 0 else (True, False)):
                    s, d = await one(conn, f"ab_{name}_{int(proposed)}", items, chunk, proposed)
                    times.setdefault((name, chunk, proposed), []).append(s)
                    got[proposed] = d
                differs = [t for t in got[False] if got[False][t] != got[True][t]]
                if differs:
                    raise RuntimeError(f"{name}@{chunk}: proposed projector writes different {differs}")
            print(f"rep {rep} done", flush=True)
        # Where today's time goes, metrics at the tracker's chunk of 256 messages.
        TIMES.clear()
        total, _ = await one(conn, "ab_breakdown", metrics, 256, TimedProjector)
        series = await series_ab(conn, args)
    finally:
        await conn.close()
    print(f"| workload | chunk (items per transaction) | today, items/s | proposed, items/s | gain |")
    print("|---|---|---|---|---|")
    for name, items, chunk in cases:
        a, b = times[(name, chunk, False)], times[(name, chunk, True)]
        unit = f"{points:,} points in {len(items):,} messages" if name == "metrics" else f"{len(items):,} domain events"
        per = points if name == "metrics" else len(items)
        ua = "points/s" if name == "metrics" else "events/s"

        def rate(ts: list[float]) -> str:
            return bench_run.med_range([per / t for t in ts])

        gain = [x / y for x, y in zip(a, b, strict=True)]
        print(f"| {unit} | {chunk} | {rate(a)} {ua} | {rate(b)} {ua} | {bench_run.med_range(gain, '{:.2f}×')} |")
    print("digests of every table equal between today and proposed: yes")
    print()
    print(f"today's projection of {points:,} points in chunks of 256 messages: {total:.2f} s")
    print("| part | seconds | share |")
    print("|---|---|---|")
    for name, sec in TIMES.items():
        print(f"| {name} | {sec:.2f} | {sec / total * 100:.0f} % |")
    rest = total - sum(TIMES.values())
    print(f"| the rest (position row, transaction, Python glue) | {rest:.2f} | {rest / total * 100:.0f} % |")
    print()
    print(f"series of {args.series_points:,} points → 1,000, SQL alone, {args.query_calls} calls each, interleaved:")
    print("| query | p50 ms | p95 ms |")
    print("|---|---|---|")
    for name, ts in series.items():
        print(f"| {name} | {bench_run.pct(ts, 0.5) * 1000:.1f} | {bench_run.pct(ts, 0.95) * 1000:.1f} |")
    print("same rows from both: yes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--summary-trials", type=int, default=1000)
    parser.add_argument("--validations", type=int, default=10)
    parser.add_argument("--series-points", type=int, default=100_000)
    parser.add_argument("--query-calls", type=int, default=30)
    args = parser.parse_args()
    ns = argparse.Namespace(keep_state=False, profile="", mlflow_python="", mlflow_workers=0)
    bench = bench_run.Bench(ns)
    try:
        bench.up()
        asyncio.run(main_async(bench, args))
    finally:
        bench.down()


if __name__ == "__main__":
    main()
