"""A trial larger than any worker: it spans workers, one process per slot, ranks numbered across hosts."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest

from deploy import parts, stack
from tests.e2e.conftest import Stack
from tests.e2e.test_scheduling import _ended, _get, _wait

pytestmark = pytest.mark.e2e

SPANNING_TRAIN = textwrap.dedent("""\
    import json, time
    import kiln as det

    info = det.get_cluster_info()
    with det.core.init() as ctx:
        d = ctx.distributed
        hosts = d.allgather(info.agent_id)
        start = 0
        if info.latest_checkpoint:
            with ctx.checkpoint.restore_path(info.latest_checkpoint) as path:
                start = json.loads((path / "state.json").read_text())["step"]
        for step in range(start + 1, STEPS + 1):
            time.sleep(DELAY)
            seen = d.allgather(step)  # a collective every step: every rank is in the same step
            assert seen == [step] * d.size, seen
            if d.rank == 0:
                ctx.train.report_validation_metrics(
                    steps_completed=step, metrics={"accuracy": step / STEPS, "world": d.size,
                                                   "hosts": len(set(hosts))})
            with ctx.checkpoint.store_path({"steps_completed": step}) as (path, _):
                (path / "state.json").write_text(json.dumps({"step": step}))
        print(f"rank {d.rank} of {d.size} on {info.agent_id} (host {info.container_rank}) done", flush=True)
""")


def _submit(kiln_stack: Stack, tmp_path: Path, steps: int, delay: float, max_restarts: int) -> int:
    (tmp_path / "train.py").write_text(SPANNING_TRAIN.replace("STEPS", str(steps)).replace("DELAY", str(delay)))
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent(f"""\
        name: spanning
        entrypoint: python3 train.py
        searcher: {{name: single, metric: accuracy, smaller_is_better: false, max_length: {{batches: {steps}}}}}
        resources: {{slots_per_trial: 2}}
        max_restarts: {max_restarts}
    """))
    run = kiln_stack.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path))
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split("Created experiment ", 1)[1].split()[0])


def _assignments(kiln_stack: Stack, exp_id: int) -> list[dict[str, Any]]:
    events = _get(kiln_stack, f"/api/v1/experiments/{exp_id}/events")
    return [e["event"] for e in events if e["type"] == "AllocationAssigned"]


def test_a_two_slot_trial_on_one_slot_workers_spans_two_of_them(kiln_stack: Stack, tmp_path: Path) -> None:
    assert kiln_stack.cfg.slots_per_worker == 1 < 2 <= kiln_stack.cfg.workers
    steps = 5
    exp_id = _submit(kiln_stack, tmp_path, steps, delay=0.1, max_restarts=0)
    assert _wait(lambda: _ended(kiln_stack, exp_id), timeout=180, what="spanning experiment")["state"] == \
        "COMPLETED"

    (trial,) = _get(kiln_stack, f"/api/v1/experiments/{exp_id}/trials")
    assert trial["state"] == "COMPLETED" and trial["restarts"] == 0
    # One world of two ranks on two different workers, reported once per step by the chief.
    assert trial["latest_validation"]["metrics"] == {"accuracy": 1.0, "world": 2, "hosts": 2}
    assert trial["steps_completed"] == steps

    # The audit trail: one assignment per host, ranks 0 and 1, one allocation, one rendezvous.
    # The trial's allocation lists both hosts, in rank order, for people and for the API.
    (alloc,) = kiln_stack.http.get(f"{kiln_stack.cfg.master_url}/api/v1/trials/{trial['id']}").json()["allocations"]
    hosts = [n["worker_id"] for n in alloc["nodes"]]
    assert len(set(hosts)) == 2 and alloc["worker_id"] == hosts[0] and alloc["exit_code"] == 0
    described = kiln_stack.kiln("trial", "describe", str(trial["id"]))
    assert f"allocation {alloc['id']} on {hosts[0]}, {hosts[1]}: exit=0" in described.stdout, described.stdout

    assigned = _assignments(kiln_stack, exp_id)
    assert sorted(a.get("node_rank", 0) for a in assigned) == [0, 1]
    assert len({a["worker_id"] for a in assigned}) == 2
    assert len({(a["allocation_id"], a["master_port"]) for a in assigned}) == 1

    # Both hosts' output reached the trial's logs.
    logs = kiln_stack.http.get(f"{kiln_stack.cfg.master_url}/api/v1/trials/{trial['id']}/logs",
                     params={"limit": 5000}).json()
    done = sorted(line["text"].split(" done")[0] for line in logs
                  if " done" in line["text"] and "rank " in line["text"])
    assert [t.split(" on ")[0] for t in done] == ["rank 0 of 2", "rank 1 of 2"]
    assert {t.split("(host ")[1] for t in done} == {"0)", "1)"}


def test_losing_one_host_of_a_spanning_trial_stops_the_other_and_resumes_both_from_the_checkpoint(
        kiln_stack: Stack, tmp_path: Path) -> None:
    """kill -9 the worker of rank 1: rank 0 is stopped (not left waiting in a collective), and the
    trial restarts on two live workers from its checkpoint, with every validation step exactly once."""
    steps = 14
    exp_id = _submit(kiln_stack, tmp_path, steps, delay=0.4, max_restarts=2)
    api = kiln_stack.http  # signed in as admin

    def running_with_checkpoints() -> dict[str, Any] | None:
        trials = _get(kiln_stack, f"/api/v1/experiments/{exp_id}/trials")
        if trials and trials[0]["state"] == "RUNNING" and (trials[0]["steps_completed"] or 0) >= 3:
            return trials[0]  # type: ignore[no-any-return]
        return None

    trial = _wait(running_with_checkpoints, what="spanning trial running with checkpoints")
    first = {a.get("node_rank", 0): a for a in _assignments(kiln_stack, exp_id)}
    victim, survivor = first[1]["worker_id"], first[0]["worker_id"]
    pid = parts.read_pid(kiln_stack.cfg.state_dir, victim)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    try:
        exp = _wait(lambda: _ended(kiln_stack, exp_id), timeout=150, what="experiment after the host loss")
        assert exp["state"] == "COMPLETED"
        detail = api.get(f"/api/v1/trials/{trial['id']}").json()
        assert detail["restarts"] == 1
        points = api.get(f"/api/v1/trials/{trial['id']}/metrics", params={"kind": "validation"}).json()
        assert [p["steps_completed"] for p in points] == list(range(1, steps + 1))
        assert points[-1]["metrics"]["hosts"] == 2
        # Rank 0's process on the surviving host was killed on request, not left to time out.
        events = _get(kiln_stack, f"/api/v1/experiments/{exp_id}/events")
        kills = [e["event"] for e in events if e["type"] == "AllocationKillRequested"]
        assert {(k["allocation_id"], k["worker_id"]) for k in kills} >= {(first[0]["allocation_id"], survivor)}

        def first_exits() -> list[dict[str, Any]]:
            return [e["event"] for e in _get(kiln_stack, f"/api/v1/experiments/{exp_id}/events")
                    if e["type"] == "AllocationExited" and e["event"]["allocation_id"] == first[0]["allocation_id"]]

        try:
            exits = _wait(first_exits, timeout=30, what="the survivor's exit")
        except AssertionError:
            print([(e["type"], e["event"].get("worker_id"), e["event"].get("allocation_id"))
                   for e in _get(kiln_stack, f"/api/v1/experiments/{exp_id}/events")])
            raise
        assert [(x["worker_id"], x["killed"]) for x in exits] == [(survivor, True)]
        # The rerun spans two hosts again (the supervisor may have brought the killed one back already).
        rerun = [a for a in _assignments(kiln_stack, exp_id) if a["allocation_id"] != first[0]["allocation_id"]]
        assert len(rerun) == 2 and len({a["worker_id"] for a in rerun}) == 2
    finally:
        stack.up(kiln_stack.cfg)  # bring the worker back for the tests that follow
