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
from services.tracker.projection import Item, project_batch

log = structlog.get_logger(__name__)


class TrackerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the tracker (``KILN_*`` environment variables)."""

    pg_dsn: str = ports.PG_DSN
    batch: int = 256
    log_level: str = "INFO"


# One durable consumer per stream; each records its own position.
CONSUMERS: list[tuple[ConsumerSpec, Any]] = [  # (spec, the union its decoder reads)
    (ConsumerSpec(durable="tracker-events", stream=subjects.EVENTS, filter_subjects=[subjects.ALL_EVENTS]),
     ev.DomainEvent),
    (ConsumerSpec(durable="tracker-metrics", stream=subjects.METRICS, filter_subjects=[subjects.ALL_METRICS]),
     ev.MetricEvent),
    (ConsumerSpec(durable="tracker-logs", stream=subjects.LOGS, filter_subjects=[subjects.ALL_LOGS]),
     ev.LogEvent),
]


def handler_for(pool: asyncpg.Pool, consumer: str) -> Callable[[list[Delivery[Any]]], Coroutine[Any, Any, None]]:
    """A batch handler that projects and commits before the runtime acks."""

    async def handle(batch: list[Delivery[Any]]) -> None:
        items = [Item(d.seq, d.timestamp, d.event) for d in batch]
        try:
            async with pool.acquire() as conn:
                await project_batch(conn, consumer, items)
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
            await asyncio.gather(*(
                bus.consume(spec, msgspec.json.Decoder(kind), handler_for(pool, spec.durable), stop,
                            batch=settings.batch, position=position_of(pool, spec.durable))
                for spec, kind in CONSUMERS
            ))


if __name__ == "__main__":
    asyncio.run(main())
