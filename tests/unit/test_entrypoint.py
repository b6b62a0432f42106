"""How a worker turns entrypoints into command lines: commands, module:function, one process per slot."""

from __future__ import annotations

import sys

import pytest

from services.worker.runner import entrypoint_argv

PY = sys.executable


@pytest.mark.parametrize(
    ("entrypoint", "processes", "argv"),
    [
        ("python3 train.py --lr 0.1", 1, [PY, "train.py", "--lr", "0.1"]),
        ("model_def:main", 1, [PY, "-m", "kiln.exec", "model_def:main"]),
        (["python", "-u", "train.py"], 1, [PY, "-u", "train.py"]),
        ("python3 train.py", 4, [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "train.py"]),
        ("model_def:main", 2,
         [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kiln.exec", "model_def:main"]),
        ("torchrun --nproc_per_node=8 train.py", 2, ["torchrun", "--nproc_per_node=8", "train.py"]),
        ("bash run.sh", 2, ["bash", "run.sh"]),
    ],
)
def test_entrypoint_command_lines(entrypoint: str | list[str], processes: int, argv: list[str]) -> None:
    assert entrypoint_argv(entrypoint, PY, processes) == argv
