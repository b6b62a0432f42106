"""The worker's outbox: what a worker and its trials report is on disk before anyone is told "done".

Every event about a run (TrialStarted, log batches, AllocationExited, and what trials report through
their link) is appended to a local SQLite file (WAL, ``synchronous=FULL``: the append survives a crash
or a power cut once it returned) and only then acknowledged to its producer. One publisher task drains
the file in append order, publishing each row with its event's deterministic ``Nats-Msg-Id`` and
deleting rows only after JetStream acked them. A NATS outage (timeouts, disconnects, no responders)
is waited out with backoff, however long it lasts; nothing is dropped. A worker that crashed leaves
the file behind and its next process publishes what is left, before it heartbeats.

Two parts: ``OutboxFile`` (the SQLite rows, synchronous, no network) and ``Outbox`` (the asyncio
shell: one thread owns the file, one task publishes). ``row_for`` and ``Backoff`` are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import msgspec
import structlog

from schemas import events as ev
from schemas.subjects import dedupe_key, routing_subject

log = structlog.get_logger(__name__)

T = TypeVar("T")

# NATS's default max_payload; the shell passes the server's own when it knows it.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
# Rows read per round; acked rows are deleted per round (one fsync), and before waiting out a failure.
DRAIN_BATCH = 256
# Payload bytes of appended rows kept in memory until published (beyond it, the drain reads the file).
CACHE_BYTES = 64 * 1024 * 1024

_ENCODER = msgspec.json.Encoder()

# Publishes one encoded event: (subject, payload, Nats-Msg-Id). Raises on any failure.
PublishRaw = Callable[[str, bytes, str], Awaitable[object]]
Event = ev.DomainEvent | ev.MetricEvent | ev.LogEvent


class OversizedEvent(ValueError):
    """An event too big for one bus message: refused at append, so it can never block the drain."""


class PendingRow(NamedTuple):
    """An event encoded for the outbox: where it goes, its dedupe key, its bytes."""

    subject: str
    msg_id: str
    payload: bytes
    kind: str  # the event's type name
    allocation_id: str  # "" for events without one


class OutboxRow(NamedTuple):
    """A stored row; ``id`` is the append order."""

    id: int
    subject: str
    msg_id: str
    payload: bytes
    kind: str
    allocation_id: str


def row_for(event: Event, max_payload: int = DEFAULT_MAX_PAYLOAD) -> PendingRow:
    """Encode ``event`` as the bus will carry it; OversizedEvent past ``max_payload`` bytes."""
    payload = _ENCODER.encode(event)
    if len(payload) > max_payload:
        raise OversizedEvent(f"{type(event).__name__} of {len(payload)} bytes is over the bus limit "
                             f"of {max_payload} bytes")
    # The routing subject only: Bus.publish_raw adds this worker's publisher token (w-<worker id>) when it sends.
    return PendingRow(routing_subject(event), dedupe_key(event), payload, type(event).__name__,
                      str(getattr(event, "allocation_id", "") or ""))


class Backoff:
    """Retry delays: ``first``, doubling, capped at ``cap``; ``reset`` after a success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next try."""
        delay = min(self.cap, self.first * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Back to the first delay."""
        self.attempts = 0


class OutboxLocked(RuntimeError):
    """Another process has this outbox open (two workers with one id on one host)."""


class OutboxFile:
    """The rows on disk. Synchronous; use it from one thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One process per outbox: two drainers would publish the same rows out of order.
        self._lock_fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise OutboxLocked(f"{path} is in use by another process") from None
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is fsynced before it returns, so an acknowledged append survives a crash.
        self._db.execute("PRAGMA synchronous=FULL")
        # AUTOINCREMENT: ids never go back, even after the table was emptied, so append order holds
        # across restarts.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " subject TEXT NOT NULL, msg_id TEXT NOT NULL, payload BLOB NOT NULL,"
            " kind TEXT NOT NULL, allocation_id TEXT NOT NULL DEFAULT '')"
        )

    def append(self, rows: Sequence[PendingRow]) -> list[int]:
        """Store rows in one transaction (durable on return, one fsync); their ids, in order."""
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            ids = []
            for r in rows:
                cur.execute("INSERT INTO outbox (subject, msg_id, payload, kind, allocation_id) VALUES (?,?,?,?,?)",
                            (r.subject, r.msg_id, r.payload, r.kind, r.allocation_id))
                ids.append(int(cur.lastrowid or 0))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return ids

    def head(self, limit: int = DRAIN_BATCH, after: int = 0) -> list[OutboxRow]:
        """The oldest rows with ids above ``after``, in append order."""
        rows = self._db.execute(
            "SELECT id, subject, msg_id, payload, kind, allocation_id FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit)).fetchall()
        return [OutboxRow(int(i), s, m, bytes(p), k, a) for i, s, m, p, k, a in rows]

    def delete_through(self, row_id: int) -> None:
        """Forget every row up to ``row_id`` (JetStream has them).

        Not fsynced on its own (``synchronous=NORMAL`` for this commit; the next append's fsync carries
        it): a delete lost to a power cut only republishes rows JetStream already holds, with their
        ``Nats-Msg-Id``, so it drops them as duplicates.
        """
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute("DELETE FROM outbox WHERE id <= ?", (row_id,))
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def count(self) -> int:
        """How many rows wait."""
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def last_id(self) -> int:
        """The highest id ever given out (0 for a new file)."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return int(row[0]) if row else 0

    def exited_allocations(self) -> list[str]:
        """Allocations whose AllocationExited still waits here, in append order."""
        rows = self._db.execute("SELECT allocation_id FROM outbox WHERE kind = 'AllocationExited' ORDER BY id")
        return list(dict.fromkeys(a for (a,) in rows))

    def close(self) -> None:
        """Close the database and release the lock."""
        with contextlib.suppress(Exception):
            self._db.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


class Outbox:
    """Durable append, ordered publish. ``start()``, ``append()``..., ``close()``."""

    def __init__(self, path: Path, publish: PublishRaw, *, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 backoff: Callable[[], Backoff] = Backoff, batch: int = DRAIN_BATCH) -> None:
        self.path = path
        self._publish = publish
        self.max_payload = max_payload
        self._backoff = backoff
        self._batch = batch
        # One thread owns the file: appends and deletes run in the order they were asked for.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._file: OutboxFile | None = None
        self._task: asyncio.Task[None] | None = None
        # Group commit: appends asked for while one commits wait here and go in the next transaction.
        self._queued: list[tuple[list[PendingRow], asyncio.Future[int]]] = []
        self._committer: asyncio.Task[None] | None = None
        # Rows appended by this process and not yet published, so the drain need not read them back.
        self._cache: dict[int, OutboxRow] = {}
        self._cache_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self.last_appended = 0
        # Every row up to this id has been acked by JetStream (deleted or about to be).
        self.published_through = 0
        self._deleted_through = 0
        # Left by an earlier process: allocations whose exit it had not published yet.
        self.inherited_exits: list[str] = []
        self.inherited_rows = 0

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def start(self) -> None:
        """Open the file and start publishing what it holds, then whatever is appended."""
        self._file = await self._io(OutboxFile, self.path)
        f = self._file
        self.inherited_rows = await self._io(f.count)
        self.inherited_exits = await self._io(f.exited_allocations)
        self.last_appended = await self._io(f.last_id)
        head = await self._io(f.head, 1)
        self.published_through = self._deleted_through = (head[0].id - 1) if head else self.last_appended
        if self.inherited_rows:
            log.info("outbox.inherited", path=str(self.path), rows=self.inherited_rows,
                     exits=self.inherited_exits)
        self._task = asyncio.create_task(self._drain_forever(), name="outbox-drain")

    async def append(self, event: Event) -> int:
        """Store ``event`` durably, then return its row id (its place in publish order)."""
        return await self.append_many([event])

    async def append_many(self, events: Sequence[Event]) -> int:
        """Store events in one transaction, in order; the last one's row id.

        Appends asked for while another commits are grouped into the next transaction (one fsync for
        all of them), in the order they were asked for; each returns once its own rows are durable.
        """
        if self._file is None:
            raise RuntimeError("the outbox is not open")
        rows = [row_for(e, self.max_payload) for e in events]  # OversizedEvent before anything is stored
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queued.append((rows, done))
        if self._committer is None or self._committer.done():
            # Its own task: a caller cancelled mid-commit (a trial hanging up) must not fail the others.
            self._committer = asyncio.create_task(self._commit_queued(), name="outbox-commit")
        return await asyncio.shield(done)

    async def _commit_queued(self) -> None:
        while self._queued:
            group, self._queued = self._queued, []
            try:
                await self._commit(group)
            except BaseException as exc:  # the transaction rolled back (or the outbox closed): none is stored
                error = exc if isinstance(exc, Exception) else RuntimeError("the outbox closed during the append")
                for _, done in group + self._queued:
                    if not done.done():
                        done.set_exception(error)
                self._queued = []
                if not isinstance(exc, Exception):
                    raise

    async def _commit(self, group: list[tuple[list[PendingRow], asyncio.Future[int]]]) -> None:
        assert self._file is not None
        rows = [r for batch, _ in group for r in batch]
        ids = await self._io(self._file.append, rows)
        for row_id, r in zip(ids, rows, strict=True):
            if self._cache_bytes + len(r.payload) <= CACHE_BYTES:
                self._cache[row_id] = OutboxRow(row_id, r.subject, r.msg_id, r.payload, r.kind, r.allocation_id)
                self._cache_bytes += len(r.payload)
        self.last_appended = max(self.last_appended, ids[-1] if ids else 0)
        at = 0
        for batch, done in group:
            at += len(batch)
            if not done.done():
                done.set_result(ids[at - 1] if batch else self.last_appended)
        self._idle.clear()
        self._wake.set()

    def _head(self, after: int) -> list[OutboxRow] | None:
        """The next rows from memory, when the first of them is there; None to read the file."""
        rows: list[OutboxRow] = []
        nxt = after + 1
        while len(rows) < self._batch and (row := self._cache.get(nxt)) is not None:
            rows.append(row)
            nxt += 1
        return rows or None

    def _forget(self, row: OutboxRow) -> None:
        if self._cache.pop(row.id, None) is not None:
            self._cache_bytes -= len(row.payload)

    def published(self, row_id: int) -> bool:
        """Whether the row with this id has reached JetStream."""
        return row_id <= self.published_through

    async def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait until every row appended so far is published; False on timeout."""
        target = self.last_appended
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.published_through < target:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), min(left, 0.5) if left is not None else 0.5)
        return True

    async def _drain_forever(self) -> None:
        assert self._file is not None
        f = self._file
        while True:
            # Cleared before reading: an append committed after this point sets it again.
            self._wake.clear()
            rows = self._head(self.published_through) or await self._io(f.head, self._batch, self.published_through)
            if not rows:
                await self._delete_acked()
                self._idle.set()
                await self._wake.wait()
                continue
            for row in rows:
                await self._publish_row(row)
                self.published_through = row.id
                self._forget(row)
            await self._delete_acked()
            self._idle.set()

    async def _publish_row(self, row: OutboxRow) -> None:
        """Publish until JetStream acks: every failure is waited out (never dropped, never skipped)."""
        backoff = self._backoff()
        first_failure = 0.0
        last_log = 0.0
        while True:
            try:
                await self._publish(row.subject, row.payload, row.msg_id)
            except Exception as exc:  # noqa: BLE001 - a NATS outage shows up as many error types; all wait
                now = time.monotonic()
                if not first_failure:
                    first_failure = now
                    # What is acked is deleted now: a long outage plus a crash must not republish it
                    # after the dedupe window.
                    await self._delete_acked()
                if now - last_log >= 30.0:
                    last_log = now
                    log.warning("outbox.publish_retry", row=row.id, kind=row.kind, subject=row.subject,
                                attempts=backoff.attempts + 1, waiting_s=round(now - first_failure, 1),
                                error=repr(exc))
                await asyncio.sleep(backoff.next())
                continue
            if first_failure:
                log.info("outbox.publish_resumed", row=row.id, kind=row.kind,
                         waited_s=round(time.monotonic() - first_failure, 1))
            return

    async def _delete_acked(self) -> None:
        if self._file is not None and self.published_through > self._deleted_through:
            through = self.published_through
            await self._io(self._file.delete_through, through)
            self._deleted_through = through

    async def close(self) -> None:
        """Stop publishing, forget what JetStream acked, close the file. Rows left wait for the next start."""
        if self._committer is not None:  # appends already asked for are stored (or refused) first
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._committer
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._file is not None:
            with contextlib.suppress(Exception):
                await self._delete_acked()
            await self._io(self._file.close)
            self._file = None
        self._pool.shutdown(wait=True)
