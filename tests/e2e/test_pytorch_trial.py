"""End to end: the PyTorchTrial digits example, trained by kiln.pytorch.Trainer on the whole local stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.e2e.conftest import REPO, Stack

pytestmark = pytest.mark.e2e


def test_pytorch_trial_digits_completes_with_validations_and_a_loadable_checkpoint(kiln_stack: Stack,
                                                                                  tmp_path: Path) -> None:
    """`kiln experiment create examples/digits/pytorch_trial.yaml examples/digits --follow` ends COMPLETED."""
    run = kiln_stack.kiln("experiment", "create", "examples/digits/pytorch_trial.yaml", "examples/digits", "--follow")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "COMPLETED" in run.stdout
    experiment_id = int(run.stdout.split("Created experiment ", 1)[1].split()[0])
    described = json.loads(kiln_stack.kiln("experiment", "describe", str(experiment_id), "--json").stdout)
    (trial,) = described["trials"]
    assert trial["state"] == "COMPLETED"

    served = kiln_stack.http.get(f"{kiln_stack.cfg.master_url}/api/v1/trials/{trial['id']}/metrics",
                                 params={"kind": "validation"}).json()
    # One validation per epoch (45 batches of 32), each carrying the epochs the searcher reads.
    assert [p["steps_completed"] for p in served] == [45, 90, 135]
    assert [p["metrics"]["epochs"] for p in served] == [1, 2, 3]
    assert served[-1]["metrics"]["validation_accuracy"] > 0.85

    # kiln.pytorch runs the Core API in AUTO mode: the Trainer's metrics are TensorBoard scalars in the store.
    files = kiln_stack.http.get(f"/api/v1/trials/{trial['id']}/tensorboard/files").json()["files"]
    board = tmp_path / "board"
    for f in files:
        got = kiln_stack.http.get(f"/api/v1/trials/{trial['id']}/tensorboard/file", params={"path": f["path"]})
        assert got.status_code == 200 and len(got.content) == f["size"]
        (board / f["path"]).parent.mkdir(parents=True, exist_ok=True)
        (board / f["path"]).write_bytes(got.content)
    events = EventAccumulator(str(board), size_guidance={"tensors": 0})
    events.Reload()
    assert [e.step for e in events.Tensors("validation/validation_accuracy")] == [45, 90, 135]
    assert "training/loss" in events.Tags()["tensors"]

    uuid = trial["latest_checkpoint"]
    assert uuid
    target = tmp_path / "ckpt"
    dl = kiln_stack.kiln("checkpoint", "download", uuid, str(target))
    assert dl.returncode == 0, dl.stderr
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from kiln import pytorch\n"
            "trial = pytorch.load_trial_from_checkpoint_path(sys.argv[1])\n"
            "x, y = trial.val_data.tensors\n"
            "print((trial.model(x).argmax(1) == y).float().mean().item())")
    loaded = subprocess.run([sys.executable, "-c", code, str(target), str(REPO / "examples" / "digits")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert float(loaded.stdout.strip()) > 0.85
