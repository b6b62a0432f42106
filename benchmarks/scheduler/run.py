"""Scheduler benchmark: one decision pass for 1,000 pending trials over 100 simulated workers (pure core),
and submit-to-first-training-step latency on the local stack next to the bare script's own start-up.

Usage: .venv/bin/python benchmarks/scheduler/run.py [--passes N] [--runs N] [--skip-stack]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from schemas import events as ev
from schemas.config import config_to_dict, parse_config
from services.scheduler.core import SchedulerCore

WORKERS, SLOTS, PENDING, EXPERIMENTS = 100, 8, 1000, 20


def loaded_core(seed: int) -> SchedulerCore:
    """100 workers x 8 slots, 20 experiments with mixed priorities, weights and gang sizes, 1,000 trials queued."""
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
        for _ in range(PENDING // EXPERIMENTS):
            trial += 1
            core.handle(ev.TrialCreated(experiment_id=e, trial_id=trial, request_id=trial, hparams={}, seed=0))
    for w in range(WORKERS):
        core.heartbeat(ev.WorkerHeartbeat(
            worker_id=f"w{w:03d}", address="sim", resource_pool="default", running=[], sent_at=0.0,
            slots=[ev.Slot(slot_id=f"cuda{i}", kind="cuda") for i in range(SLOTS)]))
    return core


def decision_times(passes: int) -> tuple[list[float], list[float], int]:
    """Seconds for the first pass (everything placed) and for a full-cluster pass (nothing fits)."""
    first, full, placed = [], [], 0
    for i in range(passes):
        core = loaded_core(i)
        t0 = time.perf_counter()
        out = core.tick(1.0)
        first.append(time.perf_counter() - t0)
        placed = sum(1 for e in out if isinstance(e, ev.AllocationAssigned))
        t0 = time.perf_counter()
        core.tick(1.5)
        full.append(time.perf_counter() - t0)
    return first, full, placed


def main() -> None:
    """Print the result tables."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-stack", action="store_true")
    args = parser.parse_args()
    first, full, placed = decision_times(args.passes)
    ms = [t * 1000 for t in first]
    ms_full = [t * 1000 for t in full]
    print(f"decision pass: {PENDING} pending trials, {WORKERS} workers x {SLOTS} slots, {EXPERIMENTS} experiments")
    print("| pass | median ms | min ms | max ms | target |")
    print("|---|---|---|---|---|")
    print(f"| empty cluster ({placed} trials placed) | {statistics.median(ms):.1f} | {min(ms):.1f} | {max(ms):.1f} |"
          " < 100 ms |")
    print(f"| full cluster (nothing fits) | {statistics.median(ms_full):.1f} | {min(ms_full):.1f} |"
          f" {max(ms_full):.1f} | < 100 ms |")
    if args.skip_stack:
        return
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "startup"))
    import run as startup  # benchmarks/startup/run.py: the same side-by-side measurement

    startup.main_with(args.runs)


if __name__ == "__main__":
    main()
