"""The stack's supervisor: a killed process comes back by itself; `kiln up` keeps the size it was given,
applies a new one, starts a dead process again and names a process that cannot start."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import parts, stack, supervise
from tests.e2e.conftest import Stack, local_stack, wait_for

pytestmark = pytest.mark.e2e


_wait = functools.partial(wait_for, timeout=30.0)


def _rows(cfg: stack.StackConfig) -> dict[str, stack.ProcessStatus]:
    return {r.name: r for r in stack.status(cfg)}


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _written_since(path: Path, offset: int) -> str:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def _health(cfg: stack.StackConfig) -> bool:
    try:
        with urllib.request.urlopen(f"{cfg.master_url}/health", timeout=2.0) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def test_a_killed_service_and_worker_come_back_by_themselves_and_are_counted(kiln_stack: Stack) -> None:
    """kill -9 the gateway and a worker: supervisord restarts both within seconds, both serve again, and
    `status` shows one more restart for each."""
    cfg = kiln_stack.cfg
    before = _rows(cfg)
    victims = ["gateway", "worker-2"]
    assert all(before[name].alive and before[name].pid for name in victims), before
    worker_log = cfg.state_dir / "logs" / "worker-2.log"
    offset = _size(worker_log)
    for name in victims:
        os.kill(before[name].pid or 0, signal.SIGKILL)

    def back() -> dict[str, stack.ProcessStatus] | None:
        rows = _rows(cfg)
        ok = all(rows[n].alive and rows[n].pid != before[n].pid and rows[n].restarts == before[n].restarts + 1
                 for n in victims)
        return rows if ok else None

    rows = _wait(back, timeout=30, what="the killed processes to be restarted")
    _wait(lambda: _health(cfg), what="the restarted gateway to serve")
    _wait(lambda: stack.READY_MARKERS["worker"] in _written_since(worker_log, offset),
          what="the restarted worker to consume again")
    for name in victims:
        assert parts.read_pid(cfg.state_dir, name) == rows[name].pid  # pid files follow restarts
        assert rows[name].state in ("STARTING", "RUNNING")
        assert rows[name].uptime_s is not None
    untouched = [n for n in before if n not in victims and n.startswith(("worker-", "tracker", "searcher"))]
    assert all(rows[n].pid == before[n].pid for n in untouched)

    shown = kiln_stack.kiln("status", "--json")
    assert shown.returncode == 0, shown.stderr
    by_name = {r["name"]: r for r in json.loads(shown.stdout)}
    assert by_name["gateway"]["restarts"] == before["gateway"].restarts + 1
    assert {"nats", "postgres", "s3"} <= set(by_name)
    table = kiln_stack.kiln("status")
    assert "RESTARTS" in table.stdout and "supervisord: pid" in table.stdout, table.stdout


def test_plain_up_keeps_three_workers_and_starts_a_stopped_one_again(kiln_stack: Stack) -> None:
    """`kiln up` without --workers on a 3-worker stack keeps 3 workers, and starts one that is down."""
    cfg = kiln_stack.cfg
    sup = supervise.Supervisor(supervise.Paths.of(cfg.state_dir))
    assert sup.stop(["worker-1"]) == ["worker-1"]  # down, and supervisord will not restart it by itself
    assert not _rows(cfg)["worker-1"].alive

    done = kiln_stack.kiln("up")
    assert done.returncode == 0, done.stderr
    assert "started again: worker-1" in done.stdout
    assert "workers:" not in done.stdout and "slots per worker:" not in done.stdout
    rows = _rows(cfg)
    assert sorted(n for n in rows if n.startswith("worker-")) == ["worker-0", "worker-1", "worker-2"]
    assert all(rows[f"worker-{i}"].alive for i in range(3))
    saved = json.loads((cfg.state_dir / "stack.json").read_text())
    assert (saved["workers"], saved["slots_per_worker"]) == (3, 1)

    again = kiln_stack.kiln("up")
    assert again.returncode == 0, again.stderr
    assert "changed:" not in again.stdout
    assert {n: r.pid for n, r in _rows(cfg).items()} == {n: r.pid for n, r in rows.items()}


@pytest.fixture(scope="module")
def small_stack() -> Iterator[Stack]:
    """A stack of its own (one 1-slot worker) to resize without disturbing the shared one."""
    with local_stack("kiln-e2e-sv-", workers=1, slots_per_worker=1) as s:
        yield s


def test_up_applies_new_sizes_and_says_so(small_stack: Stack) -> None:
    """Explicit --workers/--slots-per-worker are applied: workers restart with the new slot count, extra
    workers start, and shrinking stops and removes the ones beyond the new count."""
    cfg = small_stack.cfg
    log0 = cfg.state_dir / "logs" / "worker-0.log"
    offset = _size(log0)
    old_pid = _rows(cfg)["worker-0"].pid

    grown = small_stack.kiln("up", "--workers", "2", "--slots-per-worker", "2")
    assert grown.returncode == 0, grown.stderr
    assert "workers: 1 -> 2" in grown.stdout and "slots per worker: 1 -> 2" in grown.stdout
    assert "restarted with the new settings: worker-0" in grown.stdout and "started: worker-1" in grown.stdout
    rows = _rows(cfg)
    assert rows["worker-0"].pid != old_pid and rows["worker-0"].alive and rows["worker-1"].alive
    assert rows["worker-0"].restarts == 0  # a requested restart is not a crash
    assert '"slots": ["cpu0", "cpu1"]' in _written_since(log0, offset)

    shrunk = small_stack.kiln("up", "--workers", "1")
    assert shrunk.returncode == 0, shrunk.stderr
    assert "workers: 2 -> 1" in shrunk.stdout and "stopped and removed: worker-1" in shrunk.stdout
    assert "slots per worker" not in shrunk.stdout  # kept at 2: not asked to change
    rows = _rows(cfg)
    assert "worker-1" not in rows and rows["worker-0"].alive
    assert not parts.pid_path(cfg.state_dir, "worker-1").exists()
    saved = json.loads((cfg.state_dir / "stack.json").read_text())
    assert (saved["workers"], saved["slots_per_worker"]) == (1, 2)


def test_up_prints_short_lines_and_keeps_the_details_in_its_log_file(small_stack: Stack) -> None:
    """A rerun of `kiln up` prints a few short lines; the machinery's log lines (parts reused, commands) go to
    logs/kiln-cli.log, not to the terminal."""
    again = small_stack.kiln("up")
    assert again.returncode == 0, again.stderr
    printed = (again.stdout + again.stderr).splitlines()
    assert printed and all(len(line) <= 120 for line in printed), printed
    assert not any("part already running" in line or "debug" in line or "argv" in line for line in printed), printed
    assert "kiln is up in" in again.stdout
    logged = (small_stack.cfg.state_dir / "logs" / "kiln-cli.log").read_text()
    assert "part already running" in logged


def test_up_names_a_process_that_cannot_start(small_stack: Stack) -> None:
    """With the gateway's port taken, `up` fails naming the gateway and its log, and leaves it stopped
    (not crash-looping); once the port is free, `up` starts it again."""
    cfg = stack.StackConfig.load(small_stack.cfg.state_dir)  # the sizes it runs with now
    sup = supervise.Supervisor(supervise.Paths.of(cfg.state_dir))
    sup.stop(["gateway"])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((cfg.host, cfg.http_port))
        squatter.listen()
        with pytest.raises(stack.StackError, match="gateway") as failed:
            stack.up(cfg, timeout=60)
        assert "address already in use" in str(failed.value).lower()
        assert _rows(cfg)["gateway"].state in ("STOPPED", "FATAL", "EXITED")
    info = stack.up(cfg)
    assert info.changes == ["started again: gateway (was STOPPED)"]
    assert _health(cfg)
