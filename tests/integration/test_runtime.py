"""The shared runtime against a real JetStream: dedupe, retry with backoff, dead letters, crash-safe decisions."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec
import pytest

from deploy import parts as p
from schemas import events as ev
from schemas import subjects
from services.runtime import Bus, BusSettings, ConsumerSpec, DecisionShell, Delivery, Transient, connect_bus
from tests.integration.conftest import TEST_NATS_USERS

pytestmark = pytest.mark.integration


def _settings(parts: p.RunningParts) -> BusSettings:
    user, password = next(iter(TEST_NATS_USERS.items()))
    return BusSettings(nats_url=parts.nats_url, nats_user=user, nats_password=password)


def _exp() -> int:
    return 500_000 + uuid.uuid4().int % 400_000


async def _count(bus: Bus, subject: str) -> int:
    info = await bus.js.stream_info(subjects.EVENTS.name, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_a_republished_fact_is_stored_once(parts: p.RunningParts) -> None:
    """Publishing the same event twice (a retry) leaves one message in the stream."""
    e = _exp()
    async with connect_bus(_settings(parts), "test") as bus:
        event = ev.ExperimentKillRequested(experiment_id=e)
        first = await bus.publish(event)
        second = await bus.publish(event)
        assert first == second
        assert await _count(bus, f"kiln.events.{e}.>") == 1


async def _run_consumer(bus: Bus, spec: ConsumerSpec, handler: Any, until: Any, timeout: float = 20.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(bus.consume(spec, msgspec.json.Decoder(ev.DomainEvent), handler, stop))
    try:
        for _ in range(int(timeout / 0.05)):
            if until():
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task


async def test_transient_failures_are_retried_then_succeed(parts: p.RunningParts) -> None:
    """A handler failing twice with Transient gets the message a third time, retried in place (the server
    never redelivers it, so nothing newer can overtake it), and it is acked once."""
    e = _exp()
    seen: list[int] = []

    async def flaky(batch: list[Delivery[Any]]) -> None:
        seen.append(batch[0].num_delivered)
        if len(seen) < 3:
            raise Transient("database restarting")

    spec = ConsumerSpec(durable=f"flaky-{e}", stream=subjects.EVENTS, filter_subjects=[f"kiln.events.{e}.>"],
                        backoff_s=(0.1, 0.1, 0.1), max_deliver=5)
    async with connect_bus(_settings(parts), "test") as bus:
        await bus.publish(ev.ExperimentKillRequested(experiment_id=e))
        await _run_consumer(bus, spec, flaky, lambda: len(seen) >= 3)
        await asyncio.sleep(0.5)
        assert seen == [1, 1, 1]
        info = await bus.js.consumer_info(subjects.EVENTS.name, spec.durable)
        assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_a_message_that_always_fails_is_dead_lettered_and_the_next_one_is_processed(
        parts: p.RunningParts) -> None:
    """After max_deliver failures the message goes to the dead-letter stream; the stream moves on."""
    e = _exp()
    handled: list[str] = []
    attempts: list[int] = []

    async def picky(batch: list[Delivery[Any]]) -> None:
        event = batch[0].event
        if isinstance(event, ev.ExperimentKillRequested):
            attempts.append(batch[0].num_delivered)
            raise ValueError("cannot handle kills")
        handled.append(type(event).__name__)

    durable = f"picky-{e}"
    spec = ConsumerSpec(durable=durable, stream=subjects.EVENTS, filter_subjects=[f"kiln.events.{e}.>"],
                        backoff_s=(0.05,), max_deliver=3)
    async with connect_bus(_settings(parts), "test") as bus:
        await bus.publish(ev.ExperimentKillRequested(experiment_id=e))
        await bus.publish(ev.ExperimentEnded(experiment_id=e, state="CANCELED"))
        await _run_consumer(bus, spec, picky, lambda: handled and len(attempts) >= 3)
        assert handled == ["ExperimentEnded"]
        assert attempts == [1, 1, 1]  # three tries in place, then the dead letter
        sub = await bus.js.subscribe(subjects.deadletter_subject(durable), ordered_consumer=True)
        letter = msgspec.json.decode((await sub.next_msg(timeout=5)).data, type=ev.MessageDeadLettered)
        assert "cannot handle kills" in letter.error and "3 times" in letter.error
        assert msgspec.json.decode(letter.payload, type=ev.DomainEvent) == ev.ExperimentKillRequested(experiment_id=e)


class _Counter:
    """A tiny decision core: every kill request it sees is answered with one ExperimentEnded."""

    def __init__(self, seen: list[int] | None = None) -> None:
        self.seen = seen or []

    def handle(self, event: Any) -> list[Any]:
        if isinstance(event, ev.ExperimentKillRequested) and event.experiment_id not in self.seen:
            self.seen.append(event.experiment_id)
            return [ev.ExperimentEnded(experiment_id=event.experiment_id, state="CANCELED")]
        return []

    def snapshot(self) -> bytes:
        return msgspec.json.encode(self.seen)

    @classmethod
    def restore(cls, data: bytes) -> _Counter:
        return cls(msgspec.json.decode(data, type=list[int]))


async def test_a_decision_service_killed_before_its_snapshot_does_not_decide_twice(parts: p.RunningParts) -> None:
    """Crash after publishing, before snapshotting: the restarted shell re-decides and dedupe absorbs it."""
    e = _exp()
    key = f"counter-{e}"
    async with connect_bus(_settings(parts), "test") as bus:
        seq = await bus.publish(ev.ExperimentKillRequested(experiment_id=e))
        shell = DecisionShell(bus, key, _Counter, _Counter.restore)
        await shell.load()
        event = ev.ExperimentKillRequested(experiment_id=e)
        # Publish the decision but "crash" before the snapshot is written.
        await bus.publish_many(shell.core.handle(event))
        restarted = DecisionShell(bus, key, _Counter, _Counter.restore)
        await restarted.load()
        assert restarted.last_seq < seq
        await restarted.decide(lambda core: core.handle(event), seq=seq)
        assert await _count(bus, f"kiln.events.{e}.experiment.*") == 2  # the request and one ExperimentEnded
        again = DecisionShell(bus, key, _Counter, _Counter.restore)
        await again.load()
        assert again.last_seq == seq and again.core.seen == [e]


async def test_a_failed_publish_rolls_the_core_back(parts: p.RunningParts) -> None:
    """If publishing fails, the core's state is the last snapshot's: a retry decides again."""
    e = _exp()
    async with connect_bus(_settings(parts), "test") as bus:
        shell = DecisionShell(bus, f"rollback-{e}", _Counter, _Counter.restore)
        await shell.load()

        async def broken(events: Any) -> None:
            raise ConnectionError("nats went away")

        original = bus.publish_many
        bus.publish_many = broken  # type: ignore[method-assign]
        with pytest.raises(ConnectionError):
            await shell.decide(lambda core: core.handle(ev.ExperimentKillRequested(experiment_id=e)), seq=1)
        assert shell.core.seen == []
        bus.publish_many = original  # type: ignore[method-assign]
        await shell.decide(lambda core: core.handle(ev.ExperimentKillRequested(experiment_id=e)), seq=1)
        assert shell.core.seen == [e]


async def test_a_slow_reader_gets_every_message_once_in_order(parts: p.RunningParts) -> None:
    """Bus.read holds back the server when its reader lags (the buffer fills), and loses nothing."""
    e = _exp()
    n = 20_000  # more than the read buffer, so the reader's backpressure is exercised
    async with connect_bus(_settings(parts), "test") as bus:
        for start in range(0, n, 1000):
            await asyncio.gather(*(bus.publish(ev.TrialStopRequested(experiment_id=e, trial_id=t))
                                   for t in range(start, start + 1000)))
        decoder = msgspec.json.Decoder(ev.DomainEvent)
        seen: list[int] = []
        seqs: list[int] = []
        async for d in bus.read(subjects.EVENTS, subjects.experiment_filter(e), decoder):
            seen.append(d.event.trial_id)
            seqs.append(d.seq)
            if len(seen) % 2000 == 0:
                await asyncio.sleep(0.2)  # let the subscription run ahead and fill the buffer
    assert seen == list(range(n))
    assert seqs == sorted(set(seqs))
