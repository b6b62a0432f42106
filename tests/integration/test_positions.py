"""Positions never pass an unapplied message: consumers against a real JetStream (and a real Postgres going away).

Each test injects one failure at one step — a crash between fetch and apply, a transient error in the middle
of a batch, a handler bug, PostgreSQL killed while the tracker projects — and checks that every message is
applied exactly once, in stream order, and that only the deterministic failure is dead-lettered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from typing import Any

import asyncpg
import msgspec
import pytest

from deploy import parts as p
from schemas import events as ev
from schemas import readmodel, subjects
from services.runtime import Bus, BusSettings, ConsumerSpec, Delivery, Transient, connect_bus
from services.tracker.main import handler_for, position_of
from services.tracker.projection import Item, project_batch
from tests.integration.conftest import TEST_NATS_USERS
from tests.integration.test_tracker import _digest, _dsn, _life

pytestmark = pytest.mark.integration

N = 20


def _settings(parts: p.RunningParts) -> BusSettings:
    user, password = next(iter(TEST_NATS_USERS.items()))
    return BusSettings(nats_url=parts.nats_url, nats_user=user, nats_password=password)


def _exp() -> int:
    return 100_000 + uuid.uuid4().int % 400_000


class Store:
    """An in-memory projection with a position, applied exactly like the tracker: skip seq <= position."""

    def __init__(self) -> None:
        self.applied: list[int] = []  # trial ids, in the order applied
        self.last_seq = 0

    async def position(self) -> int:
        return self.last_seq

    def apply(self, batch: list[Delivery[Any]]) -> None:
        for d in batch:
            if d.seq > self.last_seq:
                self.applied.append(d.event.trial_id % 1000)
                self.last_seq = d.seq


async def _publish(bus: Bus, e: int, n: int = N) -> None:
    for t in range(n):
        # Trial ids are unique across experiments (the dedupe key relies on it): offset them per experiment.
        await bus.publish(ev.TrialStopRequested(experiment_id=e, trial_id=e * 1000 + t))


async def _wait(cond: Any, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def _spec(e: int, **kw: Any) -> ConsumerSpec:
    return ConsumerSpec(durable=f"pos-{e}", stream=subjects.EVENTS, filter_subjects=[f"kiln.events.{e}.>"], **kw)


async def _dead_letters(bus: Bus, durable: str) -> list[ev.MessageDeadLettered]:
    try:
        info = await bus.js.stream_info(subjects.DEADLETTER.name, subjects_filter=subjects.deadletter_subject(durable))
    except Exception:  # noqa: BLE001
        return []
    count = sum((info.state.subjects or {}).values())
    if not count:
        return []
    sub = await bus.js.subscribe(subjects.deadletter_subject(durable), ordered_consumer=True)
    out = [msgspec.json.decode((await sub.next_msg(timeout=5)).data, type=ev.MessageDeadLettered) for _ in range(count)]
    await sub.unsubscribe()
    return out


async def test_a_consumer_that_dies_between_fetch_and_apply_resumes_at_its_position(parts: p.RunningParts) -> None:
    """Killed holding fetched, unapplied messages: the next process starts right after the applied position,
    not after what the server handed out (which would wait out the ack timeout and arrive after newer ones)."""
    e = _exp()
    store = Store()
    hang = asyncio.Event()

    async def first(batch: list[Delivery[Any]]) -> None:
        if any(d.event.trial_id % 1000 == 7 for d in batch):
            hang.set()
            await asyncio.Event().wait()  # the process dies here, holding 5..9 unacked
        store.apply(batch)

    async with connect_bus(_settings(parts), "test") as bus:
        await _publish(bus, e)
        task = asyncio.create_task(bus.consume(_spec(e), msgspec.json.Decoder(ev.DomainEvent), first,
                                               asyncio.Event(), batch=5, position=store.position))
        await asyncio.wait_for(hang.wait(), 20)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert store.applied == [0, 1, 2, 3, 4]

        async def second(batch: list[Delivery[Any]]) -> None:
            store.apply(batch)

        stop = asyncio.Event()
        task = asyncio.create_task(bus.consume(_spec(e), msgspec.json.Decoder(ev.DomainEvent), second, stop,
                                               batch=5, position=store.position))
        await _wait(lambda: len(store.applied) >= N, timeout=20)
        stop.set()
        await task
    assert store.applied == list(range(N))


async def test_a_transient_failure_holds_the_consumer_until_it_passes(parts: p.RunningParts) -> None:
    """A store that is away for a while (more tries than max_deliver): nothing newer is applied first,
    nothing is skipped, nothing is dead-lettered."""
    e = _exp()
    store = Store()
    failures = 0

    async def flaky(batch: list[Delivery[Any]]) -> None:
        nonlocal failures
        if any(d.event.trial_id % 1000 == 7 for d in batch) and failures < 4:
            failures += 1
            raise Transient("database restarting")
        store.apply(batch)

    async with connect_bus(_settings(parts), "test") as bus:
        await _publish(bus, e)
        stop = asyncio.Event()
        spec = _spec(e, max_deliver=3, backoff_s=(0.05,))
        task = asyncio.create_task(bus.consume(spec, msgspec.json.Decoder(ev.DomainEvent), flaky, stop,
                                               batch=5, position=store.position))
        await _wait(lambda: len(store.applied) >= N)
        stop.set()
        await task
        assert failures == 4
        assert store.applied == list(range(N))
        assert await _dead_letters(bus, spec.durable) == []
        info = await bus.js.consumer_info(subjects.EVENTS.name, spec.durable)
        assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_handler_bug_is_dead_lettered_with_its_reason_and_the_rest_applied_in_order(
    parts: p.RunningParts,
) -> None:
    """A deterministic failure is tried max_deliver times, dead-lettered, and the batch around it applied."""
    e = _exp()
    store = Store()
    attempts = 0

    async def buggy(batch: list[Delivery[Any]]) -> None:
        nonlocal attempts
        if any(d.event.trial_id % 1000 == 7 for d in batch):
            attempts += len(batch) == 1
            raise KeyError("trial 7 has no row")
        store.apply(batch)

    async with connect_bus(_settings(parts), "test") as bus:
        await _publish(bus, e)
        stop = asyncio.Event()
        spec = _spec(e, max_deliver=3, backoff_s=(0.05,))
        task = asyncio.create_task(bus.consume(spec, msgspec.json.Decoder(ev.DomainEvent), buggy, stop,
                                               batch=5, position=store.position))
        await _wait(lambda: len(store.applied) >= N - 1)
        stop.set()
        await task
        assert store.applied == [t for t in range(N) if t != 7]
        assert attempts == 3
        letters = await _dead_letters(bus, spec.durable)
        assert len(letters) == 1 and "trial 7 has no row" in letters[0].error and "3 times" in letters[0].error
        assert msgspec.json.decode(letters[0].payload, type=ev.DomainEvent).trial_id % 1000 == 7


async def test_a_stolen_delivery_is_noticed_and_read_again(parts: p.RunningParts) -> None:
    """A delivery that never reaches the handler (lost in flight) shows as a gap in the consumer sequence:
    the consumer rebinds at its position and gets it, instead of moving past it."""
    e = _exp()
    store = Store()
    gate = asyncio.Event()
    gate_open = asyncio.Event()

    async def slow(batch: list[Delivery[Any]]) -> None:
        store.apply(batch)
        if store.last_seq and not gate_open.is_set():
            gate.set()
            await gate_open.wait()

    async with connect_bus(_settings(parts), "test") as bus:
        await _publish(bus, e)
        stop = asyncio.Event()
        spec = _spec(e)
        task = asyncio.create_task(bus.consume(spec, msgspec.json.Decoder(ev.DomainEvent), slow, stop,
                                               batch=1, position=store.position))
        await asyncio.wait_for(gate.wait(), 20)
        # Another subscriber on the same durable takes the next delivery and drops it.
        thief = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=subjects.EVENTS.name)
        stolen = await thief.fetch(1, timeout=5)
        assert [msgspec.json.decode(m.data, type=ev.DomainEvent).trial_id % 1000 for m in stolen] == [1]
        await thief.unsubscribe()
        gate_open.set()
        await _wait(lambda: len(store.applied) >= N)
        stop.set()
        await task
    assert store.applied == list(range(N))


def _kill_postgres(parts: p.RunningParts) -> None:
    """SIGKILL the postmaster's whole process group, as a crashed database host would."""
    pid = parts.postgres.pid
    if os.getpgid(pid) == pid:
        os.killpg(pid, signal.SIGKILL)
    else:
        os.kill(pid, signal.SIGKILL)


async def _live_and_in_one_go(parts: p.RunningParts, bus: Bus, schema: str, durable: str, seqs: list[int],
                              stream: subjects.StreamSpec, filter_subject: str,
                              decoder: msgspec.json.Decoder[Any]) -> tuple[str, str, int]:
    """Once the consumer's position reached the last of ``seqs``: the digest of the live read model in ``schema``,
    the digest of the same events projected in one go into a fresh schema, and how many metric points the live
    one holds. Both schemas are dropped after."""
    reference = f"r_{uuid.uuid4().hex[:12]}"
    c = await asyncpg.connect(_dsn(parts))
    try:
        await c.execute(f'SET search_path TO "{schema}"')
        for _ in range(300):
            if await c.fetchval("SELECT last_seq FROM projection_positions WHERE consumer = $1", durable) == max(seqs):
                break
            await asyncio.sleep(0.1)
        live = await _digest(c)
        points = int(await c.fetchval("SELECT count(*) FROM metric_points"))
        wanted = set(seqs)
        items = [Item(d.seq, d.timestamp, d.event) async for d in
                 bus.read(stream, filter_subject, decoder, start_seq=min(seqs)) if d.seq in wanted]
        assert [i.seq for i in items] == seqs
        await readmodel.migrate(c, reference)
        assert await project_batch(c, durable, items) == len(seqs)
        ref = await _digest(c)
        await c.execute(f'DROP SCHEMA "{reference}" CASCADE')
        await c.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await c.close()
    return live, ref, points


async def test_the_tracker_loses_nothing_when_postgres_is_killed_mid_stream(parts: p.RunningParts) -> None:
    """Events published while PostgreSQL is dead all land once it is back, and the read model equals a
    projection of the same events (same seqs, same stream timestamps) done in one go."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    lives = [_life(_exp(), _exp()) for _ in range(6)]
    durable = f"tracker-pos-{schema}"
    spec = ConsumerSpec(durable=durable, stream=subjects.EVENTS,
                        filter_subjects=[f"kiln.events.{life[0].experiment_id}.>" for life in lives])
    seqs: list[int] = []
    async with connect_bus(_settings(parts), "test") as bus:
        pool = await asyncpg.create_pool(_dsn(parts), min_size=1, max_size=2, server_settings={"search_path": schema})
        stop = asyncio.Event()
        try:
            async with pool.acquire() as c:
                await readmodel.migrate(c, schema)
            for life in lives[:3]:
                seqs += [await bus.publish(event) for event in life]
            task = asyncio.create_task(bus.consume(spec, msgspec.json.Decoder(ev.DomainEvent),
                                                   handler_for(pool, durable), stop, batch=4,
                                                   position=position_of(pool, durable)))
            await asyncio.sleep(1.0)
            _kill_postgres(parts)
            for life in lives[3:]:
                seqs += [await bus.publish(event) for event in life]
            await asyncio.sleep(4.0)  # the tracker fails against a dead database meanwhile
            parts.postgres = p.start_postgres(parts.cfg)
            live, ref, _ = await _live_and_in_one_go(parts, bus, schema, durable, seqs, subjects.EVENTS,
                                                     "kiln.events.>", msgspec.json.Decoder(ev.DomainEvent))
            stop.set()
            await task
            assert live == ref
            assert await _dead_letters(bus, durable) == []
        finally:
            stop.set()
            await pool.close()


async def test_experiment_ids_do_not_jump_after_postgres_is_killed(parts: p.RunningParts) -> None:
    """Found on the real stack: ids went 4 -> 36 after a crash (a sequence pre-logs 32 values). The counter
    row is committed with each id, so the next id after a crash is the next number."""
    from services.gateway import queries

    schema = f"t_{uuid.uuid4().hex[:12]}"
    c = await asyncpg.connect(_dsn(parts))
    try:
        await readmodel.migrate(c, schema)
        first = [await queries.next_experiment_id(c) for _ in range(3)]
    finally:
        await c.close()
    assert first == [1, 2, 3]
    _kill_postgres(parts)
    parts.postgres = p.start_postgres(parts.cfg)
    c = await asyncpg.connect(_dsn(parts))
    try:
        await c.execute(f'SET search_path TO "{schema}"')
        assert await queries.next_experiment_id(c) == 4
        await c.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await c.close()


async def test_a_replay_waits_out_a_postgres_outage(parts: p.RunningParts, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kiln events replay` started while PostgreSQL is dead finishes once it is back, instead of failing."""
    from services.tracker import replay

    user, password = next(iter(TEST_NATS_USERS.items()))
    monkeypatch.setenv("KILN_PG_DSN", _dsn(parts))
    monkeypatch.setenv("KILN_NATS_URL", parts.nats_url)
    monkeypatch.setenv("KILN_NATS_USER", user)
    monkeypatch.setenv("KILN_NATS_PASSWORD", password)
    schema = f"r_{uuid.uuid4().hex[:12]}"
    async with connect_bus(_settings(parts), "test") as bus:
        for event in _life(_exp(), _exp()):
            await bus.publish(event)
    _kill_postgres(parts)
    task = asyncio.create_task(replay.run(schema, verify=False))
    await asyncio.sleep(3.0)
    assert not task.done()
    parts.postgres = p.start_postgres(parts.cfg)
    report = await asyncio.wait_for(task, 120)
    assert report.events >= 10
    c = await asyncpg.connect(_dsn(parts))
    try:
        await c.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await c.close()
