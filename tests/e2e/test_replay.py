"""Event replay for audit: rebuild every projection from the log and compare it with the live one."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from schemas import context
from tests.e2e.conftest import REPO, Stack, wait_for

pytestmark = pytest.mark.e2e


def test_replay_verify_is_equal_after_real_runs_and_the_audit_trail_tells_the_story(kiln_stack: Stack) -> None:
    """After an experiment ran (and whatever earlier tests ran), `kiln events replay --verify` rebuilds
    an identical read model; `kiln experiment events` lists what happened, in order."""
    run = kiln_stack.kiln("experiment", "create", "examples/digits/const.yaml", "examples/digits", "--follow")
    assert run.returncode == 0, run.stdout + run.stderr
    exp_id = int(run.stdout.split("Created experiment ", 1)[1].split()[0])

    def retention_done() -> bool:
        # Checkpoint retention runs just after the end (searcher decides, gateway deletes): a replay taken in
        # between would compare against a live model that is still moving.
        kinds = [e["type"] for e in json.loads(kiln_stack.kiln("experiment", "events", str(exp_id), "--json").stdout)]
        return kinds.count("CheckpointsDeleted") >= kinds.count("CheckpointGCRequested")

    wait_for(retention_done, timeout=60, what="checkpoint retention after the end")
    replay = kiln_stack.kiln("events", "replay", "--verify", "--state-dir", str(kiln_stack.cfg.state_dir))
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "reproducible (every table equal)" in replay.stdout

    trail = json.loads(kiln_stack.kiln("experiment", "events", str(exp_id), "--json").stdout)
    kinds = [e["type"] for e in trail]
    assert kinds[0] == "ExperimentSubmitted" and "ExperimentEnded" in kinds
    # After the end, only checkpoint retention: what the searcher collects and the gateway deletes.
    after_end = set(kinds[kinds.index("ExperimentEnded") + 1:])
    assert after_end <= {"CheckpointGCRequested", "CheckpointsDeleted"}, after_end
    for fact in ("TrialCreated", "AllocationAssigned", "TrialStarted", "ValidationReported", "CheckpointStored",
                 "AllocationExited", "TrialExited"):
        assert fact in kinds, fact
    seqs = [e["seq"] for e in trail]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert kinds.index("TrialCreated") < kinds.index("AllocationAssigned") < kinds.index("TrialExited")


def test_an_experiment_s_metrics_stream_live_as_server_sent_events(kiln_stack: Stack) -> None:
    """GET /experiments/{id}/metrics/stream relays training and validation points live, then `end`."""
    api = kiln_stack.cfg.master_url
    with httpx.Client(base_url=api, timeout=120, headers=kiln_stack.headers) as http:
        created = http.post("/api/v1/experiments", data={"config": (REPO / "examples/digits/const.yaml").read_text()},
                            files={"context": ("c.tar.gz", context.pack(REPO / "examples/digits"), "application/gzip")})
        assert created.status_code == 201, created.text
        exp_id = created.json()["id"]
        deadline = time.monotonic() + 30
        while http.get(f"/api/v1/experiments/{exp_id}").status_code == 404:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        seen: dict[str, list[dict]] = {"training": [], "validation": [], "end": []}  # type: ignore[type-arg]
        event = None
        with http.stream("GET", f"/api/v1/experiments/{exp_id}/metrics/stream") as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: ") and event in seen:
                    seen[event].append(json.loads(line[len("data: "):]))
                    if event == "end":
                        break
    assert seen["end"] == [{"state": "COMPLETED"}]
    assert seen["training"] and all("loss" in p["metrics"] for p in seen["training"])
    steps = [p["steps_completed"] for p in seen["validation"]]
    assert steps and steps == sorted(steps)
