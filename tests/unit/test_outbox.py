"""The worker outbox: rows in append order on a real SQLite file, kept until published, never dropped.

No network: the publisher is a fake that can fail. The file is a real SQLite file in tmp_path: what it keeps
across processes is the point of the outbox.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from schemas import events as ev
from services.worker import outbox as outbox_mod
from services.worker.main import Worker
from services.worker.outbox import (
    Backoff,
    Outbox,
    OutboxFile,
    OutboxLocked,
    OversizedEvent,
    PendingRow,
    row_for,
)


def _logs(n: int, alloc: str = "7.1") -> ev.LogsShipped:
    return ev.LogsShipped(experiment_id=3, trial_id=7, allocation_id=alloc,
                          lines=[ev.LogLine(line_no=n, stream="stdout", text=f"line {n}", ts=0.0)])


def _exited(alloc: str = "7.1") -> ev.AllocationExited:
    return ev.AllocationExited(experiment_id=3, trial_id=7, allocation_id=alloc, worker_id="w", exit_code=0,
                               exited_at=1.0)


class FakeBus:
    """Records what was published; the first ``fail`` calls raise a timeout, as NATS does while it is away."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls = 0
        self.published: list[tuple[str, bytes, str]] = []

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> object:
        self.calls += 1
        if self.fail > 0:
            self.fail -= 1
            raise TimeoutError("nats: timeout")
        self.published.append((subject, payload, msg_id))
        return None


def _fast() -> Backoff:
    return Backoff(first=0.001, cap=0.01)


# --- pure parts --------------------------------------------------------------------------------


def test_a_row_is_the_event_as_the_bus_carries_it() -> None:
    row = row_for(_exited())
    assert row.subject == "kiln.events.3.trial.7"
    assert row.msg_id == "AllocationExited:7.1"
    assert msgspec.json.decode(row.payload, type=ev.DomainEvent) == _exited()
    assert (row.kind, row.allocation_id) == ("AllocationExited", "7.1")
    metrics = ev.TrainingMetricsReported(experiment_id=3, trial_id=7, batch_id="7.1:1", points=[])
    assert row_for(metrics).allocation_id == "" and row_for(metrics).subject == "kiln.metrics.3.7"


def test_an_event_too_big_for_the_bus_is_refused_at_append() -> None:
    big = ev.LogsShipped(experiment_id=3, trial_id=7, allocation_id="7.1",
                         lines=[ev.LogLine(line_no=0, stream="stdout", text="x" * 2000, ts=0.0)])
    with pytest.raises(OversizedEvent, match="LogsShipped"):
        row_for(big, max_payload=1000)


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    b = Backoff(first=0.1, cap=1.0)
    assert [b.next() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next() == 0.1


# --- the file ----------------------------------------------------------------------------------


def _pending(i: int) -> PendingRow:
    return PendingRow(f"s.{i}", f"m{i}", f"p{i}".encode(), "LogsShipped", "")


def test_rows_come_back_in_append_order_and_go_only_when_deleted(tmp_path: Path) -> None:
    f = OutboxFile(tmp_path / "outbox.sqlite")
    assert f.append([_pending(1), _pending(2)]) == [1, 2]
    assert f.append([_pending(3)]) == [3]
    assert [r.msg_id for r in f.head()] == ["m1", "m2", "m3"]
    assert [r.msg_id for r in f.head(limit=1, after=1)] == ["m2"]
    f.delete_through(2)
    assert [r.id for r in f.head()] == [3] and f.count() == 1
    f.close()


def test_the_file_keeps_rows_and_ids_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    f = OutboxFile(path)
    f.append([_pending(1), PendingRow("s", "AllocationExited:7.1", b"{}", "AllocationExited", "7.1"), _pending(3)])
    f.delete_through(3)
    f.append([_pending(4)])
    f.close()
    again = OutboxFile(path)
    assert [(r.id, r.payload) for r in again.head()] == [(4, b"p4")]
    # Ids never go back, even after the table was emptied: append order holds across restarts.
    again.delete_through(4)
    assert again.append([_pending(5)]) == [5]
    assert again.exited_allocations() == []
    again.append([PendingRow("s", "AllocationExited:8.1", b"{}", "AllocationExited", "8.1")])
    assert again.exited_allocations() == ["8.1"]
    again.close()


def test_one_process_at_a_time_owns_an_outbox(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    f = OutboxFile(path)
    with pytest.raises(OutboxLocked):
        OutboxFile(path)
    f.close()
    OutboxFile(path).close()


# --- the shell, with a fake bus ---------------------------------------------------------------


async def test_events_are_published_in_append_order_each_once_after_failures(tmp_path: Path) -> None:
    bus = FakeBus(fail=5)
    box = Outbox(tmp_path / "outbox.sqlite", bus.publish, backoff=_fast, batch=3)
    await box.start()
    ids = [await box.append(_logs(i)) for i in range(10)]
    last = await box.append_many([_logs(10), _exited()])
    assert ids == list(range(1, 11)) and last == 12
    assert await box.wait_drained(timeout=10.0)
    assert [m for _, _, m in bus.published] == [f"LogsShipped:7.1:{i}" for i in range(11)] + ["AllocationExited:7.1"]
    assert bus.calls == 12 + 5  # the failures were retried, nothing skipped
    assert box.published(12) and not box.published(13)
    await box.close()
    f = OutboxFile(tmp_path / "outbox.sqlite")
    assert f.count() == 0  # published rows are gone from the file
    f.close()


class CountingFile(OutboxFile):
    """The real file, counting transactions (each one is one fsync); ``fail_next`` makes the next one fail."""

    commits = 0
    fail_next = False

    def append(self, rows):  # type: ignore[no-untyped-def]
        if CountingFile.fail_next:
            CountingFile.fail_next = False
            raise sqlite3.OperationalError("disk I/O error")
        CountingFile.commits += 1
        return super().append(rows)


async def test_appends_asked_for_together_share_one_commit_and_keep_their_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials reporting at once cost one fsync per group, not per batch; each caller gets its own row id."""
    monkeypatch.setattr(outbox_mod, "OutboxFile", CountingFile)
    CountingFile.commits = 0
    bus = FakeBus(fail=10**9)  # nothing leaves, so the file holds everything
    box = Outbox(tmp_path / "outbox.sqlite", bus.publish, backoff=_fast)
    await box.start()
    ids = await asyncio.gather(*(box.append(_logs(i)) for i in range(20)))
    assert ids == list(range(1, 21))  # in the order asked for, each its own id
    assert CountingFile.commits < 20  # grouped: the first commits alone, the 19 that queued behind it together
    # A failing commit fails its whole group (nothing of it is stored) and the next group still goes in.
    CountingFile.fail_next = True
    results = await asyncio.gather(*(box.append(_logs(i)) for i in range(20, 23)), return_exceptions=True)
    assert all(isinstance(r, sqlite3.OperationalError) for r in results)
    assert await box.append(_logs(23)) == 21
    bus.fail = 0
    assert await box.wait_drained(timeout=5.0)
    assert [m for _, _, m in bus.published] == [f"LogsShipped:7.1:{i}" for i in (*range(20), 23)]
    await box.close()


async def test_an_outage_is_waited_out_however_long_it_lasts(tmp_path: Path) -> None:
    bus = FakeBus(fail=10**9)
    box = Outbox(tmp_path / "outbox.sqlite", bus.publish, backoff=_fast)
    await box.start()
    await box.append(_logs(0))
    await box.append(_exited())
    assert not await box.wait_drained(timeout=0.3)
    assert bus.calls > 10 and bus.published == []
    bus.fail = 0  # the bus is back
    assert await box.wait_drained(timeout=5.0)
    assert [m for _, _, m in bus.published] == ["LogsShipped:7.1:0", "AllocationExited:7.1"]
    await box.close()


async def test_a_fresh_outbox_publishes_what_the_previous_one_left(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    down = FakeBus(fail=10**9)
    first = Outbox(path, down.publish, backoff=_fast)
    await first.start()
    await first.append(_logs(0, "9.1"))
    await first.append(_exited("9.1"))
    await first.append(_logs(1, "9.2"))
    await asyncio.sleep(0.05)
    await first.close()  # the worker stops (or dies) with the bus still away

    up = FakeBus()
    second = Outbox(path, up.publish, backoff=_fast)
    await second.start()
    assert second.inherited_rows == 3 and second.inherited_exits == ["9.1"]
    assert await second.wait_drained(timeout=5.0)
    assert [m for _, _, m in up.published] == ["LogsShipped:9.1:0", "AllocationExited:9.1", "LogsShipped:9.2:1"]
    assert await second.append(_logs(2, "9.2")) == 4  # new rows come after the inherited ones
    assert await second.wait_drained(timeout=5.0)
    await second.close()


async def test_a_row_acked_before_a_crash_is_republished_with_its_msg_id(tmp_path: Path) -> None:
    """Published but not yet deleted (a kill between ack and delete): sent again, same Nats-Msg-Id."""
    path = tmp_path / "outbox.sqlite"
    f = OutboxFile(path)
    f.append([row_for(_logs(0))])
    f.close()
    bus = FakeBus()
    box = Outbox(path, bus.publish, backoff=_fast)
    await box.start()
    assert await box.wait_drained(timeout=5.0)
    await box.close()
    assert [m for _, _, m in bus.published] == ["LogsShipped:7.1:0"]


def test_heartbeats_list_an_exit_as_finished_until_it_is_published_and_a_while_after() -> None:
    """The scheduler must not judge a run lost whose AllocationExited still waits in the outbox."""
    published_through = 0
    outbox = SimpleNamespace(published=lambda row: row <= published_through)
    worker = SimpleNamespace(exiting={"7.1": 5}, finished=OrderedDict(), outbox=outbox)
    assert Worker.finished_ids(worker, now=1000.0) == ["7.1"]  # type: ignore[arg-type]
    # However long the bus was away.
    assert Worker.finished_ids(worker, now=5000.0) == ["7.1"]  # type: ignore[arg-type]
    published_through = 5
    assert Worker.finished_ids(worker, now=5001.0) == ["7.1"]  # type: ignore[arg-type]
    assert worker.exiting == {} and list(worker.finished) == ["7.1"]
    assert Worker.finished_ids(worker, now=5001.0 + 121.0) == []  # type: ignore[arg-type]
