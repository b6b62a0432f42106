"""The trial → worker link over a real Unix socket: kiln.core's client against the worker's server.

The first tests need no bus (the outbox is a list, stop requests come from a fake watcher); the last one
runs the whole path on real NATS: a trial's reports reach JetStream through the worker's outbox, and a
stop request published on the bus reaches the trial.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from deploy import parts as p
from kiln.core._bus import LinkError, TrialBus
from schemas import events as ev
from schemas import subjects
from services.runtime import BusSettings, connect_bus
from services.worker.link import Identity, OnStop, TrialLink, bus_stop_watcher, socket_path
from services.worker.outbox import Outbox
from tests.integration.conftest import TEST_NATS_USERS

pytestmark = pytest.mark.integration


class Stored:
    """Stands in for the outbox: keeps what the link appended."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    async def append(self, event: Any) -> int:
        self.events.append(event)
        return len(self.events)


class FakeStops:
    """Stands in for the bus watch: the test says when a stop request arrives."""

    def __init__(self) -> None:
        self.on_stop: OnStop | None = None
        self.watching = asyncio.Event()

    async def watch(self, who: Identity, on_stop: OnStop) -> None:
        self.on_stop = on_stop
        self.watching.set()
        await asyncio.Event().wait()


async def _link(tmp_path: Path, who: Identity, store: Any, stops: Any) -> TrialLink:
    link = TrialLink(socket_path(tmp_path / who.allocation_id), who, store, stops)
    await link.start()
    return link


WHO = Identity(experiment_id=3, trial_id=7, allocation_id="7.2")


async def test_the_link_stores_what_the_trial_reports_and_refuses_what_is_not_its_own(tmp_path: Path) -> None:
    store, stops = Stored(), FakeStops()
    link = await _link(tmp_path, WHO, store.append, stops.watch)
    mode = os.stat(link.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(link.path.parent).st_mode) == 0o700

    def trial() -> list[str]:
        errors = []
        bus = TrialBus(str(link.path), 3, 7, "7.2")
        bus.publish(ev.TrialProgressReported(experiment_id=3, trial_id=7, progress=0.5))
        for bad in (
            ev.ValidationReported(experiment_id=3, trial_id=8, steps_completed=1, metrics={"x": 1}),  # another trial
            ev.CheckpointStored(experiment_id=4, trial_id=7, uuid="u", steps_completed=1, storage="s"),  # experiment
            ev.AllocationExited(experiment_id=3, trial_id=7, allocation_id="7.2", worker_id="w", exit_code=0,
                                exited_at=0.0),  # the worker's to say
            ev.TrialStopRequested(experiment_id=3, trial_id=7),  # the searcher's to say
        ):
            try:
                bus.publish(bad)
            except LinkError as exc:
                errors.append(str(exc))
        for step in range(1, 1201):
            bus.add_point(ev.MetricPoint(steps_completed=step, metrics={"loss": 1.0 / step}))
        bus.publish(ev.ValidationReported(experiment_id=3, trial_id=7, steps_completed=1200, metrics={"x": 1}))
        bus.flush()
        bus.close()
        return errors

    errors = await asyncio.to_thread(trial)
    assert len(errors) == 4
    assert "trial 8" in errors[0] and "experiment 4" in errors[1]
    assert "may not publish AllocationExited" in errors[2] and "may not publish TrialStopRequested" in errors[3]
    assert link.refused == 4
    kinds = [type(e).__name__ for e in store.events]
    assert kinds[0] == "TrialProgressReported"
    batches = [e for e in store.events if isinstance(e, ev.TrainingMetricsReported)]
    assert [p.steps_completed for b in batches for p in b.points] == list(range(1, 1201))
    assert all(b.batch_id.startswith("7.2:") and len(b.points) <= 500 for b in batches)
    assert len({b.batch_id for b in batches}) == len(batches)
    # Nothing the trial may not say was stored.
    assert all(type(e).__name__ in ("TrialProgressReported", "TrainingMetricsReported", "ValidationReported")
               and e.trial_id == 7 and e.experiment_id == 3 for e in store.events)
    await link.close()
    assert not link.path.exists()


async def test_batches_too_big_for_one_bus_message_are_split_and_every_point_is_stored(tmp_path: Path) -> None:
    """Text metrics of control characters grow 6x as JSON (the bus's format): still every batch fits."""
    store = Stored()
    link = await _link(tmp_path, WHO, store.append, FakeStops().watch)
    text = "\x01" * 4000  # 4 kB in msgpack, 24 kB as JSON

    def trial() -> None:
        bus = TrialBus(str(link.path), 3, 7, "7.2")
        for step in range(200):
            bus.add_point(ev.MetricPoint(steps_completed=step, metrics={"note": text, "loss": 1.0}))
        bus.flush()
        bus.close()

    await asyncio.to_thread(trial)
    batches = [e for e in store.events if isinstance(e, ev.TrainingMetricsReported)]
    assert [p.steps_completed for b in batches for p in b.points] == list(range(200))
    assert len(batches) > 1 and all(len(msgspec.json.encode(b)) <= 512 * 1024 for b in batches)
    assert [b.batch_id for b in batches] == [f"7.2:{i}" for i in range(1, len(batches) + 1)]
    await link.close()


async def test_a_client_claiming_another_allocations_batches_is_refused(tmp_path: Path) -> None:
    store = Stored()
    link = await _link(tmp_path, WHO, store.append, FakeStops().watch)

    def trial() -> None:
        bus = TrialBus(str(link.path), 3, 7, "7.1")  # an earlier run's id: its batch ids are not ours
        bus.add_point(ev.MetricPoint(steps_completed=1, metrics={"loss": 1.0}))
        bus.close()  # logs the refusal; training code is not interrupted

    await asyncio.to_thread(trial)
    assert store.events == [] and link.refused == 1
    await link.close()


async def test_stop_requests_reach_the_trial_over_the_link(tmp_path: Path) -> None:
    stops = FakeStops()
    link = await _link(tmp_path, WHO, Stored().append, stops.watch)
    heard: list[str] = []
    got = threading.Event()

    def on_stop(reason: str) -> None:
        heard.append(reason)
        got.set()

    bus = await asyncio.to_thread(TrialBus, str(link.path), 3, 7, "7.2")
    await asyncio.to_thread(bus.watch_stop, on_stop)
    await asyncio.wait_for(stops.watching.wait(), 5.0)
    assert stops.on_stop is not None
    stops.on_stop("the scheduler needs this trial's slots")
    assert await asyncio.to_thread(got.wait, 5.0)
    assert heard == ["the scheduler needs this trial's slots"]
    await asyncio.to_thread(bus.close)
    await link.close()


async def test_a_trial_reports_to_jetstream_and_hears_a_stop_through_its_worker(parts: p.RunningParts,
                                                                               tmp_path: Path) -> None:
    user, password = next(iter(TEST_NATS_USERS.items()))
    settings = BusSettings(nats_url=parts.nats_url, nats_user=user, nats_password=password)
    # Trial ids are cluster-wide (dedupe keys use them alone): a fresh one, not another test's.
    e = t = 600_000 + uuid.uuid4().int % 300_000
    who = Identity(experiment_id=e, trial_id=t, allocation_id=f"{t}.1")
    async with connect_bus(settings, "test-link") as bus:
        outbox = Outbox(tmp_path / "outbox.sqlite", bus.publish_raw)
        await outbox.start()
        link = await _link(tmp_path, who, outbox.append, bus_stop_watcher(bus))
        got = threading.Event()
        trial = await asyncio.to_thread(TrialBus, str(link.path), e, t, who.allocation_id)
        await asyncio.to_thread(trial.watch_stop, lambda reason: got.set())
        await asyncio.to_thread(trial.publish, ev.ValidationReported(experiment_id=e, trial_id=t, steps_completed=5,
                                                                     metrics={"acc": 0.5}))
        # Stored is not yet published: the outbox sends it when it can.
        assert await outbox.wait_drained(timeout=15.0)
        await bus.publish(ev.TrialStopRequested(experiment_id=e, trial_id=t, reason="enough"))
        assert await asyncio.to_thread(got.wait, 15.0)
        await asyncio.to_thread(trial.close)
        await link.close()
        assert await outbox.wait_drained(timeout=15.0)
        await outbox.close()
        decoder = msgspec.json.Decoder(ev.DomainEvent)
        seen = [d.event async for d in bus.read(subjects.EVENTS, subjects.trial_filter(e, t), decoder)]
        assert [type(x).__name__ for x in seen] == ["ValidationReported", "TrialStopRequested"]
