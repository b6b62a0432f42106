"""`replay --swap` repairs a damaged read model while the tracker and the gateway run on.

Real processes (tracker, gateway, the replay command) over a NATS and a Postgres of the test's own. Events
are published before, during and after the swap; afterwards every one of them is in the read model exactly
once (``--verify`` finds every table equal to a fresh rebuild), the tracker keeps projecting into the
swapped-in tables, and the gateway serves the repaired rows.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from schemas import events as ev
from services.runtime import Bus, BusSettings, connect_bus
from services.tracker.replay import BACKUP_PREFIX, CONSUMERS
from tests.integration.conftest import TEST_NATS_USERS
from tests.integration.test_gateway_outage import (  # noqa: F401 - own_parts is a fixture
    NATS_USER,
    REPO,
    OwnParts,
    Service,
    gateway,
    own_parts,
    until,
)
from tests.integration.test_tracker import _life

pytestmark = pytest.mark.integration


def _facts(e: int, t: int) -> list[Any]:
    """A finished one-trial experiment, with training points and log lines."""
    points = [ev.TrainingMetricsReported(experiment_id=e, trial_id=t, batch_id=f"{t}-{b}", points=[
        ev.MetricPoint(steps_completed=b * 10 + s, metrics={"loss": 1.0 / (1 + b * 10 + s)}, reported_at=1000.0)
        for s in range(10)]) for b in range(3)]
    logs = [ev.LogsShipped(experiment_id=e, trial_id=t, allocation_id=f"{t}.1", lines=[
        ev.LogLine(line_no=i, stream="stdout", text=f"line {i}", ts=1001.0 + i) for i in range(20)])]
    return [*_life(e, t), *points, *logs]


async def _publish(bus: Bus, events: list[Any]) -> None:
    for event in events:
        await bus.publish(event)


async def _publish_until(bus: Bus, done: asyncio.Event) -> list[int]:
    """Publish one experiment's facts after another until ``done``; return their ids."""
    ids: list[int] = []
    while not done.is_set():
        ids.append(1000 + len(ids))
        await _publish(bus, _facts(ids[-1], ids[-1] * 10 + 1))
        await asyncio.sleep(0.01)
    return ids


async def _read_until(http: Any, done: asyncio.Event) -> list[int]:
    """Read through the gateway until ``done``; return the status codes."""
    statuses: list[int] = []
    while not done.is_set():
        for path in ("/api/v1/experiments/1", "/api/v1/trials/21/metrics", "/api/v1/experiments"):
            statuses.append((await http.get(path)).status_code)
        await asyncio.sleep(0.005)
    return statuses


async def _settled(bus: Bus, dsn: str) -> bool:
    """Whether the tracker has applied everything in the streams."""
    conn = await asyncpg.connect(dsn)
    try:
        have = {r["consumer"]: r["last_seq"] for r in await conn.fetch("SELECT * FROM projection_positions")}
    finally:
        await conn.close()
    for spec, _ in CONSUMERS:
        last = (await bus.js.stream_info(spec.stream.name)).state.last_seq
        if last and have.get(spec.durable, 0) < last:
            return False
    return True


async def _replay(own: OwnParts, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.tracker.replay", *args, cwd=REPO, env=own.env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_swap_replaces_a_damaged_read_model_while_the_tracker_and_gateway_run(own_parts: OwnParts,  # noqa: F811
                                                                                      tmp_path: Path) -> None:
    own = own_parts
    settings = BusSettings(nats_url=own.nats_url, nats_user=NATS_USER, nats_password=TEST_NATS_USERS[NATS_USER])
    async with connect_bus(settings, "test") as bus, gateway(own, tmp_path) as (http, _gw):
        tracker = Service("services.tracker.main", own.env(), tmp_path / "tracker.log")
        try:
            await _publish(bus, _facts(1, 11) + _facts(2, 21))
            await until(lambda: _settled(bus, own.dsn), 30, lambda: tracker.log_path.read_text())
            assert (await http.get("/api/v1/trials/11")).status_code == 200

            conn = await asyncpg.connect(own.dsn)
            try:
                await conn.execute("DELETE FROM checkpoints WHERE trial_id = 11; DELETE FROM allocations WHERE"
                                   " trial_id = 11; DELETE FROM trials WHERE id = 11;"
                                   " DELETE FROM metric_points WHERE trial_id = 21;"
                                   " DELETE FROM trial_logs WHERE trial_id = 21 AND line_no % 2 = 0;"
                                   " UPDATE experiments SET state = 'BROKEN' WHERE id = 2")
            finally:
                await conn.close()
            assert (await http.get("/api/v1/trials/11")).status_code == 404
            code, out = await _replay(own, "--verify")
            assert code == 1 and "MISMATCH" in out, out

            # Events keep coming and reads keep being served while the swap runs, from before it starts
            # until it has ended: each event lands in the read model exactly once, no read fails.
            swapped = asyncio.Event()
            published = asyncio.create_task(_publish_until(bus, swapped))
            statuses = asyncio.create_task(_read_until(http, swapped))
            code, out = await _replay(own, "--swap")
            swapped.set()
            during, seen = await published, await statuses
            assert code == 0, out
            assert "live DIFFERS: replaced" in out and f"kept in schema '{BACKUP_PREFIX}" in out, out
            assert int(out.split(" events that came meanwhile")[0].rsplit(" ", 1)[1]) > 0, out  # it overlapped
            assert set(seen) == {200}, seen
            await _publish(bus, _facts(9, 91))  # after the swap: the tracker projects into the new tables
            await until(lambda: _settled(bus, own.dsn), 30, lambda: tracker.log_path.read_text())
            assert tracker.proc.poll() is None, tracker.log_path.read_text()

            trial = await http.get("/api/v1/trials/11")
            assert trial.status_code == 200 and len(trial.json()["allocations"]) == 1
            assert [c["uuid"] for c in (await http.get("/api/v1/trials/11/checkpoints")).json()] == ["ck-11"]
            assert (await http.get("/api/v1/experiments/2")).json()["state"] == "COMPLETED"
            assert len((await http.get("/api/v1/trials/21/logs")).json()) == 20
            assert len((await http.get("/api/v1/trials/21/metrics", params={"kind": "training"})).json()) == 30
            for i in [*during, 9]:
                got = await http.get(f"/api/v1/experiments/{i}")
                assert got.status_code == 200 and got.json()["state"] == "COMPLETED", (i, got.text)
                assert len((await http.get(f"/api/v1/trials/{i * 10 + 1}/logs")).json()) == 20

            code, out = await _replay(own, "--verify")
            assert code == 0 and "reproducible (every table equal)" in out, out

            conn = await asyncpg.connect(own.dsn)
            try:
                backups = await conn.fetch("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)",
                                           BACKUP_PREFIX)
                assert len(backups) == 1
                backup = backups[0]["nspname"]
                assert await conn.fetchval(f'SELECT count(*) FROM "{backup}".trials WHERE id = 11') == 0
                assert await conn.fetchval("SELECT count(*) FROM trials WHERE id = 11") == 1
                # Not projections, so not swapped: the gateway's users and tokens and the id counter stay live.
                assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename ="
                                           " ANY($2::text[])", backup, ["users", "api_tokens", "id_counters"]) == 0
                assert await conn.fetchval("SELECT count(*) FROM users WHERE username = 'admin'") == 1
            finally:
                await conn.close()

            # Older backups go: the newest two are kept.
            for _ in range(2):
                code, out = await _replay(own, "--swap")
                assert code == 0, out
            assert "dropped older backups " + backup in out, out
            conn = await asyncpg.connect(own.dsn)
            try:
                assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE starts_with(nspname, $1)",
                                           BACKUP_PREFIX) == 2
                assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'replay%'") == 0
            finally:
                await conn.close()
            await _publish(bus, _facts(10, 101))
            await until(lambda: _settled(bus, own.dsn), 30, lambda: tracker.log_path.read_text())
            assert (await http.get("/api/v1/trials/101/logs")).status_code == 200
            code, out = await _replay(own, "--verify")
            assert code == 0, out

            # Log lines whose messages left the log stream (retention) are carried over, not lost.
            await bus.js.purge_stream("KILN_LOGS", seq=3)
            code, out = await _replay(own, "--swap")
            assert code == 0 and "carried over 40 rows of trial_logs" in out, out
            for t in (11, 21, 101):
                assert len((await http.get(f"/api/v1/trials/{t}/logs")).json()) == 20
        finally:
            tracker.stop()
