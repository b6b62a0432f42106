"""Event replay for audit: rebuild every projection from the log and compare it with the live one."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e


def test_replay_verify_is_equal_after_real_runs_and_the_audit_trail_tells_the_story(kiln_stack: Stack) -> None:
    """After an experiment ran (and whatever earlier tests ran), `kiln events replay --verify` rebuilds
    an identical read model; `kiln experiment events` lists what happened, in order."""
    run = kiln_stack.kiln("experiment", "create", "examples/digits/const.yaml", "examples/digits", "--follow")
    assert run.returncode == 0, run.stdout + run.stderr
    exp_id = int(run.stdout.split("Created experiment ", 1)[1].split()[0])

    replay = kiln_stack.kiln("events", "replay", "--verify", "--state-dir", str(kiln_stack.cfg.state_dir))
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "reproducible (every table equal)" in replay.stdout

    trail = json.loads(kiln_stack.kiln("experiment", "events", str(exp_id), "--json").stdout)
    kinds = [e["type"] for e in trail]
    assert kinds[0] == "ExperimentSubmitted" and kinds[-1] == "ExperimentEnded"
    for fact in ("TrialCreated", "AllocationAssigned", "TrialStarted", "ValidationReported", "CheckpointStored",
                 "AllocationExited", "TrialExited"):
        assert fact in kinds, fact
    seqs = [e["seq"] for e in trail]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert kinds.index("TrialCreated") < kinds.index("AllocationAssigned") < kinds.index("TrialExited")
