"""The worker outbox against a real JetStream that goes away: everything arrives, once, in order.

Each test starts its own NATS (``parts_config_factory``) so it can stop and restart it without touching
the session's parts.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from deploy import parts as p
from schemas import events as ev
from schemas import subjects
from services.runtime import Bus, BusSettings, connect_bus
from services.worker.outbox import Outbox, OutboxFile
from tests.integration.conftest import TEST_NATS_USERS

pytestmark = pytest.mark.integration


class OwnNats:
    """A NATS part this test may stop and start again (same port, same JetStream store)."""

    def __init__(self, cfg: p.PartsConfig) -> None:
        self.cfg = cfg
        self.part: p.Part | None = p.start_nats(cfg)

    @property
    def settings(self) -> BusSettings:
        user, password = next(iter(TEST_NATS_USERS.items()))
        return BusSettings(nats_url=f"nats://{self.cfg.host}:{self.cfg.nats_port}", nats_user=user,
                           nats_password=password)

    def stop(self) -> None:
        if self.part is not None:
            self.part.stop()
            self.part = None

    def start(self) -> None:
        if self.part is None:
            self.part = p.start_nats(self.cfg)


@pytest.fixture
def own_nats(tmp_path: Path, parts_config_factory: Callable[[Path], p.PartsConfig]) -> Iterator[OwnNats]:
    nats = OwnNats(parts_config_factory(tmp_path / "parts"))
    try:
        yield nats
    finally:
        nats.stop()


def _events(e: int, first: int, n: int, alloc: str) -> list[Any]:
    """A run's reports as the worker makes them: log batches, a validation, progress."""
    out: list[Any] = []
    for i in range(first, first + n):
        out.append(ev.LogsShipped(experiment_id=e, trial_id=e, allocation_id=alloc,
                                  lines=[ev.LogLine(line_no=i, stream="stdout", text=f"line {i}", ts=float(i))]))
        if i % 5 == 4:
            out.append(ev.ValidationReported(experiment_id=e, trial_id=e, steps_completed=i, metrics={"acc": i}))
    return out


async def _stored(bus: Bus, e: int) -> list[tuple[float, str, Any]]:
    """What JetStream holds about experiment ``e`` (events and logs), in the order it was stored."""
    out: list[tuple[float, str, Any]] = []
    for stream, filt, decoder in (
        (subjects.EVENTS, f"kiln.events.{e}.>", msgspec.json.Decoder(ev.DomainEvent)),
        (subjects.LOGS, f"kiln.logs.{e}.>", msgspec.json.Decoder(ev.LogEvent)),
    ):
        async for d in bus.read(stream, filt, decoder):
            out.append((d.timestamp, stream.name, d.event))
    return sorted(out, key=lambda x: x[0])


def _key(event: Any) -> str:
    return subjects.dedupe_key(event)


async def test_appends_during_an_outage_arrive_once_and_in_order_when_nats_returns(own_nats: OwnNats,
                                                                                   tmp_path: Path) -> None:
    e = 700_000 + uuid.uuid4().int % 200_000
    alloc = f"{e}.1"
    before = _events(e, 0, 5, alloc)
    during = _events(e, 5, 20, alloc) + [ev.AllocationExited(experiment_id=e, trial_id=e, allocation_id=alloc,
                                                             worker_id="w", exit_code=0, exited_at=1.0)]
    async with connect_bus(own_nats.settings, "test-outbox") as bus:
        box = Outbox(tmp_path / "outbox.sqlite", bus.publish_raw)
        await box.start()
        for event in before:
            await box.append(event)
        assert await box.wait_drained(timeout=30.0)

        own_nats.stop()
        for event in during:  # each acknowledged once on disk, with the bus away
            await box.append(event)
        assert not await box.wait_drained(timeout=4.0)  # retried meanwhile, not dropped
        assert box.published_through == len(before)
        own_nats.start()
        assert await box.wait_drained(timeout=60.0)
        await box.close()

        stored = await _stored(bus, e)
    keys = [_key(x) for _, _, x in stored]
    assert keys == [_key(x) for x in before + during]  # each once, in append order, across both streams
    f = OutboxFile(tmp_path / "outbox.sqlite")
    assert f.count() == 0
    f.close()


async def test_a_fresh_outbox_on_the_same_file_publishes_what_the_previous_one_left(own_nats: OwnNats,
                                                                                    tmp_path: Path) -> None:
    e = 700_000 + uuid.uuid4().int % 200_000
    alloc = f"{e}.1"
    path = tmp_path / "outbox.sqlite"
    left = _events(e, 0, 10, alloc) + [ev.AllocationExited(experiment_id=e, trial_id=e, allocation_id=alloc,
                                                           worker_id="w", exit_code=0, exited_at=1.0)]
    async with connect_bus(own_nats.settings, "test-outbox-1") as bus:
        first = Outbox(path, bus.publish_raw)
        await first.start()
        own_nats.stop()
        for event in left:
            await first.append(event)
        await asyncio.sleep(1.0)
        await first.close()  # this worker process ends with the bus still away

    own_nats.start()
    async with connect_bus(own_nats.settings, "test-outbox-2") as bus:
        second = Outbox(path, bus.publish_raw)
        await second.start()
        assert second.inherited_rows == len(left) and second.inherited_exits == [alloc]
        assert await second.wait_drained(timeout=60.0)
        await second.close()
        stored = await _stored(bus, e)
    assert [_key(x) for _, _, x in stored] == [_key(x) for x in left]
