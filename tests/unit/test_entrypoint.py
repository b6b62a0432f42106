"""How a worker turns entrypoints into command lines: commands, module:function, one process per slot."""

from __future__ import annotations

import sys

import pytest

from services.worker.runner import Rendezvous, entrypoint_argv

PY = sys.executable


@pytest.mark.parametrize(
    ("entrypoint", "processes", "argv"),
    [
        ("python3 train.py --lr 0.1", 1, [PY, "train.py", "--lr", "0.1"]),
        ("model_def:main", 1, [PY, "-m", "kiln.exec", "model_def:main"]),
        (["python", "-u", "train.py"], 1, [PY, "-u", "train.py"]),
        ("python3 train.py", 4, [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "train.py"]),
        ("model_def:main", 2,
         [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kiln.exec",
          "model_def:main"]),
        ("torchrun --nproc_per_node=8 train.py", 2, ["torchrun", "--nproc_per_node=8", "train.py"]),
        ("bash run.sh", 2, ["bash", "run.sh"]),
    ],
)
def test_entrypoint_command_lines(entrypoint: str | list[str], processes: int, argv: list[str]) -> None:
    assert entrypoint_argv(entrypoint, PY, processes) == argv


def test_a_host_of_a_spanning_trial_joins_node_zeros_rendezvous_with_its_own_rank_and_processes() -> None:
    rdzv = Rendezvous(nnodes=2, node_rank=1, master_addr="10.0.0.7", master_port=29411)
    assert entrypoint_argv("python3 train.py", PY, 1, rdzv) == [
        PY, "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--nproc_per_node=1",
        "--master_addr=10.0.0.7", "--master_port=29411", "train.py",
    ]
    # A single host never needs a rendezvous address; an entrypoint with its own launcher is left alone.
    assert entrypoint_argv("python3 train.py", PY, 1, Rendezvous(nnodes=1, node_rank=0, master_addr="",
                                                                 master_port=0)) == [PY, "train.py"]
    assert entrypoint_argv("horovodrun -np 4 python train.py", PY, 2, rdzv)[0] == "horovodrun"


@pytest.mark.parametrize("module", ["kiln.launch.torch_distributed", "determined.launch.torch_distributed",
                                    "kiln.launch.horovod", "determined.launch.deepspeed"])
def test_an_entrypoint_running_a_launcher_module_is_run_once_per_host_not_wrapped_again(module: str) -> None:
    entrypoint = f"python3 -m {module} python3 train.py --epochs 2"
    expected = [PY, "-m", module, "python3", "train.py", "--epochs", "2"]
    assert entrypoint_argv(entrypoint, PY, 2) == expected
    rdzv = Rendezvous(nnodes=2, node_rank=1, master_addr="10.0.0.7", master_port=29411)
    assert entrypoint_argv(entrypoint, PY, 2, rdzv) == expected
    # wrap_rank starts no ranks: a script under it is still started once per slot.
    assert entrypoint_argv("python3 -m kiln.launch.wrap_rank RANK -- python3 train.py", PY, 2)[:3] == \
        [PY, "-m", "torch.distributed.run"]


def test_a_script_that_starts_its_ranks_under_wrap_rank_is_its_own_launcher(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from services.worker.runner import script_launches_own_ranks

    (tmp_path / "launcher.py").write_text('cmd = ["python3", "-m", "determined.launch.wrap_rank", str(rank), "--"]\n')
    (tmp_path / "train.py").write_text("import kiln as det\n")
    assert script_launches_own_ranks("python3 launcher.py launcher", tmp_path)
    assert not script_launches_own_ranks("python3 train.py", tmp_path)
    assert not script_launches_own_ranks("python3 missing.py", tmp_path)
    assert not script_launches_own_ranks("python3 ../launcher.py", tmp_path / "sub")
    assert entrypoint_argv("python3 launcher.py launcher", PY, 2, launches_own_ranks=True) == \
        [PY, "launcher.py", "launcher"]
