"""Replay: rebuild every projection from the streams into a fresh schema, and verify it.

``python -m services.tracker.replay [--schema NAME] [--verify]`` (or ``kiln events replay``) reads each
stream from its first message with an ordered consumer and folds it through the same projection the
tracker runs, into a new Postgres schema. With ``--verify`` it replays exactly up to the live tracker's
recorded positions and compares a digest of every table with the live schema: equal digests mean the
read model is reproducible from the log alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

import asyncpg
import msgspec

from schemas import readmodel
from services.runtime import BusSettings, ConsumerSpec, configure_logging, connect_bus, read_settings
from services.tracker.main import CONSUMERS, TrackerSettings
from services.tracker.projection import Item, project_batch

BATCH = 2000
# Every projected table with the columns that order it (its key), for digests.
TABLES = {
    "experiments": "id",
    "trials": "id",
    "allocations": "id",
    "metric_points": "trial_id, kind, name, step",
    "metric_summaries": "trial_id, kind, name",
    "checkpoints": "uuid",
    "trial_logs": "allocation_id, line_no",
    "workers_lost": "worker_id, last_seen",
    "projection_positions": "consumer",
}


class ReplayReport(msgspec.Struct, kw_only=True):
    """What a replay did."""

    schema: str
    events: int
    seconds: float
    per_consumer: dict[str, int]
    digests: dict[str, str] = {}
    live_digests: dict[str, str] = {}

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def equal(self) -> bool:
        """Whether every table's digest matches the live one."""
        return bool(self.live_digests) and self.digests == self.live_digests


async def positions(conn: Any, schema: str) -> dict[str, int]:
    """The live projection's recorded stream positions, per consumer."""
    rows = await conn.fetch(f'SELECT consumer, last_seq FROM "{schema}".projection_positions')
    return {r["consumer"]: r["last_seq"] for r in rows}


async def digests(conn: Any, schema: str) -> dict[str, str]:
    """An md5 per table over all rows in key order (computed in Postgres)."""
    out = {}
    for table, order in TABLES.items():
        out[table] = await conn.fetchval(
            f"SELECT coalesce(md5(string_agg(t::text, E'\\n' ORDER BY {order})), md5('')) FROM \"{schema}\".{table} t"
        )
    return out


async def _read_chunks(bus: Any, spec: ConsumerSpec, decoder: msgspec.json.Decoder[Any], limit: int | None,
                       chunks: asyncio.Queue[list[Item] | None]) -> None:
    """Read a consumer's subjects in order into chunks of ``BATCH`` items; ``None`` marks the end."""
    items: list[Item] = []
    try:
        for subject in spec.filter_subjects:
            async with contextlib.aclosing(bus.read(spec.stream, subject, decoder)) as stream:
                async for d in stream:
                    if limit is not None and d.seq > limit:
                        break
                    items.append(Item(d.seq, d.timestamp, d.event))
                    if len(items) >= BATCH:
                        await chunks.put(items)
                        items = []
        if items:
            await chunks.put(items)
    except Exception:
        await chunks.put(None)  # wake the projecting side, which then re-raises this by awaiting the task
        raise
    await chunks.put(None)


async def replay(bus: Any, conn: Any, schema: str, up_to: dict[str, int] | None = None) -> ReplayReport:
    """Rebuild the read model into ``schema`` (dropped first) from every stream; ``up_to`` caps each consumer."""
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await readmodel.migrate(conn, schema)
    await conn.execute(f'SET search_path TO "{schema}"')
    started = time.perf_counter()
    counts: dict[str, int] = {}
    for spec, kind in CONSUMERS:
        limit = (up_to or {}).get(spec.durable)
        if up_to is not None and not limit:
            counts[spec.durable] = 0
            continue
        # Reading and projecting overlap: while Postgres applies one chunk, the next is read and decoded.
        chunks: asyncio.Queue[list[Item] | None] = asyncio.Queue(maxsize=2)
        reader = asyncio.create_task(_read_chunks(bus, spec, msgspec.json.Decoder(kind), limit, chunks))
        n = 0
        try:
            while (chunk := await chunks.get()) is not None:
                n += await project_batch(conn, spec.durable, chunk)
            await reader  # re-raises a failed read
        finally:
            reader.cancel()
        if limit is not None:
            # Positions must match the live ones even when the tail of the range was filtered out.
            await conn.execute(
                "INSERT INTO projection_positions (consumer, last_seq) VALUES ($1, $2)"
                " ON CONFLICT (consumer) DO UPDATE SET last_seq = EXCLUDED.last_seq", spec.durable, limit)
        counts[spec.durable] = n
    seconds = time.perf_counter() - started
    await conn.execute("SET search_path TO public")
    return ReplayReport(schema=schema, events=sum(counts.values()), seconds=seconds, per_consumer=counts)


async def run(schema: str, verify: bool, live_schema: str = "public") -> ReplayReport:
    """Connect with the tracker's settings, replay, and verify if asked."""
    settings = read_settings(TrackerSettings)
    async with connect_bus(read_settings(BusSettings), "replay", ensure=False) as bus:
        conn = await asyncpg.connect(settings.pg_dsn)
        try:
            up_to = await positions(conn, live_schema) if verify else None
            report = await replay(bus, conn, schema, up_to)
            if verify:
                report.digests = await digests(conn, schema)
                report.live_digests = await digests(conn, live_schema)
            return report
        finally:
            await conn.close()


def print_report(report: ReplayReport) -> None:
    """Human-readable summary, one line per table when verifying."""
    print(f"replayed {report.events} events into schema {report.schema!r} in {report.seconds:.2f}s"
          f" ({report.rate:,.0f} events/s): " + ", ".join(f"{k}={v}" for k, v in report.per_consumer.items()))
    if report.live_digests:
        for table, digest in report.digests.items():
            live = report.live_digests.get(table)
            print(f"  {table:22} {digest}  {'equal' if digest == live else 'DIFFERS from live ' + str(live)}")
        print("verify: " + ("reproducible (every table equal)" if report.equal else "MISMATCH"))


def main(argv: list[str] | None = None) -> int:
    """Command line entry; exit 1 when verification finds a difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schema", default="replay")
    parser.add_argument("--verify", action="store_true")
    args = parser.parse_args(argv)
    configure_logging("replay", "WARNING")
    report = asyncio.run(run(args.schema, args.verify))
    print_report(report)
    return 0 if (not args.verify or report.equal) else 1


if __name__ == "__main__":
    sys.exit(main())
