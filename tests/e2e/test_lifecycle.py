"""Lifecycle on the whole stack: kill an experiment; lose a worker mid-trial and resume elsewhere."""

from __future__ import annotations

import functools
import os
import signal
import textwrap
from pathlib import Path

import pytest

from deploy import parts, stack
from tests.e2e.conftest import Stack, wait_for

pytestmark = pytest.mark.e2e

# Trains STEPS slow steps, validating and checkpointing each one, resuming from the latest checkpoint.
SLOW_TRAIN = textwrap.dedent("""\
    import json, sys, time
    import kiln as det

    info = det.get_cluster_info()
    with det.core.init() as ctx:
        start = 0
        if info.latest_checkpoint:
            with ctx.checkpoint.restore_path(info.latest_checkpoint) as path:
                start = json.loads((path / "state.json").read_text())["step"]
            print(f"resumed at step {start}", flush=True)
        for step in range(start + 1, STEPS + 1):
            time.sleep(DELAY)
            ctx.train.report_training_metrics(steps_completed=step, metrics={"loss": 1.0 / step})
            ctx.train.report_validation_metrics(steps_completed=step, metrics={"accuracy": step / STEPS})
            with ctx.checkpoint.store_path({"steps_completed": step}) as (path, _):
                (path / "state.json").write_text(json.dumps({"step": step}))
            if ctx.preempt.should_preempt():
                print("asked to stop", flush=True)
                sys.exit(0)
""")

CONFIG = textwrap.dedent("""\
    name: slow
    entrypoint: python3 train.py
    searcher: {name: single, metric: accuracy, smaller_is_better: false, max_length: {batches: STEPS}}
    max_restarts: 3
""")


def _write(tmp: Path, steps: int, delay: float) -> None:
    (tmp / "train.py").write_text(SLOW_TRAIN.replace("STEPS", str(steps)).replace("DELAY", str(delay)))
    (tmp / "cfg.yaml").write_text(CONFIG.replace("STEPS", str(steps)))


_wait = functools.partial(wait_for, timeout=60.0)


def _created_id(stdout: str) -> int:
    return int(stdout.split("Created experiment ", 1)[1].split()[0])


def test_kill_cancels_a_running_experiment(kiln_stack: Stack, tmp_path: Path) -> None:
    """`kiln experiment kill` stops the running trial; experiment and trial end CANCELED."""
    _write(tmp_path, steps=200, delay=0.5)
    created = kiln_stack.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path))
    assert created.returncode == 0, created.stderr
    exp_id = _created_id(created.stdout)
    api = kiln_stack.http  # signed in as admin
    _wait(lambda: any(t["state"] == "RUNNING" for t in api.get(f"/api/v1/experiments/{exp_id}/trials").json()),
          what="trial running")
    killed = kiln_stack.kiln("experiment", "kill", str(exp_id))
    assert killed.returncode == 0, killed.stderr
    exp = _wait(lambda: (e := api.get(f"/api/v1/experiments/{exp_id}").json())["state"] == "CANCELED" and e,
                what="experiment canceled")
    assert exp["trial_states"] == {"CANCELED": 1}


def test_a_lost_worker_s_trial_resumes_on_another_worker_from_its_checkpoint(kiln_stack: Stack, tmp_path: Path) -> None:
    """kill -9 the worker mid-trial: the trial restarts elsewhere from its checkpoint; no step lost or doubled."""
    steps = 12
    _write(tmp_path, steps=steps, delay=0.4)
    created = kiln_stack.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path))
    exp_id = _created_id(created.stdout)
    api = kiln_stack.http  # signed in as admin

    def running_with_checkpoints() -> dict | None:  # type: ignore[type-arg]
        trials = api.get(f"/api/v1/experiments/{exp_id}/trials").json()
        if trials and trials[0]["state"] == "RUNNING" and (trials[0]["steps_completed"] or 0) >= 3:
            return trials[0]
        return None

    trial = _wait(running_with_checkpoints, what="trial running with checkpoints")
    victim = trial["worker_id"]
    pid = parts.read_pid(kiln_stack.cfg.state_dir, victim)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    try:
        _check_resumed_elsewhere(kiln_stack, exp_id, trial, victim, steps)
    finally:
        stack.up(kiln_stack.cfg)  # bring the worker back for the tests that follow


def _check_resumed_elsewhere(kiln_stack: Stack, exp_id: int, trial: dict, victim: str,  # type: ignore[type-arg]
                             steps: int) -> None:
    api = kiln_stack.http  # signed in as admin

    exp = _wait(lambda: (e := api.get(f"/api/v1/experiments/{exp_id}").json())["state"] == "COMPLETED" and e,
                timeout=120, what="experiment completed after the worker loss")
    assert exp["trial_states"] == {"COMPLETED": 1}
    detail = api.get(f"/api/v1/trials/{trial['id']}").json()
    assert detail["restarts"] == 1
    workers = [a["worker_id"] for a in detail["allocations"]]
    # The supervisor brings the killed worker back within seconds, so the rerun may land on it again.
    assert workers[0] == victim and len(workers) == 2
    points = api.get(f"/api/v1/trials/{trial['id']}/metrics", params={"kind": "validation"}).json()
    assert [p["steps_completed"] for p in points] == list(range(1, steps + 1))
    logs = api.get(f"/api/v1/trials/{trial['id']}/logs").json()
    assert any(line["text"].startswith("resumed at step ") for line in logs)
