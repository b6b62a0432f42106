"""Sharing the cluster: priority preemption, pause/activate, the live job queue."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Stack, wait_for
from tests.e2e.test_lifecycle import CONFIG, SLOW_TRAIN

pytestmark = pytest.mark.e2e


def _submit(stack: Stack, tmp: Path, name: str, steps: int, delay: float, priority: int | None = None) -> int:
    d = tmp / name
    d.mkdir()
    (d / "train.py").write_text(SLOW_TRAIN.replace("STEPS", str(steps)).replace("DELAY", str(delay)))
    config = CONFIG.replace("STEPS", str(steps)).replace("name: slow", f"name: {name}")
    if priority is not None:
        config += f"resources: {{priority: {priority}}}\n"
    (d / "cfg.yaml").write_text(config)
    run = stack.kiln("experiment", "create", str(d / "cfg.yaml"), str(d))
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split("Created experiment ", 1)[1].split()[0])


def _get(stack: Stack, path: str) -> Any:
    return stack.http.get(f"{stack.cfg.master_url}{path}").json()


_wait = functools.partial(wait_for, timeout=90.0)


def _running_with_steps(stack: Stack, exp_id: int, steps: int) -> dict[str, Any] | None:
    trials = _get(stack, f"/api/v1/experiments/{exp_id}/trials")
    if trials and trials[0]["state"] == "RUNNING" and trials[0]["steps_completed"] >= steps:
        return trials[0]  # type: ignore[no-any-return]
    return None


def _ended(stack: Stack, exp_id: int) -> dict[str, Any] | None:
    exp = _get(stack, f"/api/v1/experiments/{exp_id}")
    if "state" not in exp:  # an error body: not projected yet (404) right after submission
        return None
    return exp if exp["state"] in ("COMPLETED", "ERROR", "CANCELED") else None


def test_priority_10_preempts_priority_50_which_resumes_and_finishes(kiln_stack: Stack, tmp_path: Path) -> None:
    """Every slot busy at priority 50; a priority-10 trial takes one; the victim resumes from its checkpoint."""
    workers = kiln_stack.cfg.workers * kiln_stack.cfg.slots_per_worker
    # Long enough that no low-priority trial can finish before the high-priority one arrives, even on a
    # loaded machine (then a slot would simply be free and nothing would be preempted).
    low_steps = 40
    low = [_submit(kiln_stack, tmp_path, f"low{i}", steps=low_steps, delay=0.3, priority=50) for i in range(workers)]
    for exp_id in low:
        _wait(lambda e=exp_id: _running_with_steps(kiln_stack, e, 2), what="low-priority trials running")
    high = _submit(kiln_stack, tmp_path, "high", steps=3, delay=0.2, priority=10)

    # The queue is live: the high-priority trial shows up in `kiln job list` (queued, or already placed).
    def listed() -> bool:
        jobs = json.loads(kiln_stack.kiln("job", "list", "--json").stdout)
        return any(j["experiment_id"] == high for j in jobs) or _ended(kiln_stack, high) is not None

    _wait(listed, what="the high-priority trial in the job list")

    assert _wait(lambda: _ended(kiln_stack, high), what="high-priority experiment")["state"] == "COMPLETED"
    for exp_id in low:
        assert _wait(lambda e=exp_id: _ended(kiln_stack, e), timeout=120, what="low experiments")["state"] == \
            "COMPLETED"
    preempted = []
    for exp_id in low:
        (trial,) = _get(kiln_stack, f"/api/v1/experiments/{exp_id}/trials")
        detail = _get(kiln_stack, f"/api/v1/trials/{trial['id']}")
        points = _get(kiln_stack, f"/api/v1/trials/{trial['id']}/metrics?kind=validation")
        assert [p["steps_completed"] for p in points] == list(range(1, low_steps + 1))  # none lost or doubled
        assert detail["restarts"] == 0  # a preemption is not a failure
        if any(a["end_reason"] == "preempted" for a in detail["allocations"]):
            preempted.append(exp_id)
            assert len(detail["allocations"]) >= 2
    assert len(preempted) == 1


def test_pause_releases_the_slot_and_activate_resumes_from_the_checkpoint(kiln_stack: Stack, tmp_path: Path) -> None:
    exp_id = _submit(kiln_stack, tmp_path, "pausable", steps=14, delay=0.3)
    trial = _wait(lambda: _running_with_steps(kiln_stack, exp_id, 3), what="trial running")
    paused = kiln_stack.kiln("experiment", "pause", str(exp_id))
    assert paused.returncode == 0 and "PAUSED" in paused.stdout

    def released() -> bool:
        t = _get(kiln_stack, f"/api/v1/trials/{trial['id']}")
        agents = _get(kiln_stack, "/api/v1/agents")
        holding = [s for a in agents for s in a["slots"] if s["trial_id"] == trial["id"]]
        return t["state"] == "QUEUED" and not holding

    _wait(released, what="slot released")
    time.sleep(2.0)
    assert _get(kiln_stack, f"/api/v1/trials/{trial['id']}")["state"] == "QUEUED"  # stays put while paused
    assert _get(kiln_stack, f"/api/v1/experiments/{exp_id}")["state"] == "PAUSED"

    activated = kiln_stack.kiln("experiment", "activate", str(exp_id))
    assert activated.returncode == 0, activated.stderr
    assert _wait(lambda: _ended(kiln_stack, exp_id), what="experiment end")["state"] == "COMPLETED"
    points = _get(kiln_stack, f"/api/v1/trials/{trial['id']}/metrics?kind=validation")
    assert [p["steps_completed"] for p in points] == list(range(1, 15))
    logs = _get(kiln_stack, f"/api/v1/trials/{trial['id']}/logs")
    assert any(line["text"].startswith("resumed at step ") for line in logs)


def test_agent_slot_and_job_listings(kiln_stack: Stack) -> None:
    """The cluster view names every worker and its CPU slots."""
    n = kiln_stack.cfg.workers
    agents = _wait(lambda: json.loads(kiln_stack.kiln("agent", "list", "--json").stdout), what="agents")
    assert sorted(a["worker_id"] for a in agents) == [f"worker-{i}" for i in range(n)]
    slots = json.loads(kiln_stack.kiln("slot", "list", "--json").stdout)
    assert all(s["slot"]["kind"] == "cpu" for s in slots) and len(slots) == n * kiln_stack.cfg.slots_per_worker
    assert kiln_stack.kiln("job", "list").returncode == 0


def test_a_request_the_cluster_can_never_hold_says_so_in_the_job_list(kiln_stack: Stack, tmp_path: Path) -> None:
    """slots_per_trial above every slot the pool has: the trial waits, and `kiln job list` says why."""
    total = kiln_stack.cfg.workers * kiln_stack.cfg.slots_per_worker
    d = tmp_path / "huge"
    d.mkdir()
    (d / "train.py").write_text(SLOW_TRAIN.replace("STEPS", "1").replace("DELAY", "0"))
    (d / "cfg.yaml").write_text(CONFIG.replace("STEPS", "1").replace("name: slow", "name: huge")
                                + f"resources: {{slots_per_trial: {total + 6}}}\n")
    run = kiln_stack.kiln("experiment", "create", str(d / "cfg.yaml"), str(d))
    assert run.returncode == 0, run.stderr
    exp_id = int(run.stdout.split("Created experiment ", 1)[1].split()[0])

    def explained() -> dict[str, Any] | None:
        jobs = json.loads(kiln_stack.kiln("job", "list", "--json").stdout)
        return next((j for j in jobs if j["experiment_id"] == exp_id and j["reason"]), None)

    job = _wait(explained, what="the waiting reason in the job list")
    assert job["state"] == "QUEUED" and f"needs {total + 6} slots" in job["reason"]
    assert f"has {total} slots" in job["reason"]
    table = kiln_stack.kiln("job", "list")
    assert f"needs {total + 6} slots" in table.stdout
    assert kiln_stack.kiln("experiment", "kill", str(exp_id)).returncode == 0
