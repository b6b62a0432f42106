"""Tracker: projects the event, metric and log streams into the Postgres read model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import msgspec
import structlog

from schemas import events as ev
from schemas import ports, readmodel, subjects
from services.runtime import (
    Bus,
    BusSettings,
    ConsumerSpec,
    Delivery,
    Transient,
    configure_logging,
    connect_bus,
    postgres_unavailable,
    read_settings,
    stop_on_signals,
)
from services.tracker.projection import Item, Prepared, prepare, project_batch

log = structlog.get_logger(__name__)


class TrackerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the tracker (``KILN_*`` environment variables)."""

    pg_dsn: str = ports.PG_DSN
    batch: int = 256
    prefetch: bool = True  # fold the next metrics/logs batch while Postgres writes this one (KILN_PREFETCH)
    log_level: str = "INFO"


# One durable consumer per stream; each records its own position.
CONSUMERS: list[tuple[ConsumerSpec, Any]] = [  # (spec, the union its decoder reads)
    (ConsumerSpec(durable=readmodel.DOMAIN_PROJECTION, stream=subjects.EVENTS, filter_subjects=[subjects.ALL_EVENTS]),
     ev.DomainEvent),
    (ConsumerSpec(durable="tracker-metrics", stream=subjects.METRICS, filter_subjects=[subjects.ALL_METRICS]),
     ev.MetricEvent),
    (ConsumerSpec(durable="tracker-logs", stream=subjects.LOGS, filter_subjects=[subjects.ALL_LOGS]),
     ev.LogEvent),
]


AHEAD_STREAMS = frozenset({subjects.METRICS.name, subjects.LOGS.name})


class Ahead:
    """Batches folded ahead (``Bus.consume(prefetch=...)``) while the one before is written, by their seqs."""

    KEEP = 4  # one is ahead at a time; a few more only when a head start was dropped (a rebind)

    def __init__(self) -> None:
        self.folded: dict[tuple[int, ...], Prepared] = {}
        self.used = 0  # batches applied from their head start

    def prefetch(self, batch: list[Delivery[Any]]) -> None:
        prepared = prepare([Item(d.seq, d.timestamp, d.event) for d in batch])
        if prepared is None:
            return
        while len(self.folded) >= self.KEEP:
            self.folded.pop(next(iter(self.folded)))
        self.folded[prepared.seqs] = prepared

    def take(self, items: list[Item]) -> Prepared | None:
        prepared = self.folded.pop(tuple(i.seq for i in items), None)
        self.used += prepared is not None
        return prepared


def handler_for(pool: asyncpg.Pool, consumer: str,
                ahead: Ahead | None = None) -> Callable[[list[Delivery[Any]]], Coroutine[Any, Any, None]]:
    """A batch handler that projects and commits before the runtime acks."""

    async def handle(batch: list[Delivery[Any]]) -> None:
        items = [Item(d.seq, d.timestamp, d.event) for d in batch]
        prepared = ahead.take(items) if ahead is not None else None  # before any await: it is this batch's
        try:
            async with pool.acquire() as conn:
                await project_batch(conn, consumer, items, prepared)
        except Exception as exc:
            if postgres_unavailable(exc):
                raise Transient(f"postgres unavailable: {exc!r}") from exc
            raise

    return handle


def position_of(pool: asyncpg.Pool, consumer: str) -> Callable[[], Coroutine[Any, Any, int]]:
    """The last stream seq the read model holds for ``consumer`` (0 before the first commit)."""

    async def position() -> int:
        try:
            async with pool.acquire() as conn:
                value = await conn.fetchval("SELECT last_seq FROM projection_positions WHERE consumer = $1", consumer)
        except Exception as exc:
            if postgres_unavailable(exc):
                raise Transient(f"postgres unavailable: {exc!r}") from exc
            raise
        return int(value or 0)

    return position


async def main() -> None:
    """Composition root: settings once, connections inside ``async with``."""
    settings = read_settings(TrackerSettings)
    configure_logging("tracker", settings.log_level)
    bus_settings = read_settings(BusSettings)
    stop = stop_on_signals()
    async with asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=4) as pool:
        async with pool.acquire() as conn:
            applied = await readmodel.migrate(conn)
        log.info("tracker.migrated", applied=applied)
        async with connect_bus(bus_settings, "tracker", ensure=False) as bus:
            await asyncio.gather(*(consume(bus, pool, spec, kind, settings, stop) for spec, kind in CONSUMERS))


async def consume(bus: Bus, pool: asyncpg.Pool, spec: ConsumerSpec, kind: Any, settings: TrackerSettings,
                  stop: asyncio.Event) -> None:
    """One projection. Metrics and logs touch no rows of the read model: the next batch is decoded and folded
    while Postgres writes this one (``prefetch``); domain events need the rows the batch before wrote."""
    ahead = Ahead() if settings.prefetch and spec.stream.name in AHEAD_STREAMS else None
    await bus.consume(spec, msgspec.json.Decoder(kind), handler_for(pool, spec.durable, ahead), stop,
                      batch=settings.batch, position=position_of(pool, spec.durable),
                      prefetch=ahead.prefetch if ahead is not None else None)


if __name__ == "__main__":
    asyncio.run(main())
