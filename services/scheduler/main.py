"""Scheduler: places queued trials on the slots workers heartbeat, and restarts what fails."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import structlog

from schemas import events as ev
from schemas import subjects
from services.runtime import (
    BusSettings,
    ConsumerSpec,
    DecisionShell,
    configure_logging,
    connect_bus,
    read_settings,
    stop_on_signals,
)
from services.scheduler.core import SchedulerCore

log = structlog.get_logger(__name__)

CONSUMER = ConsumerSpec(
    durable="scheduler",
    stream=subjects.EVENTS,
    filter_subjects=["kiln.events.*.experiment", "kiln.events.*.trial.*", "kiln.events.*.worker.*",
                     "kiln.events.cluster.>"],
)


class SchedulerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the scheduler (``KILN_*`` environment variables)."""

    worker_timeout_s: float = 10.0
    tick_s: float = 0.5
    log_level: str = "INFO"


async def main() -> None:
    """Composition root: settings once, connections inside ``async with``."""
    settings = read_settings(SchedulerSettings)
    configure_logging("scheduler", settings.log_level)
    stop = stop_on_signals()
    timeout = settings.worker_timeout_s
    async with connect_bus(read_settings(BusSettings), "scheduler") as bus:
        shell = DecisionShell(bus, "scheduler", lambda: SchedulerCore(worker_timeout_s=timeout),
                              lambda b: SchedulerCore.restore(b, timeout))
        await shell.load()
        shell.core.resume(time.time())
        hb_decoder = msgspec.json.Decoder(ev.WorkerHeartbeat)

        async def on_heartbeat(msg: object) -> None:
            try:
                hb = hb_decoder.decode(msg.data)  # type: ignore[attr-defined]
            except msgspec.DecodeError as exc:
                log.warning("scheduler.bad_heartbeat", error=str(exc))
                return
            try:
                await shell.decide(lambda core: core.heartbeat(hb) + core.tick(time.time()))
            except Exception as exc:  # noqa: BLE001 - the next heartbeat tries again
                log.warning("scheduler.heartbeat_failed", error=repr(exc))

        async def tick_forever() -> None:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), settings.tick_s)
                try:
                    await shell.decide(lambda core: core.tick(time.time()))
                except Exception as exc:  # noqa: BLE001 - ticks retry by themselves
                    log.warning("scheduler.tick_failed", error=repr(exc))

        await bus.nc.subscribe(subjects.HEARTBEAT_SUBJECT, cb=on_heartbeat)
        ticker = asyncio.create_task(tick_forever())
        log.info("scheduler.ready", seq=shell.last_seq)

        async def on_events(batch: list) -> None:
            await shell.on_events(batch)
            await shell.decide(lambda core: core.tick(time.time()))

        await bus.consume(CONSUMER, msgspec.json.Decoder(ev.DomainEvent), on_events, stop)
        ticker.cancel()


if __name__ == "__main__":
    asyncio.run(main())
