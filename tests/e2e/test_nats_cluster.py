"""`kiln up --nats-cluster 3`: the whole stack on a 3-server NATS cluster; one server is killed mid-experiment
and the experiment completes with nothing lost or doubled."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from deploy import parts, stack
from deploy.ports import free_port_block
from schemas import subjects
from services.runtime import BusSettings, connect_bus
from tests.e2e.conftest import Stack, local_stack, wait_for

pytestmark = pytest.mark.e2e

STEPS = 16
TRAIN = textwrap.dedent("""\
    import json, time
    import kiln as det

    info = det.get_cluster_info()
    with det.core.init() as ctx:
        start = 0
        if info.latest_checkpoint:
            with ctx.checkpoint.restore_path(info.latest_checkpoint) as path:
                start = json.loads((path / "state.json").read_text())["step"]
        for step in range(start + 1, STEPS + 1):
            time.sleep(0.4)
            ctx.train.report_training_metrics(steps_completed=step, metrics={"loss": 1.0 / step})
            ctx.train.report_validation_metrics(steps_completed=step, metrics={"accuracy": step / STEPS})
            with ctx.checkpoint.store_path({"steps_completed": step}) as (path, _):
                (path / "state.json").write_text(json.dumps({"step": step}))
""").replace("STEPS", str(STEPS))


def _get(s: Stack, path: str) -> Any:
    return s.http.get(f"{s.cfg.master_url}{path}").json()


async def _positions_and_streams(s: Stack) -> tuple[dict[str, int], dict[str, int]]:
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        rows = await conn.fetch("SELECT consumer, last_seq FROM projection_positions")
    finally:
        await conn.close()
    settings = BusSettings(nats_url=",".join(stack.nats_urls(s.cfg)), nats_user="admin",
                           nats_password=s.creds.nats["admin"])
    async with connect_bus(settings, "test", ensure=False) as bus:
        last = {spec.name: (await bus.js.stream_info(spec.name)).state.last_seq
                for spec in (subjects.EVENTS, subjects.METRICS, subjects.LOGS)}
    return {r["consumer"]: r["last_seq"] for r in rows}, last


def test_an_experiment_completes_when_a_nats_server_is_killed_mid_run(tmp_path: Path) -> None:
    with local_stack("kiln-natsc-", workers=2, slots_per_worker=1, nats_cluster=3,
                     nats_cluster_ports_base=free_port_block(9)) as s:
        # Every process got every server, and the streams are on all three.
        env_urls = stack.service_env(s.cfg, s.creds, "tracker")["KILN_NATS_URL"].split(",")
        assert len(env_urls) == 3
        (tmp_path / "train.py").write_text(TRAIN)
        (tmp_path / "cfg.yaml").write_text(textwrap.dedent(f"""\
            name: cluster-failover
            entrypoint: python3 train.py
            searcher: {{name: single, metric: accuracy, smaller_is_better: false, max_length: {{batches: {STEPS}}}}}
            max_restarts: 2
        """))
        run = s.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path))
        assert run.returncode == 0, run.stderr
        exp_id = int(run.stdout.split("Created experiment ", 1)[1].split()[0])

        def running() -> dict[str, Any] | None:
            trials = _get(s, f"/api/v1/experiments/{exp_id}/trials")
            ok = trials and trials[0]["state"] == "RUNNING" and (trials[0]["steps_completed"] or 0) >= 3
            return trials[0] if ok else None  # type: ignore[no-any-return]

        trial = wait_for(running, timeout=120, what="trial running with 3 steps")
        # Kill -9 the first server (every service and worker picked one of the three at random).
        pid = parts.read_pid(s.cfg.state_dir, "nats")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

        def ended() -> dict[str, Any] | None:
            exp = _get(s, f"/api/v1/experiments/{exp_id}")
            return exp if exp.get("state") in ("COMPLETED", "ERROR", "CANCELED") else None

        assert wait_for(ended, timeout=180, what="the experiment's end")["state"] == "COMPLETED"
        # Every validation once, in order; the audit trail holds each decision once.
        points = s.http.get(f"/api/v1/trials/{trial['id']}/metrics", params={"kind": "validation"}).json()
        assert [p["steps_completed"] for p in points] == list(range(1, STEPS + 1))
        # Training points travel on their own stream: its consumer may still be catching up after the failover
        # when the experiment's end is projected; every point must arrive, once.
        def training_steps() -> list[int] | None:
            got = s.http.get(f"/api/v1/trials/{trial['id']}/metrics", params={"kind": "training"}).json()
            steps = sorted(p["steps_completed"] for p in got)
            return steps if len(steps) >= STEPS else None

        assert wait_for(training_steps, timeout=120, what="every training point") == list(range(1, STEPS + 1))
        kinds = Counter(e["type"] for e in _get(s, f"/api/v1/experiments/{exp_id}/events"))
        assert kinds["ExperimentSubmitted"] == kinds["TrialCreated"] == kinds["ExperimentEnded"] == 1
        assert kinds["TrialExited"] == 1 and kinds["ValidationReported"] == STEPS

        # The tracker's positions reach the ends of the streams: nothing stored was left unapplied.
        def caught_up() -> bool:
            positions, last = asyncio.run(_positions_and_streams(s))
            return (positions.get("tracker-events") == last[subjects.EVENTS.name]
                    and positions.get("tracker-metrics") == last[subjects.METRICS.name])

        wait_for(caught_up, timeout=60, what="the tracker at the ends of the streams")
        # `kiln up` brings the killed server back; it rejoins and serves again.
        stack.up(s.cfg)
        assert parts.pid_alive(parts.read_pid(s.cfg.state_dir, "nats") or 0)
