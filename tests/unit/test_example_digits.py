"""examples/digits runs on a laptop: trains, checkpoints under ./checkpoints, and resumes without drift.

Each test runs train.py in a subprocess outside any cluster (``KILN_CLUSTER_INFO`` unset), in a copy of the
example directory; the only I/O is that temporary directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from schemas.config import parse_config
from schemas.trial import CLUSTER_INFO_ENV

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits"
REPO = EXAMPLE.parents[1]
FINAL = re.compile(r"final validation_accuracy: ([0-9.]+)")


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CLUSTER_INFO_ENV}
    # The example imports ``kiln`` the way an installed package would be found.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _final_accuracy(proc: subprocess.CompletedProcess[str]) -> float:
    match = FINAL.search(proc.stdout)
    assert match, f"no final accuracy printed:\n{proc.stdout}\n{proc.stderr}"
    return float(match.group(1))


def _checkpoints(cwd: Path) -> dict[int, Path]:
    """Checkpoint directories under ./checkpoints by the epoch their metadata records."""
    found = {}
    for meta in (cwd / "checkpoints").glob("*/metadata.json"):
        found[json.loads(meta.read_text())["epoch"]] = meta.parent
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One 3-epoch local run, shared by the tests that inspect its output."""
    cwd = tmp_path_factory.mktemp("digits") / "digits"
    shutil.copytree(EXAMPLE, cwd, ignore=shutil.ignore_patterns("checkpoints", "__pycache__"))
    return cwd, _run(cwd, "--epochs", "3")


def test_local_run_trains_and_checkpoints(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    cwd, proc = trained
    assert proc.returncode == 0, proc.stderr
    assert _final_accuracy(proc) > 0.85
    ckpts = _checkpoints(cwd)
    assert sorted(ckpts) == [1, 2, 3]  # one per epoch
    last = ckpts[3]
    assert {"model.pt", "metadata.json", "state.json"} <= {p.name for p in last.iterdir()}
    meta = json.loads((last / "metadata.json").read_text())
    state = json.loads((last / "state.json").read_text())
    assert meta["steps_completed"] == state["steps"] > 0
    assert state["epoch"] == 3


def test_checkpoint_loads_into_build_model(trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    cwd, _ = trained
    # The example's model.py, loaded under its own name so no module called ``model`` lingers in sys.modules.
    spec = importlib.util.spec_from_file_location("digits_example_model", cwd / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config, _ = parse_config((EXAMPLE / "const.yaml").read_text())
    width = config.hyperparameters["width"].val  # type: ignore[union-attr]
    model = module.build_model(width)
    model.load_state_dict(torch.load(_checkpoints(cwd)[3] / "model.pt", weights_only=True))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_resume_continues_where_the_checkpoint_left_off(
        trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    cwd, full = trained
    resumed_dir = cwd.parent / "resumed"
    shutil.copytree(cwd, resumed_dir)
    uuid = _checkpoints(resumed_dir)[1].name
    proc = _run(resumed_dir, "--epochs", "3", "--latest-checkpoint", uuid)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from checkpoint" in proc.stderr
    # Same batches in the same order from the same state: the result matches the uninterrupted run.
    assert _final_accuracy(proc) == _final_accuracy(full)
    steps_per_epoch = json.loads((_checkpoints(cwd)[1] / "state.json").read_text())["steps"]
    reported = [int(s) for s in re.findall(r"ValidationReported\(.*?steps_completed=(\d+)", proc.stderr)]
    assert reported == [2 * steps_per_epoch, 3 * steps_per_epoch]  # no epoch repeated or skipped


def test_const_config_parses() -> None:
    config, warnings = parse_config((EXAMPLE / "const.yaml").read_text())
    assert warnings == []
    assert config.searcher.metric == "validation_accuracy"
    assert config.full_length == 5
