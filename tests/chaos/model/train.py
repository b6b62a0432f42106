"""A chaos-test trial: no real model, a learning curve that depends on the hparams, one validation and
one checkpoint per step, and a side file of every point whose report was acknowledged.

The side file (``$CHAOS_DIR/trial-<id>.jsonl``) is the trial's own count of what it sent, so the test can
check that every acknowledged point is in the read model exactly once, whatever was killed meanwhile.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import kiln as det

STEP_S = float(os.environ.get("CHAOS_STEP_S", "0.5"))
POINTS_PER_STEP = 5


def accuracy(hparams: dict[str, float], step: int) -> float:
    """A saturating curve whose ceiling and speed come from the hparams (deterministic)."""
    ceiling = 0.5 + 0.45 * math.exp(-((math.log10(hparams["lr"]) + 2.0) ** 2))
    return ceiling * (1.0 - math.exp(-step / (2.0 + 8.0 * hparams["slowness"])))


def main() -> int:
    info = det.get_cluster_info()
    assert info is not None, "runs on a cluster only"
    trial_id = info.trial.trial_id
    hparams = info.trial.hparams
    side = Path(os.environ["CHAOS_DIR"]) / f"trial-{trial_id}.jsonl"
    with det.core.init() as core:
        total = int(core.searcher.max_length)
        step = 0
        if info.latest_checkpoint:
            with core.checkpoint.restore_path(info.latest_checkpoint) as path:
                step = json.loads((path / "state.json").read_text())["step"]
            print(f"resumed at step {step}", flush=True)
        while step < total:
            step += 1
            for i in range(POINTS_PER_STEP):
                time.sleep(STEP_S / POINTS_PER_STEP)
                point = step * POINTS_PER_STEP + i
                core.train.report_training_metrics(steps_completed=point, metrics={"loss": 1.0 / (1 + point)})
            acc = accuracy(hparams, step)
            # A validation report first sends the buffered training points and waits for the worker to
            # take them: from here on, all of this step's points are acknowledged.
            core.train.report_validation_metrics(steps_completed=step * POINTS_PER_STEP,
                                                 metrics={"accuracy": acc, "steps": step})
            with side.open("a") as fh:
                for i in range(POINTS_PER_STEP):
                    fh.write(json.dumps({"kind": "training", "step": step * POINTS_PER_STEP + i}) + "\n")
                fh.write(json.dumps({"kind": "validation", "step": step * POINTS_PER_STEP}) + "\n")
            with core.checkpoint.store_path({"steps_completed": step * POINTS_PER_STEP}) as (path, _):
                (path / "state.json").write_text(json.dumps({"step": step}))
            core.train.report_progress(step / total)
            if core.preempt.should_preempt():
                return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
