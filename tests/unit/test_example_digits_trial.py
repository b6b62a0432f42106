"""examples/digits/model_def.py (the PyTorchTrial version) runs on a laptop, checkpoints, resumes and loads.

Each run is a subprocess outside any cluster, in a copy of the example directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.config import parse_config
from schemas.trial import CLUSTER_INFO_ENV

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits"
REPO = EXAMPLE.parents[1]
VALIDATION = re.compile(r"ValidationReported\(.*?steps_completed=(\d+), metrics=\{.*?'validation_accuracy': ([0-9.]+)")


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CLUSTER_INFO_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def _checkpoints(cwd: Path) -> dict[int, str]:
    return {json.loads(m.read_text())["steps_completed"]: m.parent.name
            for m in (cwd / "checkpoints").glob("*/metadata.json")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    cwd = tmp_path_factory.mktemp("digits-trial") / "digits"
    shutil.copytree(EXAMPLE, cwd, ignore=shutil.ignore_patterns("checkpoints", "__pycache__"))
    return cwd, _run(cwd, "model_def.py", "--epochs", "2")


def test_local_run_validates_and_checkpoints_each_epoch(
        trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    cwd, proc = trained
    assert proc.returncode == 0, proc.stderr
    validations = [(int(s), float(a)) for s, a in VALIDATION.findall(proc.stderr)]
    assert [s for s, _ in validations] == [45, 90]  # 1437 training images in batches of 32: 45 an epoch
    assert validations[-1][1] > 0.85
    assert sorted(_checkpoints(cwd)) == [45, 90]


def test_resume_continues_to_the_same_result(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    cwd, full = trained
    resumed_dir = cwd.parent / "resumed"
    shutil.copytree(cwd, resumed_dir)
    proc = _run(resumed_dir, "model_def.py", "--epochs", "2", "--latest-checkpoint", _checkpoints(cwd)[45])
    assert proc.returncode == 0, proc.stderr
    assert VALIDATION.findall(proc.stderr) == VALIDATION.findall(full.stderr)[1:]  # epoch 2, identical


def test_the_checkpoint_loads_as_a_trial(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    cwd, _ = trained
    path = cwd / "checkpoints" / _checkpoints(cwd)[90]
    code = ("import sys, torch; from kiln import pytorch\n"
            "trial = pytorch.load_trial_from_checkpoint_path(sys.argv[1])\n"
            "x, y = trial.val_data.tensors\n"
            "print((trial.model(x).argmax(1) == y).float().mean().item())")
    proc = _run(cwd, "-c", code, str(path))
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip()) > 0.85


def test_the_pytorch_trial_config_parses() -> None:
    config, warnings = parse_config((EXAMPLE / "pytorch_trial.yaml").read_text())
    assert warnings == []
    assert config.entrypoint == "python3 model_def.py"
    assert config.hyperparameters["global_batch_size"].val == 32  # type: ignore[union-attr]
