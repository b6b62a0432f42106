"""Replay: rebuild every projection from the streams into a fresh schema, verify it, and swap it in.

``python -m services.tracker.replay [--schema NAME] [--verify] [--swap]`` (or ``kiln events replay``) reads
each stream from its first message with an ordered consumer and folds it through the same projection the
tracker runs, into a new Postgres schema. With ``--verify`` it replays exactly up to the live tracker's
recorded positions and compares a digest of every table with the live schema: equal digests mean the
read model is reproducible from the log alone.

``--swap`` repairs a damaged read model: it rebuilds up to the live positions (the digests show which live
tables differ), checks the rebuild with a second one (same digests, table by table), catches it up to the
ends of the streams, and then, in one transaction, moves the live tables into a backup schema
(``kiln_backup_<UTC time>``) and the rebuilt ones into the live schema. The rebuilt ``projection_positions``
move with them, so the live tracker goes on from where the rebuild stopped. See ``swap``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import msgspec

from schemas import readmodel
from services.runtime import (
    BusSettings,
    ConsumerSpec,
    configure_logging,
    connect_bus,
    is_transient,
    read_settings,
)
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
    "deleted_experiments": "id",
    "deleted_trials": "trial_id",
    "models": "id",
    "model_versions": "model_id, version",
    "projection_positions": "consumer",
}
BACKUP_PREFIX = "kiln_backup_"
# How long the swap waits for the live tables' locks (a tracker batch, a gateway read) before giving up.
SWAP_LOCK_TIMEOUT = "30s"
# Tables fed by a stream with bounded retention: rows whose messages have aged out of the stream cannot be
# rebuilt, so the swap carries them over from the live table (rows are immutable facts keyed by line).
RETAINED = {"tracker-logs": ["trial_logs"]}


class SwapRefused(RuntimeError):
    """The swap was not done, and nothing live was changed; the message says why."""


class ReplayReport(msgspec.Struct, kw_only=True):
    """What a replay did."""

    schema: str
    events: int
    seconds: float
    per_consumer: dict[str, int]
    digests: dict[str, str] = {}
    live_digests: dict[str, str] = {}
    # --swap: the second rebuild's digests, events caught up after the first, where the old tables went.
    check_digests: dict[str, str] = {}
    caught_up: int = 0
    caught_up_held: int = 0  # of those, caught up while the live tracker was held by the swap's lock
    carried_over: dict[str, int] = {}
    swapped: bool = False
    backup: str = ""
    dropped_backups: list[str] = []

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


async def _read_chunks(bus: Any, spec: ConsumerSpec, decoder: msgspec.json.Decoder[Any], start_seq: int,
                       limit: int | None, chunks: asyncio.Queue[list[Item] | None]) -> None:
    """Read a consumer's subjects in order into chunks of ``BATCH`` items; ``None`` marks the end."""
    items: list[Item] = []
    try:
        for subject in spec.filter_subjects:
            async with contextlib.aclosing(bus.read(spec.stream, subject, decoder, start_seq=start_seq)) as stream:
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


async def _project(bus: Any, conn: Any, spec: ConsumerSpec, kind: type, start_seq: int, limit: int | None) -> int:
    """Fold one consumer's events from ``start_seq`` (up to ``limit``) into the schema on the search path."""
    # Reading and projecting overlap: while Postgres applies one chunk, the next is read and decoded.
    chunks: asyncio.Queue[list[Item] | None] = asyncio.Queue(maxsize=2)
    reader = asyncio.create_task(_read_chunks(bus, spec, msgspec.json.Decoder(kind), start_seq, limit, chunks))
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
    return n


async def replay(bus: Any, conn: Any, schema: str, up_to: dict[str, int] | None = None) -> ReplayReport:
    """Rebuild the read model into ``schema`` (dropped first) from every stream; ``up_to`` caps each consumer."""
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await readmodel.migrate(conn, schema)
    await conn.execute(f'SET search_path TO "{schema}"')
    started = time.perf_counter()
    counts: dict[str, int] = {}
    try:
        for spec, kind in CONSUMERS:
            limit = (up_to or {}).get(spec.durable)
            if up_to is not None and not limit:
                counts[spec.durable] = 0
                continue
            counts[spec.durable] = await _project(bus, conn, spec, kind, 1, limit)
    finally:
        await conn.execute("SET search_path TO public")
    seconds = time.perf_counter() - started
    return ReplayReport(schema=schema, events=sum(counts.values()), seconds=seconds, per_consumer=counts)


async def catch_up(bus: Any, conn: Any, schema: str, to: dict[str, int]) -> int:
    """Fold into ``schema`` every event after its recorded positions up to ``to``; return how many."""
    have = await positions(conn, schema)
    await conn.execute(f'SET search_path TO "{schema}"')
    n = 0
    try:
        for spec, kind in CONSUMERS:
            start, limit = have.get(spec.durable, 0), to.get(spec.durable, 0)
            if limit > start:
                n += await _project(bus, conn, spec, kind, start + 1, limit)
    finally:
        await conn.execute("SET search_path TO public")
    return n


async def stream_ends(bus: Any) -> dict[str, int]:
    """Per consumer, the last seq of its stream now (0 for a stream not there)."""
    ends: dict[str, int] = {}
    for spec, _ in CONSUMERS:
        bounds = await bus.stream_bounds(spec.stream)
        ends[spec.durable] = bounds[1] if bounds is not None else 0
    return ends


async def _aged_out(bus: Any) -> list[str]:
    """Consumers in ``RETAINED`` whose stream no longer holds its first messages."""
    out = []
    for spec, _ in CONSUMERS:
        if spec.durable in RETAINED:
            bounds = await bus.stream_bounds(spec.stream)
            if bounds is not None and bounds[0] > 1:
                out.append(spec.durable)
    return out


# Tables the migrations make that are not projections of the event log: the gateway owns them, a rebuild has
# them empty, and a swap must leave the live ones in place (users and their tokens would be lost otherwise, and
# the rebuilt experiment id counter starts at 0: ids would be handed out again).
NOT_PROJECTED = ("schema_migrations", "users", "api_tokens", "id_counters")


async def _tables(conn: Any, schema: str) -> list[str]:
    """The read-model tables of a schema (what the migrations made, less what is not projected)."""
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1 AND tablename <> ALL($2::text[])"
                            " ORDER BY tablename", schema, list(NOT_PROJECTED))
    return [r["tablename"] for r in rows]


async def _versions(conn: Any, schema: str) -> list[int]:
    try:
        rows = await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations ORDER BY 1')
    except asyncpg.UndefinedTableError:
        return []  # never migrated
    return [r["version"] for r in rows]


async def swap(bus: Any, conn: Any, swap_conn: Any, schema: str = "replay", live_schema: str = "public",
               keep_backups: int = 2) -> ReplayReport:
    """Rebuild the read model into ``schema``, check it, and make it the live one in one transaction.

    ``conn`` rebuilds; ``swap_conn`` holds the live tables' locks while ``conn`` catches up the last events.

    1. Rebuild up to the live positions and digest both (which live tables differ is what gets repaired).
    2. Rebuild a second time into ``<schema>_check``: every table's digest must be equal, or nothing is
       swapped (a rebuild cut short by the bus would otherwise replace good rows with missing ones).
    3. Catch the rebuild up to the ends of the streams, outside any lock (events the tracker applied
       meanwhile).
    4. In one transaction on ``swap_conn``: lock the live ``projection_positions`` (every tracker batch
       locks its position row first, so no batch is half-way and none starts), catch up the events that
       came since (on ``conn``), lock the remaining tables, move the live tables into a new backup schema
       and the rebuilt ones into the live schema. The live sequence of experiment ids and the migration
       record stay where they are. A tracker batch waiting on the lock then runs against the rebuilt
       tables: Postgres re-resolves a cached plan's table names when a table it used moves (plan cache
       invalidation), for the tracker's and the gateway's prepared statements alike.
    5. Drop the leftovers of ``schema`` and backups beyond the newest ``keep_backups``.

    Events past the rebuilt positions are applied by the live tracker as it receives them; those at or
    below (already in the rebuild) it skips.
    """
    if schema == live_schema or schema.startswith(BACKUP_PREFIX):
        raise SwapRefused(f"cannot rebuild into schema {schema!r}: it is the live one or a backup")
    if await _versions(conn, live_schema) != [v for v, _ in readmodel.migrations()]:
        raise SwapRefused(f"the live schema {live_schema!r} is at other migrations than this replay: start the"
                          " services of this version (they migrate it) before swapping")
    check_schema = f"{schema}_check"
    up_to = await positions(conn, live_schema)
    report = await replay(bus, conn, schema, up_to)
    report.digests = await digests(conn, schema)
    report.live_digests = await digests(conn, live_schema)
    await replay(bus, conn, check_schema, up_to)
    report.check_digests = await digests(conn, check_schema)
    await conn.execute(f'DROP SCHEMA "{check_schema}" CASCADE')
    if report.check_digests != report.digests:
        return report  # not swapped: the rebuild is not reproducible
    tables = await _tables(conn, schema)
    live_tables = set(await _tables(conn, live_schema))
    if missing := [t for t in tables if t not in live_tables]:
        raise SwapRefused(f"the live schema {live_schema!r} lacks the tables {missing}")
    report.caught_up = await catch_up(bus, conn, schema, await stream_ends(bus))
    for consumer in await _aged_out(bus):
        for table in RETAINED[consumer]:
            # Rows whose messages aged out of a bounded stream are known only to the live table.
            status = await conn.execute(f'INSERT INTO "{schema}".{table} SELECT * FROM "{live_schema}".{table}'
                                        " ON CONFLICT DO NOTHING")
            report.carried_over[table] = int(status.split()[-1])
    backup = BACKUP_PREFIX + dt.datetime.now(dt.UTC).strftime("%Y%m%d_%H%M%S_%f")  # sorts by time
    try:
        async with swap_conn.transaction():
            await swap_conn.execute(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'")
            await swap_conn.execute(f'LOCK TABLE "{live_schema}".projection_positions IN ACCESS EXCLUSIVE MODE')
            # The tracker is held now: the stream ends read here bound everything it has applied.
            report.caught_up_held = await catch_up(bus, conn, schema, await stream_ends(bus))
            report.caught_up += report.caught_up_held
            await swap_conn.execute("LOCK TABLE " + ", ".join(f'"{s}".{t}' for s in (live_schema, schema)
                                                              for t in tables) + " IN ACCESS EXCLUSIVE MODE")
            await swap_conn.execute(f'CREATE SCHEMA "{backup}"')
            for table in tables:
                await swap_conn.execute(f'ALTER TABLE "{live_schema}".{table} SET SCHEMA "{backup}"')
            for table in tables:
                await swap_conn.execute(f'ALTER TABLE "{schema}".{table} SET SCHEMA "{live_schema}"')
    except asyncpg.exceptions.LockNotAvailableError as exc:
        raise SwapRefused(f"the live tables stayed in use for over {SWAP_LOCK_TIMEOUT}; nothing was changed,"
                          " run it again") from exc
    report.swapped, report.backup = True, backup
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    backups = [r["nspname"] for r in await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1) ORDER BY nspname DESC", BACKUP_PREFIX)]
    for old in backups[max(keep_backups, 1):]:
        await conn.execute(f'DROP SCHEMA "{old}" CASCADE')
        report.dropped_backups.append(old)
    return report


T = TypeVar("T")

# Waits before a replay starts over after PostgreSQL or NATS went away under it (the last one repeats).
_OUTAGE_BACKOFF_S = (1.0, 2.0, 5.0)


async def _waiting_out_outages(attempt: Callable[[], Awaitable[T]], what: str) -> T:
    """Run ``attempt`` until it finishes; an outage (``is_transient``) makes it start over once the part is
    back. A rebuild goes into a schema of its own that each attempt drops first, so starting over is safe;
    ``swap`` changes the live schema only in its last transaction, which commits whole or not at all."""
    failures = 0
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = _OUTAGE_BACKOFF_S[min(failures, len(_OUTAGE_BACKOFF_S) - 1)]
            failures += 1
            print(f"{what}: a server is unavailable ({exc!r}); starting over in {delay:.0f}s", file=sys.stderr,
                  flush=True)
            await asyncio.sleep(delay)


async def run(schema: str, verify: bool, live_schema: str = "public") -> ReplayReport:
    """Connect with the tracker's settings, replay, and verify if asked; outages are waited out."""
    return await _waiting_out_outages(lambda: _run_once(schema, verify, live_schema), "replay")


async def _run_once(schema: str, verify: bool, live_schema: str) -> ReplayReport:
    settings = read_settings(TrackerSettings)
    async with connect_bus(read_settings(BusSettings), "replay", ensure=False) as bus:
        conn = await asyncpg.connect(settings.pg_dsn)
        try:
            up_to: dict[str, int] | None = None
            live: dict[str, str] = {}
            if verify:
                # The live positions and the live tables from one snapshot (the tracker commits a batch's rows with
                # its position): a tracker that goes on meanwhile cannot make an equal model look different.
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    up_to = await positions(conn, live_schema)
                    live = await digests(conn, live_schema)
            report = await replay(bus, conn, schema, up_to)
            if verify:
                report.digests = await digests(conn, schema)
                report.live_digests = live
            return report
        finally:
            await conn.close()


async def run_swap(schema: str, keep_backups: int = 2) -> ReplayReport:
    """Connect with the tracker's settings and ``swap``; outages are waited out."""
    return await _waiting_out_outages(lambda: _run_swap_once(schema, keep_backups), "replay --swap")


async def _run_swap_once(schema: str, keep_backups: int) -> ReplayReport:
    settings = read_settings(TrackerSettings)
    async with connect_bus(read_settings(BusSettings), "replay", ensure=False) as bus:
        conn = await asyncpg.connect(settings.pg_dsn)
        swap_conn = await asyncpg.connect(settings.pg_dsn)
        try:
            return await swap(bus, conn, swap_conn, schema, keep_backups=keep_backups)
        finally:
            await swap_conn.close()
            await conn.close()


def print_report(report: ReplayReport) -> None:
    """Human-readable summary, one line per table when verifying."""
    print(f"replayed {report.events} events into schema {report.schema!r} in {report.seconds:.2f}s"
          f" ({report.rate:,.0f} events/s): " + ", ".join(f"{k}={v}" for k, v in report.per_consumer.items()))
    if report.check_digests:
        _print_swap(report)
        return
    if report.live_digests:
        for table, digest in report.digests.items():
            live = report.live_digests.get(table)
            print(f"  {table:22} {digest}  {'equal' if digest == live else 'DIFFERS from live ' + str(live)}")
        print("verify: " + ("reproducible (every table equal)" if report.equal else "MISMATCH"))


def _print_swap(report: ReplayReport) -> None:
    for table, digest in report.digests.items():
        again = report.check_digests.get(table)
        live = "equal to live" if digest == report.live_digests.get(table) else "live DIFFERS: replaced"
        print(f"  {table:22} {digest}  " + (live if digest == again else f"NOT REPRODUCIBLE (second rebuild: {again})"))
    if not report.swapped:
        print(f"swap: NOT done, a second rebuild gave other digests; the live read model is left as it is (the"
              f" first rebuild stays in schema {report.schema!r})")
        return
    print(f"swap: the rebuild (checked by a second one, every table equal) is the live read model now;"
          f" {report.caught_up} events that came meanwhile were caught up first ({report.caught_up_held} of them"
          " while the tracker was held)")
    for table, n in report.carried_over.items():
        print(f"swap: carried over {n} rows of {table} whose messages aged out of their stream")
    print(f"swap: the previous read model is kept in schema {report.backup!r}"
          + (f"; dropped older backups {', '.join(report.dropped_backups)}" if report.dropped_backups else ""))


def main(argv: list[str] | None = None) -> int:
    """Command line entry; exit 1 when verification finds a difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schema", default="replay")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--swap", action="store_true", help="replace the live read model with a checked rebuild")
    parser.add_argument("--keep-backups", type=int, default=2, help="backup schemas kept after a swap")
    args = parser.parse_args(argv)
    configure_logging("replay", "WARNING")
    if args.swap:
        try:
            report = asyncio.run(run_swap(args.schema, args.keep_backups))
        except SwapRefused as exc:
            print(f"swap: NOT done: {exc}")
            return 2
        print_report(report)
        return 0 if report.swapped else 1
    report = asyncio.run(run(args.schema, args.verify))
    print_report(report)
    return 0 if (not args.verify or report.equal) else 1


if __name__ == "__main__":
    sys.exit(main())
