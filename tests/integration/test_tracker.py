"""The tracker's projection against a real Postgres, and through a real JetStream consumer."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from deploy import parts as p
from schemas import events as ev
from schemas import readmodel, subjects
from schemas.config import config_to_dict, parse_config
from services.runtime import BusSettings, ConsumerSpec, connect_bus
from services.tracker.main import handler_for
from services.tracker.projection import Item, project_batch
from tests.domain_stream import mixed_stream
from tests.integration.conftest import TEST_NATS_USERS

pytestmark = pytest.mark.integration

_ids = itertools.count(int(uuid.uuid4().int % 10_000) * 1000 + 1)

CONFIG = config_to_dict(parse_config(
    "name: t\nentrypoint: python3 train.py\nhyperparameters: {lr: 0.1}\n"
    "searcher: {name: single, metric: loss, max_length: {batches: 10}}\n"
)[0])


def _dsn(parts: p.RunningParts) -> str:
    cfg = parts.cfg
    return f"postgresql://{cfg.pg_user}:{cfg.pg_password}@{cfg.host}:{cfg.pg_port}/{cfg.pg_database}"


@pytest.fixture
async def conn(parts: p.RunningParts) -> AsyncIterator[Any]:
    """A connection to a freshly migrated schema of its own."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    c = await asyncpg.connect(_dsn(parts))
    await readmodel.migrate(c, schema)
    try:
        yield c
    finally:
        await c.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await c.close()


def _life(experiment_id: int, trial_id: int) -> list[Any]:
    """Every fact of a one-trial experiment, in stream order."""
    e, t = experiment_id, trial_id
    alloc = f"{t}.1"
    return [
        ev.ExperimentSubmitted(experiment_id=e, config=CONFIG, config_yaml="name: t", context_digest="sha256:x",
                               context_size=1, seed=7, submitted_at=1000.0),
        ev.TrialCreated(experiment_id=e, trial_id=t, request_id=0, hparams={"lr": 0.1}, seed=3),
        ev.AllocationAssigned(experiment_id=e, trial_id=t, allocation_id=alloc, worker_id="w0", slot_ids=["cpu0"]),
        ev.TrialStarted(experiment_id=e, trial_id=t, allocation_id=alloc, worker_id="w0", started_at=1001.0),
        ev.ValidationReported(experiment_id=e, trial_id=t, steps_completed=5, metrics={"loss": 0.5},
                              reported_at=1002.0),
        ev.ValidationReported(experiment_id=e, trial_id=t, steps_completed=10, metrics={"loss": 0.7},
                              reported_at=1003.0),
        ev.CheckpointStored(experiment_id=e, trial_id=t, uuid=f"ck-{t}", steps_completed=10, storage="s3://kiln/c",
                            resources={"model.pt": 10}, reported_at=1004.0),
        ev.AllocationExited(experiment_id=e, trial_id=t, allocation_id=alloc, worker_id="w0", exit_code=0,
                            exited_at=1005.0),
        ev.TrialExited(experiment_id=e, trial_id=t, state="COMPLETED", exit_code=0),
        ev.ExperimentEnded(experiment_id=e, state="COMPLETED"),
    ]


def _items(events: list[Any], first_seq: int = 1) -> list[Item]:
    return [Item(seq=first_seq + i, ts=2000.0 + i, event=e) for i, e in enumerate(events)]


async def _digest(conn: Any) -> str:
    """A digest over every projected table, to compare whole read models."""
    h = hashlib.sha256()
    for table, order in [("experiments", "id"), ("trials", "id"), ("allocations", "id"),
                         ("metric_points", "trial_id, kind, name, step"), ("metric_summaries", "trial_id, kind, name"),
                         ("checkpoints", "uuid"), ("models", "id"), ("model_versions", "model_id, version"),
                         ("trial_logs", "allocation_id, line_no"), ("projection_positions", "consumer")]:
        for row in await conn.fetch(f"SELECT * FROM {table} ORDER BY {order}"):
            h.update(repr(tuple(row.values())).encode())
    return h.hexdigest()


async def test_a_trial_life_projects_into_the_read_model(conn: Any) -> None:
    """Experiment, trial, allocation, metrics, best metric and checkpoint rows follow the events."""
    e, t = next(_ids), next(_ids)
    assert await project_batch(conn, "c", _items(_life(e, t))) == 10
    exp = await conn.fetchrow("SELECT state, progress, searcher_metric FROM experiments WHERE id = $1", e)
    assert (exp["state"], exp["progress"], exp["searcher_metric"]) == ("COMPLETED", 1.0, "loss")
    trial = await conn.fetchrow("SELECT * FROM trials WHERE id = $1", t)
    assert trial["state"] == "COMPLETED"
    assert trial["best_metric"] == 0.5  # smaller is better: the best, not the latest
    assert trial["steps_completed"] == 10
    assert trial["latest_checkpoint"] == f"ck-{t}"
    rows = await conn.fetch("SELECT step, value FROM metric_points WHERE trial_id = $1 AND kind = 'validation'"
                            " AND name = 'loss' ORDER BY step", t)
    assert [(r["step"], r["value"]) for r in rows] == [(5, 0.5), (10, 0.7)]
    alloc = await conn.fetchrow("SELECT exit_code, started_at FROM allocations WHERE id = $1", f"{t}.1")
    assert alloc["exit_code"] == 0 and alloc["started_at"] is not None
    assert await conn.fetchval("SELECT last_seq FROM projection_positions WHERE consumer = 'c'") == 10


async def test_redelivery_changes_nothing(conn: Any) -> None:
    """The same batch again, or an overlapping one, leaves the read model byte-identical."""
    e, t = next(_ids), next(_ids)
    items = _items(_life(e, t))
    await project_batch(conn, "c", items[:6])
    await project_batch(conn, "c", items)
    before = await _digest(conn)
    assert await project_batch(conn, "c", items) == 0
    assert await project_batch(conn, "c", items[3:8]) == 0
    assert await _digest(conn) == before


async def test_a_failing_batch_commits_nothing(conn: Any) -> None:
    """Rows and position are one transaction: a batch that fails half way leaves no trace."""
    e, t = next(_ids), next(_ids)
    life = _life(e, t)
    await project_batch(conn, "c", _items(life[:2]))
    before = await _digest(conn)
    orphan = ev.TrialCreated(experiment_id=next(_ids), trial_id=next(_ids), request_id=0, hparams={}, seed=1)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await project_batch(conn, "c", _items([life[2], orphan], first_seq=3))
    assert await _digest(conn) == before


async def test_training_points_redelivered_or_out_of_order_are_stored_once(conn: Any) -> None:
    """A point re-sent (restart, redelivery) replaces itself; order of arrival does not matter."""
    e, t = next(_ids), next(_ids)
    await project_batch(conn, "c", _items(_life(e, t)[:2]))

    def batch(batch_id: str, steps: list[int]) -> ev.TrainingMetricsReported:
        return ev.TrainingMetricsReported(experiment_id=e, trial_id=t, batch_id=batch_id, points=[
            ev.MetricPoint(steps_completed=s, metrics={"loss": 1.0 / s}, reported_at=1.0) for s in steps
        ])

    await project_batch(conn, "m", _items([batch("b2", [30, 40]), batch("b1", [10, 20])]))
    await project_batch(conn, "m", _items([batch("b1r", [20, 30])], first_seq=4))  # a restart re-reports
    rows = await conn.fetch("SELECT step, value, text_value FROM metric_points WHERE trial_id = $1"
                            " AND kind = 'training' ORDER BY name, step", t)
    assert [(r["step"], r["value"]) for r in rows if r["text_value"] is None] == \
        [(10, 0.1), (20, 0.05), (30, 1 / 30), (40, 0.025)]
    notes = [r for r in rows if r["text_value"] is not None]
    assert notes == [] and all(r["value"] is not None for r in rows)
    summary = await conn.fetchrow("SELECT * FROM metric_summaries WHERE trial_id = $1 AND name = 'loss'", t)
    # Out of order and re-sent: last is the highest step, min/max over everything.
    assert (summary["last_step"], summary["last_value"]) == (40, 0.025)
    assert (summary["min_value"], summary["max_value"]) == (0.025, 0.1)


async def test_non_finite_and_non_numeric_values_are_kept_explicitly(conn: Any) -> None:
    """NaN/inf become float8 NaN/Infinity (not dropped); strings are kept as text; NaN stays out of min/max."""
    e, t = next(_ids), next(_ids)
    await project_batch(conn, "c", _items(_life(e, t)[:2]))
    points = [ev.MetricPoint(steps_completed=s, metrics=m) for s, m in
              [(1, {"loss": 2.0, "phase": "warmup"}), (2, {"loss": "NaN"}), (3, {"loss": "Infinity"}),
               (4, {"loss": 0.5, "flag": True})]]
    await project_batch(conn, "m", _items([ev.TrainingMetricsReported(experiment_id=e, trial_id=t, batch_id="x",
                                                                      points=points)]))
    rows = {(r["name"], r["step"]): (r["value"], r["text_value"]) for r in
            await conn.fetch("SELECT name, step, value, text_value FROM metric_points WHERE trial_id = $1", t)}
    import math

    assert math.isnan(rows[("loss", 2)][0]) and rows[("loss", 3)][0] == math.inf
    assert rows[("phase", 1)] == (None, "warmup") and rows[("flag", 4)] == (1.0, None)
    summary = await conn.fetchrow("SELECT * FROM metric_summaries WHERE trial_id = $1 AND name = 'loss'", t)
    assert (summary["last_step"], summary["last_value"], summary["min_value"]) == (4, 0.5, 0.5)
    assert summary["max_value"] == math.inf


async def test_tracker_consumes_the_real_stream_and_dead_letters_poison(parts: p.RunningParts) -> None:
    """Through JetStream: good events land in Postgres, a poison message goes to the dead-letter stream."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    e, t = next(_ids), next(_ids)
    user, password = next(iter(TEST_NATS_USERS.items()))
    settings = BusSettings(nats_url=parts.nats_url, nats_user=user, nats_password=password)
    durable = f"tracker-test-{schema}"
    spec = ConsumerSpec(durable=durable, stream=subjects.EVENTS, filter_subjects=[f"kiln.events.{e}.>"],
                        backoff_s=(0.1, 0.2), max_deliver=3)
    async with asyncpg.create_pool(_dsn(parts), min_size=1, max_size=2,
                                   server_settings={"search_path": schema}) as pool:
        async with pool.acquire() as c:
            await readmodel.migrate(c, schema)
        async with connect_bus(settings, "test") as bus:
            life = _life(e, t)
            for event in life[:3]:
                await bus.publish(event)
            await bus.js.publish(f"kiln.events.{e}.experiment", b"\x00garbage", headers={"Nats-Msg-Id": durable})
            for event in life[3:]:
                await bus.publish(event)
            import msgspec

            stop = asyncio.Event()
            task = asyncio.create_task(bus.consume(spec, msgspec.json.Decoder(ev.DomainEvent),
                                                   handler_for(pool, durable), stop, batch=4))
            async with pool.acquire() as c:
                for _ in range(100):
                    state = await c.fetchval("SELECT state FROM experiments WHERE id = $1", e)
                    if state == "COMPLETED":
                        break
                    await asyncio.sleep(0.1)
                assert state == "COMPLETED"
                assert await c.fetchval("SELECT state FROM trials WHERE id = $1", t) == "COMPLETED"
            stop.set()
            await task
            sub = await bus.js.subscribe(subjects.deadletter_subject(durable), ordered_consumer=True)
            letter = msgspec.json.decode((await sub.next_msg(timeout=5)).data, type=ev.MessageDeadLettered)
            assert letter.payload == b"\x00garbage" and "undecodable" in letter.error
        async with pool.acquire() as c:
            await c.execute(f'DROP SCHEMA "{schema}" CASCADE')


async def test_the_read_model_does_not_depend_on_where_batches_begin_and_end(parts: p.RunningParts) -> None:
    """Replay (2,000-event batches) and the live tracker (256, or whatever arrived) must write the same rows:
    a mixed stream projected in one batch equals the same stream cut at random points."""
    rng = random.Random(7)
    stream = _items(mixed_stream(rng, [next(_ids), next(_ids)], trials=40, ids=_ids))
    digests = []
    c = await asyncpg.connect(_dsn(parts))
    try:
        for cuts in ([len(stream)], [1] * 50 + [len(stream)], [len(stream) - 1, 1],
                     [rng.randint(1, 40) for _ in range(len(stream))]):
            schema = f"t_{uuid.uuid4().hex[:12]}"
            await readmodel.migrate(c, schema)
            start = 0
            for size in cuts:
                if start >= len(stream):
                    break
                assert await project_batch(c, "c", stream[start:start + size]) == min(size, len(stream) - start)
                start += size
            assert await project_batch(c, "c", stream) == 0  # all of it again: a redelivery changes nothing
            digests.append(await _digest(c))
            await c.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await c.execute("SET search_path TO public")
    finally:
        await c.close()
    assert len(set(digests)) == 1


async def test_a_deleted_experiment_leaves_the_read_model_and_late_reports_add_nothing_back(conn: Any) -> None:
    """ExperimentDeleted drops the experiment with its trial, allocation, checkpoint, points and logs; metric and
    log batches projected after it (a lagging metrics consumer, or a replay that folds the events stream first)
    add nothing back, and a neighbour experiment is untouched."""
    e, t, keep_e, keep_t = next(_ids), next(_ids), next(_ids), next(_ids)
    alloc = f"{t}.1"
    await project_batch(conn, "c", _items([*_life(e, t), *_life(keep_e, keep_t)]))
    before_neighbour = await conn.fetch("SELECT * FROM metric_points WHERE trial_id = $1 ORDER BY step", keep_t)
    await project_batch(conn, "c", _items([ev.ExperimentDeleted(experiment_id=e, deleted_by="alice")], 21))
    late_points = ev.TrainingMetricsReported(experiment_id=e, trial_id=t, batch_id="b1", points=[
        ev.MetricPoint(steps_completed=3, metrics={"loss": 0.9}, reported_at=1001.5)])
    late_logs = ev.LogsShipped(experiment_id=e, trial_id=t, allocation_id=alloc,
                               lines=[ev.LogLine(line_no=1, stream="stdout", ts=1001.5, text="late")])
    neighbour = ev.TrainingMetricsReported(experiment_id=keep_e, trial_id=keep_t, batch_id="b2", points=[
        ev.MetricPoint(steps_completed=4, metrics={"loss": 0.4}, reported_at=1001.5)])
    assert await project_batch(conn, "metrics", _items([late_points, neighbour])) == 2
    assert await project_batch(conn, "logs", _items([late_logs])) == 1
    for table, column in [("experiments", "id"), ("trials", "experiment_id"), ("allocations", "experiment_id"),
                          ("checkpoints", "experiment_id")]:
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", e) == 0, table
    for table in ("metric_points", "metric_summaries", "trial_logs"):
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE trial_id = $1", t) == 0, table
    gone = await conn.fetchrow("SELECT deleted_by FROM deleted_experiments WHERE id = $1", e)
    assert gone["deleted_by"] == "alice"
    assert await conn.fetchval("SELECT experiment_id FROM deleted_trials WHERE trial_id = $1", t) == e
    after_neighbour = await conn.fetch("SELECT * FROM metric_points WHERE trial_id = $1 AND step <> 4 ORDER BY step",
                                       keep_t)
    assert after_neighbour == before_neighbour
    assert await conn.fetchval("SELECT value FROM metric_points WHERE trial_id = $1 AND step = 4", keep_t) == 0.4
    assert await conn.fetchval("SELECT count(*) FROM experiments WHERE id = $1", keep_e) == 1


async def test_summaries_of_a_re_reported_step_do_not_depend_on_where_batches_end(conn: Any) -> None:
    """A resumed run re-reports a step with another value: min and max count both values and the last value is
    the later one, whether the two reports share a batch (the live tracker) or not (a replay's other batching)."""
    e, t = next(_ids), next(_ids)
    head = _life(e, t)[:2]
    reports = [ev.TrainingMetricsReported(experiment_id=e, trial_id=t, batch_id=f"b{i}", points=[
        ev.MetricPoint(steps_completed=5, metrics={"loss": value}, reported_at=1000.0 + i)])
        for i, value in enumerate([0.2, 0.9, 0.5])]
    await project_batch(conn, "events", _items(head))
    await project_batch(conn, "together", _items(reports))
    together = await conn.fetchrow("SELECT last_value, min_value, max_value FROM metric_summaries"
                                   " WHERE trial_id = $1", t)
    await conn.execute("DELETE FROM metric_summaries WHERE trial_id = $1", t)
    await conn.execute("DELETE FROM metric_points WHERE trial_id = $1", t)
    for i, item in enumerate(_items(reports)):
        await project_batch(conn, f"apart{i}", [item])
    apart = await conn.fetchrow("SELECT last_value, min_value, max_value FROM metric_summaries WHERE trial_id = $1",
                                t)
    assert tuple(apart) == tuple(together) == (0.5, 0.2, 0.9)
