"""The ingest benchmark's trial: reports one workload trial's points through ``kiln.core`` as fast as it can.

Shipped as the experiment's code context (with ``workload.py``) and run by the stack's real workers, so
the points take the real path: ``report_training_metrics`` -> TrialBus (500-point batches) -> the
allocation's Unix socket -> the worker's link and SQLite outbox -> JetStream -> tracker -> Postgres.

Hyperparameters: ``index`` (the workload's trial number), ``batches``, ``steps`` and ``sync_dir`` (a
directory the benchmark shares with its trials). So that process start-up is not on the clock, each trial
builds its points, writes ``ready-<index>`` and waits for ``go``; the benchmark writes ``go`` once every
trial is ready and starts its clock then. After the last report the trial closes its core context (which
returns once the worker has stored every batch in its outbox) and writes ``done-<index>`` with its
timings and its own CPU seconds (a trial has exited before the benchmark reads its CPU meter).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import workload

import kiln as det


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    info = det.get_cluster_info()
    assert info is not None, "run by a Kiln worker"
    hp = info.trial.hparams
    index, batches, steps = int(hp["index"]), int(hp["batches"]), int(hp["steps"])
    sync = Path(hp["sync_dir"])
    work = [workload.batch(index, b, steps) for b in range(batches)]  # built before the clock, like the peers
    with det.core.init() as core:
        report = core.train.report_training_metrics
        (sync / f"ready-{index}").write_text(json.dumps({"trial_id": info.trial.trial_id, "pid": os.getpid()}))
        go = sync / "go"
        while not go.exists():
            time.sleep(0.002)
        t_go, cpu_go = time.time(), cpu_s()
        for batch in work:
            for step, metrics, _ in batch:
                report(steps_completed=step, metrics=metrics)
        t_reported = time.time()
    # Leaving the context flushed the last points and waited for the worker's "stored" of every batch.
    t_stored = time.time()
    done = {"index": index, "trial_id": info.trial.trial_id, "t_go": t_go, "t_reported": t_reported,
            "t_stored": t_stored, "cpu": cpu_s() - cpu_go,
            "points": workload.points_in_batch(index, steps) * batches}
    (sync / f"done-{index}").write_text(json.dumps(done))


if __name__ == "__main__":
    main()
