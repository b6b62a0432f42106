"""The next batch fetched, decoded and folded while the handler applies this one (``Bus.consume(prefetch=)``).

A head start only: every message is still applied exactly once, in stream order, after the one before was
acked; a batch that takes longer than half the ack wait drops the head start and rebinds at the position; the
tracker's metrics projection folded ahead gives the same read model as one folded in its transaction, through a
Postgres kill.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import msgspec
import pytest

from deploy import parts as p
from schemas import events as ev
from schemas import readmodel, subjects
from services.runtime import ConsumerSpec, Delivery, Transient, connect_bus
from services.tracker.main import Ahead, handler_for, position_of
from tests.integration.test_positions import (
    N,
    Store,
    _dead_letters,
    _exp,
    _kill_postgres,
    _live_and_in_one_go,
    _publish,
    _settings,
    _spec,
    _wait,
)
from tests.integration.test_tracker import _dsn

pytestmark = pytest.mark.integration


async def test_with_prefetch_every_message_is_applied_once_in_order_through_a_transient_failure(
        parts: p.RunningParts) -> None:
    e = _exp()
    store = Store()
    ahead_of: list[list[int]] = []  # the batches the hook saw, before their handler ran
    handled: list[list[int]] = []
    failures = 0

    async def flaky(batch: list[Delivery[Any]]) -> None:
        nonlocal failures
        if any(d.event.trial_id % 1000 == 7 for d in batch) and failures < 3:
            failures += 1
            raise Transient("database restarting")
        handled.append([d.seq for d in batch])
        store.apply(batch)

    async with connect_bus(_settings(parts), "test") as bus:
        await _publish(bus, e)
        stop = asyncio.Event()
        spec = _spec(e, max_deliver=2, backoff_s=(0.05,))
        task = asyncio.create_task(bus.consume(spec, msgspec.json.Decoder(ev.DomainEvent), flaky, stop, batch=3,
                                               position=store.position,
                                               prefetch=lambda b: ahead_of.append([d.seq for d in b])))
        await _wait(lambda: len(store.applied) >= N)
        stop.set()
        await task
        assert failures == 3
        assert store.applied == list(range(N))
        assert await _dead_letters(bus, spec.durable) == []
        info = await bus.js.consumer_info(subjects.EVENTS.name, spec.durable)
        assert info.num_ack_pending == 0 and info.num_pending == 0
    # Batches after the first were fetched ahead: the hook saw them before the handler did.
    assert len(ahead_of) >= len(handled) - 1 >= 1
    assert all(batch in ahead_of for batch in handled[1:])


async def test_a_batch_slower_than_half_the_ack_wait_drops_the_head_start_and_loses_nothing(
        parts: p.RunningParts) -> None:
    e = _exp()
    store = Store()
    slowed = False

    async def slow_once(batch: list[Delivery[Any]]) -> None:
        nonlocal slowed
        if not slowed and any(d.event.trial_id % 1000 == 4 for d in batch):
            slowed = True
            await asyncio.sleep(1.6)  # past half of the 3 s ack wait
        store.apply(batch)

    async with connect_bus(_settings(parts), "test") as bus:
        await _publish(bus, e)
        stop = asyncio.Event()
        spec = _spec(e, ack_wait_s=3.0)
        task = asyncio.create_task(bus.consume(spec, msgspec.json.Decoder(ev.DomainEvent), slow_once, stop,
                                               batch=2, position=store.position, prefetch=lambda b: None))
        await _wait(lambda: len(store.applied) >= N)
        await asyncio.sleep(0.5)  # nothing more arrives
        stop.set()
        await task
    assert slowed and store.applied == list(range(N))


def _metrics(e: int, trial: int, batches: int) -> list[ev.TrainingMetricsReported]:
    return [ev.TrainingMetricsReported(
        experiment_id=e, trial_id=trial, batch_id=f"{trial}.1:{b}",
        points=[ev.MetricPoint(steps_completed=b * 50 + s, metrics={"loss": 1.0 / (1 + b * 50 + s), "lr": 0.1},
                               reported_at=1000.0 + b * 50 + s) for s in range(50)]) for b in range(batches)]


async def test_metrics_folded_ahead_give_the_same_read_model_through_a_postgres_kill(parts: p.RunningParts) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    e = _exp()
    trials = [e * 10 + i for i in range(3)]
    durable = f"tracker-ahead-{schema}"
    spec = ConsumerSpec(durable=durable, stream=subjects.METRICS, filter_subjects=[f"kiln.metrics.{e}.>"])
    seqs: list[int] = []
    ahead = Ahead()
    async with connect_bus(_settings(parts), "test") as bus:
        pool = await asyncpg.create_pool(_dsn(parts), min_size=1, max_size=2, server_settings={"search_path": schema})
        stop = asyncio.Event()
        try:
            async with pool.acquire() as c:
                await readmodel.migrate(c, schema)
            for t in trials[:2]:
                seqs += [await bus.publish(m) for m in _metrics(e, t, 6)]
            task = asyncio.create_task(bus.consume(spec, msgspec.json.Decoder(ev.MetricEvent),
                                                   handler_for(pool, durable, ahead), stop, batch=4,
                                                   position=position_of(pool, durable), prefetch=ahead.prefetch))
            await asyncio.sleep(1.0)
            _kill_postgres(parts)
            seqs += [await bus.publish(m) for m in _metrics(e, trials[2], 6)]
            await asyncio.sleep(3.0)  # the tracker fails against a dead database meanwhile
            parts.postgres = p.start_postgres(parts.cfg)
            live, ref, points = await _live_and_in_one_go(parts, bus, schema, durable, seqs, subjects.METRICS,
                                                          f"kiln.metrics.{e}.>", msgspec.json.Decoder(ev.MetricEvent))
            stop.set()
            await task
            assert points == 3 * 6 * 50 * 2
            assert ahead.used >= 1  # batches were applied from what was folded ahead
            assert live == ref
            assert await _dead_letters(bus, durable) == []
        finally:
            stop.set()
            await pool.close()
