"""Replay rate and where its CPU goes: domain events through real NATS into Postgres, no other load.

Publishes a domain stream (``--shape mixed``: many trials' lives interleaved, with allocations, progress,
checkpoints, preemption, restarts; ``--shape validations``: the ingest benchmark's 1 TrialCreated + 10
ValidationReported per trial) into a fresh NATS, then replays it ``--reps`` times with
``services.tracker.replay.replay`` into a fresh schema. For each repetition: events/s, and CPU seconds
per event of this process (reading, decoding and folding), of Postgres (every backend) and of
nats-server. On a machine with C cores no replay can beat C / (total CPU per event), however well the
parts overlap: that ceiling is printed beside the rate.

Usage: .venv/bin/python benchmarks/ingest/replay_profile.py [--shape mixed|validations] [--trials 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import asyncpg  # noqa: E402
import msgspec  # noqa: E402

from deploy import parts  # noqa: E402
from deploy.ports import free_port_block  # noqa: E402
from schemas import events as ev  # noqa: E402
from services.runtime import BusSettings, configure_logging, connect_bus  # noqa: E402
from services.tracker import replay as rp  # noqa: E402
from tests.domain_stream import CONFIG, mixed_stream  # noqa: E402


def cpu_seconds(programs: set[str]) -> float:
    """User + system CPU of every live process running one of ``programs`` (from /proc)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() in programs:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def stream(shape: str, trials: int) -> list[Any]:
    if shape == "mixed":
        return mixed_stream(random.Random(1), [1, 2, 3, 4], trials // 4, itertools.count(10))
    out: list[Any] = [ev.ExperimentSubmitted(experiment_id=1, config=CONFIG, config_yaml="", context_digest="d",
                                             context_size=1, seed=1)]
    out += [ev.TrialCreated(experiment_id=1, trial_id=t, request_id=t, hparams={"lr": 0.1}, seed=t)
            for t in range(1, trials + 1)]
    for v in range(1, 11):
        out += [ev.ValidationReported(experiment_id=1, trial_id=t, steps_completed=100 * v,
                                      metrics={"val_loss": 0.5 / v, "val_acc": 1 - 0.25 / v})
                for t in range(1, trials + 1)]
    return out


async def measure(args: argparse.Namespace, nats_url: str, dsn: str) -> dict[str, Any]:
    events = stream(args.shape, args.trials)
    out: dict[str, Any] = {"shape": args.shape, "events": len(events), "cores": os.cpu_count(), "reps": []}
    async with connect_bus(BusSettings(nats_url=nats_url), "replay-profile") as bus:
        for i in range(0, len(events), 1000):
            await asyncio.gather(*(bus.publish(e) for e in events[i:i + 1000]))
        spec, kind = rp.CONSUMERS[0]
        decoder = msgspec.json.Decoder(kind)
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        async with contextlib.aclosing(bus.read(spec.stream, spec.filter_subjects[0], decoder)) as reading:
            async for _ in reading:
                n += 1
        out["read_only"] = {"rate": n / (time.perf_counter() - t0), "python_us": (time.process_time() - c0) / n * 1e6}
        conn = await asyncpg.connect(dsn)
        try:
            for _ in range(args.reps):
                c0, pg0, nats0 = time.process_time(), cpu_seconds({"postgres"}), cpu_seconds({"nats-server"})
                report = await rp.replay(bus, conn, "replay_profile")
                per = 1e6 / report.events
                rep = {"rate": report.rate, "python_us": (time.process_time() - c0) * per,
                       "postgres_us": (cpu_seconds({"postgres"}) - pg0) * per,
                       "nats_us": (cpu_seconds({"nats-server"}) - nats0) * per}
                rep["ceiling"] = (os.cpu_count() or 1) * 1e6 / (rep["python_us"] + rep["postgres_us"] + rep["nats_us"])
                out["reps"].append(rep)
        finally:
            await conn.close()
    return out


def report(res: dict[str, Any]) -> str:
    med = {k: statistics.median(r[k] for r in res["reps"]) for k in res["reps"][0]}
    total = med["python_us"] + med["postgres_us"] + med["nats_us"]
    return "\n".join([
        f"replay of {res['events']:,} domain events ({res['shape']}), median of {len(res['reps'])}:",
        "| measure | value |", "|---|---|",
        f"| replay rate, events/s | {med['rate']:,.0f} |",
        f"| CPU per event: replay process / Postgres / nats-server, µs | {med['python_us']:.1f} / "
        f"{med['postgres_us']:.1f} / {med['nats_us']:.1f} (total {total:.1f}) |",
        f"| ceiling on {res['cores']} cores (cores / total CPU per event), events/s | {med['ceiling']:,.0f} |",
        f"| reading alone (Bus.read + decode), events/s; µs/event | {res['read_only']['rate']:,.0f}; "
        f"{res['read_only']['python_us']:.1f} |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("mixed", "validations"), default="mixed")
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    configure_logging("replay-profile", "WARNING")
    state = Path(tempfile.mkdtemp(prefix="kiln-replay-"))
    state.chmod(0o755)  # the postgres user must reach its data dir inside
    base = free_port_block(4)
    cfg = parts.PartsConfig(state_dir=state, nats_port=base, nats_monitor_port=base + 1, pg_port=base + 2,
                            pg_password="replay", s3_access_key="unused", s3_secret_key="unused")
    nats, pg = parts.start_nats(cfg), parts.start_postgres(cfg)
    try:
        dsn = f"postgresql://{cfg.pg_user}:{cfg.pg_password}@{cfg.host}:{cfg.pg_port}/{cfg.pg_database}"
        res = asyncio.run(measure(args, f"nats://{cfg.host}:{cfg.nats_port}", dsn))
    finally:
        nats.stop()
        pg.stop()
        shutil.rmtree(state, ignore_errors=True)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
