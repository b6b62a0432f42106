"""Cluster-size benchmark: how the scheduler's costs grow with the number of workers.

1. ``decision``: the scheduler's pure core (no I/O) with W workers x 8 slots and 10 x W pending trials: one
   placement pass on the empty cluster, one on the full cluster (nothing fits), and one heartbeat as the shell
   handles it (``core.heartbeat(hb) + core.tick(now)``, once per heartbeat of every worker).
2. ``heartbeats``: W simulated workers heartbeating once a second over a real NATS server (deploy.parts) to the
   real scheduler process (``services.scheduler.main``): messages/s the server took in, and the scheduler's CPU
   (user + system seconds per wall second, from /proc) while it keeps up.

Usage:
  .venv/bin/python benchmarks/cluster/run.py decision [--workers 100,250,500,1000] [--passes 3]
  .venv/bin/python benchmarks/cluster/run.py heartbeats [--workers 100,250,500,1000] [--seconds 20]
  .venv/bin/python benchmarks/cluster/run.py smoke     # both, tiny sizes: checks it runs, numbers mean nothing
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgspec

from deploy import parts
from deploy.ports import free_port_block
from schemas import events as ev
from schemas import subjects
from schemas.config import config_to_dict, parse_config
from services.runtime import BusSettings, connect_bus
from services.scheduler.core import SchedulerCore

SLOTS = 8
PENDING_PER_WORKER = 10
EXPERIMENTS = 20
REPO = Path(__file__).resolve().parents[2]


# -- 1. the pure core ------------------------------------------------------------------------------


def loaded_core(workers: int, pending: int, seed: int) -> SchedulerCore:
    """``workers`` x 8 slots, 20 experiments (priorities 10/42/70, weights 1-3, gangs 1/2/4/8), ``pending`` trials."""
    rng = random.Random(seed)
    core = SchedulerCore(worker_timeout_s=1e9)
    trial = 0
    for e in range(1, EXPERIMENTS + 1):
        slots = rng.choice([1, 1, 2, 4, 8])
        yaml = ("entrypoint: python3 train.py\nsearcher: {name: single, metric: loss, max_length: {batches: 1}}\n"
                f"resources: {{slots_per_trial: {slots}, priority: {rng.choice([10, 42, 42, 70])},"
                f" weight: {rng.choice([1, 2, 3])}}}\n")
        core.handle(ev.ExperimentSubmitted(experiment_id=e, config=config_to_dict(parse_config(yaml)[0]),
                                           config_yaml=yaml, context_digest="sha256:0", context_size=0, seed=e))
        for _ in range(pending // EXPERIMENTS):
            trial += 1
            core.handle(ev.TrialCreated(experiment_id=e, trial_id=trial, request_id=trial, hparams={}, seed=0))
    for w in range(workers):
        core.heartbeat(heartbeat(w, 0.0))
    return core


def heartbeat(w: int, at: float, running: list[str] | None = None) -> ev.WorkerHeartbeat:
    return ev.WorkerHeartbeat(worker_id=f"worker-{w:04d}", address="sim", resource_pool="default",
                              running=running or [], sent_at=at,
                              slots=[ev.Slot(slot_id=f"cuda{i}", kind="cuda") for i in range(SLOTS)])


def decision(workers: int, passes: int) -> dict[str, float]:
    """Median ms of: the first pass, a full-cluster pass, one heartbeat + tick on the full cluster."""
    first, full, beat = [], [], []
    placed = 0
    for i in range(passes):
        core = loaded_core(workers, workers * PENDING_PER_WORKER, i)
        t0 = time.perf_counter()
        out = core.tick(1.0)
        first.append(time.perf_counter() - t0)
        placed = sum(1 for e in out if isinstance(e, ev.AllocationAssigned))
        for e in out:  # the decisions come back through the stream, then the runs start
            core.handle(e)
            if isinstance(e, ev.AllocationAssigned) and not e.node_rank:
                core.handle(ev.TrialStarted(experiment_id=e.experiment_id, trial_id=e.trial_id,
                                            allocation_id=e.allocation_id, worker_id=e.worker_id, started_at=1.0))
        t0 = time.perf_counter()
        core.tick(1.5)
        full.append(time.perf_counter() - t0)
        running: dict[str, list[str]] = {}
        for run in core.state.trials.values():
            if run.worker_id:
                running.setdefault(run.worker_id, []).append(run.allocation_id)
        samples = []
        for k in range(min(workers, 50)):  # the shell's step for one heartbeat, as on_heartbeat runs it
            w = (k * 7919) % workers
            hb = heartbeat(w, 2.0 + k * 1e-3, running.get(f"worker-{w:04d}", []))
            t0 = time.perf_counter()
            core.heartbeat(hb)
            core.tick(2.0 + k * 1e-3)
            samples.append(time.perf_counter() - t0)
        beat.append(statistics.median(samples))
    return {"workers": workers, "pending": workers * PENDING_PER_WORKER, "placed": placed,
            "first_ms": statistics.median(first) * 1e3, "full_ms": statistics.median(full) * 1e3,
            "heartbeat_ms": statistics.median(beat) * 1e3,
            # Every worker heartbeats once a second: the core's share of one CPU just for that.
            "heartbeat_cpu": statistics.median(beat) * workers}


# -- 2. heartbeats over real NATS ------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _in_msgs(monitor: str) -> int:
    with urllib.request.urlopen(f"{monitor}/varz", timeout=5) as resp:
        return int(json.loads(resp.read())["in_msgs"])


async def _heartbeat_workers(url: str, workers: int, stop: asyncio.Event) -> int:
    """``workers`` simulated workers, each heartbeating once a second (spread over the second); messages sent."""
    sent = 0
    encoder = msgspec.json.Encoder()
    async with connect_bus(BusSettings(nats_url=url), "sim-workers", ensure=False) as bus:
        start = time.monotonic()
        tick = 0
        while not stop.is_set():
            # One tenth of the workers every 100 ms: 1 Hz each, no burst.
            for w in range(tick % 10, workers, 10):
                hb = heartbeat(w, time.time())
                await bus.publish_core(subjects.heartbeat_subject(hb.worker_id), encoder.encode(hb))
                sent += 1
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * 0.1 - time.monotonic()))
    return sent


def heartbeats(workers: int, seconds: float) -> dict[str, float]:
    """Start NATS and the scheduler, run ``workers`` simulated workers for ``seconds``; rates and CPU."""
    state = Path(tempfile.mkdtemp(prefix="kiln-bench-cluster-"))
    base = free_port_block(2)
    cfg = parts.PartsConfig(state_dir=state, nats_port=base, nats_monitor_port=base + 1, pg_password="-",
                            s3_access_key="-", s3_secret_key="-")
    url, monitor = f"nats://{cfg.host}:{cfg.nats_port}", f"http://{cfg.host}:{cfg.nats_monitor_port}"
    nats = parts.start_nats(cfg)
    sched: subprocess.Popen[bytes] | None = None
    try:
        async def bootstrap() -> None:
            async with connect_bus(BusSettings(nats_url=url), "bootstrap", ensure=True):
                pass

        asyncio.run(bootstrap())
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        env.update(KILN_NATS_URL=url, KILN_WORKER_TIMEOUT_S="30", KILN_LOG_LEVEL="WARNING",
                   PYTHONPATH=str(REPO))
        log = (state / "scheduler.log").open("wb")
        sched = subprocess.Popen([sys.executable, "-m", "services.scheduler.main"], env=env, cwd=REPO,
                                 stdout=log, stderr=subprocess.STDOUT)
        time.sleep(3.0)  # connected and bound

        async def measure() -> tuple[int, float, float, int]:
            stop = asyncio.Event()
            assert sched is not None
            task = asyncio.create_task(_heartbeat_workers(url, workers, stop))
            await asyncio.sleep(2.0)  # warm: every worker known
            cpu0, msgs0, t0 = _cpu_seconds(sched.pid), _in_msgs(monitor), time.monotonic()
            await asyncio.sleep(seconds)
            cpu1, msgs1, t1 = _cpu_seconds(sched.pid), _in_msgs(monitor), time.monotonic()
            stop.set()
            sent = await task
            return msgs1 - msgs0, cpu1 - cpu0, t1 - t0, sent

        msgs, cpu, wall, _sent = asyncio.run(measure())
        alive = sched.poll() is None
    finally:
        if sched is not None:
            sched.terminate()
            sched.wait(timeout=20)
        nats.stop()
        shutil.rmtree(state, ignore_errors=True)
    if not alive:
        raise RuntimeError("the scheduler exited during the run")
    return {"workers": workers, "bus_msgs_per_s": msgs / wall, "scheduler_cpu": cpu / wall}


# -- the tables ------------------------------------------------------------------------------------


def _growth(rows: list[dict[str, float]], key: str) -> str:
    """How ``key`` grew from the smallest to the largest size, against the size's own growth."""
    a, b = rows[0], rows[-1]
    if not a[key]:
        return "-"
    return f"x{b[key] / a[key]:.1f} for x{b['workers'] / a['workers']:.0f} workers"


def print_decision(rows: list[dict[str, float]]) -> None:
    print("| workers x 8 slots | pending | placed | first pass ms | full-cluster pass ms | one heartbeat ms |"
          " heartbeats' CPU (1 Hz each) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']:.0f} | {r['pending']:.0f} | {r['placed']:.0f} | {r['first_ms']:.1f} |"
              f" {r['full_ms']:.1f} | {r['heartbeat_ms']:.2f} | {r['heartbeat_cpu']:.2f} |")
    print(f"growth: first pass {_growth(rows, 'first_ms')}, full pass {_growth(rows, 'full_ms')},"
          f" per heartbeat {_growth(rows, 'heartbeat_ms')}, heartbeats' CPU {_growth(rows, 'heartbeat_cpu')}")


def print_heartbeats(rows: list[dict[str, float]]) -> None:
    print("| simulated workers | bus messages/s in | scheduler CPU (s per s) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['workers']:.0f} | {r['bus_msgs_per_s']:.0f} | {r['scheduler_cpu']:.2f} |")
    print(f"growth: bus {_growth(rows, 'bus_msgs_per_s')}, scheduler CPU {_growth(rows, 'scheduler_cpu')}")


def main() -> None:
    """Run what the command line asks for and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["decision", "heartbeats", "smoke"])
    parser.add_argument("--workers", default="100,250,500,1000")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    sizes = [int(w) for w in args.workers.split(",")]
    if args.what == "smoke":
        print_decision([decision(w, 1) for w in (20, 40)])
        print_heartbeats([heartbeats(w, 2.0) for w in (20, 40)])
        return
    if args.what == "decision":
        print_decision([decision(w, args.passes) for w in sizes])
    else:
        print_heartbeats([heartbeats(w, args.seconds) for w in sizes])


if __name__ == "__main__":
    main()
