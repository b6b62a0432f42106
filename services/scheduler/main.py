"""Scheduler: places queued trials on the slots workers heartbeat, and restarts what fails."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import structlog

from schemas import events as ev
from schemas import subjects
from schemas.cluster import CLUSTER_BUCKET, CLUSTER_KEY
from services.runtime import (
    Bucket,
    Bus,
    BusSettings,
    ConsumerSpec,
    DecisionShell,
    Delivery,
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
    filter_subjects=[subjects.EXPERIMENT_FACTS, subjects.TRIAL_FACTS, subjects.WORKER_COMMANDS,
                     subjects.CLUSTER_FACTS],
)


class SchedulerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the scheduler (``KILN_*`` environment variables)."""

    worker_timeout_s: float = 10.0
    preempt_timeout_s: float = 60.0
    tick_s: float = 0.5
    log_level: str = "INFO"


async def cluster_bucket(bus: Bus) -> Bucket:
    """The key-value bucket the cluster view lives in (made by the stack's bootstrap, not by the scheduler)."""
    return await bus.bucket(CLUSTER_BUCKET)


async def main() -> None:
    """Composition root: settings once, connections inside ``async with``."""
    settings = read_settings(SchedulerSettings)
    configure_logging("scheduler", settings.log_level)
    stop = stop_on_signals()
    timeout, preempt = settings.worker_timeout_s, settings.preempt_timeout_s
    async with connect_bus(read_settings(BusSettings), "scheduler", ensure=False) as bus:
        shell = DecisionShell(bus, "scheduler", lambda: SchedulerCore(worker_timeout_s=timeout,
                                                                      preempt_timeout_s=preempt),
                              lambda b: SchedulerCore.restore(b, timeout, preempt))
        await shell.load()
        shell.core.resume(time.time())
        hb_decoder = msgspec.json.Decoder(ev.WorkerHeartbeat)

        async def on_heartbeat(subject: str, data: bytes) -> None:
            try:
                hb = hb_decoder.decode(data)
            except msgspec.DecodeError as exc:
                log.warning("scheduler.bad_heartbeat", error=str(exc))
                return
            try:
                await shell.decide(lambda core: core.heartbeat(hb) + core.tick(time.time()))
            except Exception as exc:  # noqa: BLE001 - the next heartbeat tries again
                log.warning("scheduler.heartbeat_failed", error=repr(exc))

        view_kv = await cluster_bucket(bus)
        encoder = msgspec.json.Encoder()
        last_view = b""

        async def tick_forever() -> None:
            nonlocal last_view
            reconnects, grace_until = bus.reconnects, 0.0
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), settings.tick_s)
                if bus.reconnects != reconnects or not bus.is_connected:
                    # Heartbeats were not heard while the bus was away: that silence is the bus's, not the
                    # workers'. Until one heartbeat period after it is back, nobody is judged lost for it
                    # (resumed on every tick, so a decision rolled back meanwhile cannot undo it).
                    reconnects, grace_until = bus.reconnects, time.monotonic() + 2 * settings.tick_s + 1.0
                if time.monotonic() < grace_until or not bus.is_connected:
                    shell.core.resume(time.time())
                try:
                    await shell.decide(lambda core: core.tick(time.time()))
                    # The published view (agents, queue) for the gateway; written only when it changed.
                    view = shell.core.view(0.0)
                    body = encoder.encode(view)
                    if body != last_view:
                        await view_kv.put(CLUSTER_KEY, encoder.encode(msgspec.structs.replace(view, as_of=time.time())))
                        last_view = body
                except Exception as exc:  # noqa: BLE001 - ticks retry by themselves
                    log.warning("scheduler.tick_failed", error=repr(exc))

        await bus.subscribe(subjects.HEARTBEAT_SUBJECT, on_heartbeat)
        ticker = asyncio.create_task(tick_forever())
        log.info("scheduler.ready", seq=shell.last_seq)

        async def on_events(batch: list[Delivery[ev.DomainEvent]]) -> None:
            await shell.on_events(batch)
            await shell.decide(lambda core: core.tick(time.time()))

        await bus.consume(CONSUMER, msgspec.json.Decoder(ev.DomainEvent), on_events, stop, position=shell.position)
        ticker.cancel()


if __name__ == "__main__":
    asyncio.run(main())
