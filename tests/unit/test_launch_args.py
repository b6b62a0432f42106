"""The launchers' command lines: Determined's ``[OVERRIDES... --] (--trial TRIAL | SCRIPT...)`` form."""

from __future__ import annotations

import io
import sys

import pytest

from kiln.launch import horovod, torch_distributed
from kiln.launch._common import Layout, first_traceback, strip_lines

PY = sys.executable
WRAP = [PY, "-m", "kiln.launch.wrap_rank", "RANK", "--"]


def _layout(slots: int = 2, addrs: tuple[str, ...] = (), node_rank: int = 0, port: int = 0) -> Layout:
    layout = Layout.__new__(Layout)
    layout.on_cluster, layout.slots, layout.nnodes = True, slots, max(len(addrs), 1)
    layout.node_rank, layout.chief_ip, layout.master_port = node_rank, (addrs or ("127.0.0.1",))[0], port
    return layout


def test_one_host_runs_a_standalone_torchrun_with_one_rank_per_slot_each_under_wrap_rank() -> None:
    overrides, script = torch_distributed.parse(["python3", "train.py", "--lr", "0.1"])
    assert torch_distributed.torchrun_argv(_layout(), overrides, script) == [
        PY, "-m", "torch.distributed.run", "--max_restarts=0", "--standalone", "--nproc_per_node=2",
        "--no-python", *WRAP, PY, "train.py", "--lr", "0.1"]


def test_a_host_of_a_spanning_trial_joins_node_zero_and_overrides_go_to_torchrun() -> None:
    overrides, script = torch_distributed.parse(["--log-dir=/tmp/x", "--", "bash", "run.sh"])
    argv = torch_distributed.torchrun_argv(_layout(2, ("10.0.0.1", "10.0.0.2"), 1, 29411), overrides, script)
    assert argv[:8] == [PY, "-m", "torch.distributed.run", "--max_restarts=0", "--nnodes=2", "--node_rank=1",
                        "--master_addr=10.0.0.1", "--master_port=29411"]
    assert argv[8:] == ["--nproc_per_node=2", "--log-dir=/tmp/x", "--no-python", *WRAP, "bash", "run.sh"]
    overrides, script = torch_distributed.parse(["--nproc_per_node=4", "--", "python3", "t.py"])
    assert "--nproc_per_node=2" not in torch_distributed.torchrun_argv(_layout(), overrides, script)


def test_trial_classes_go_through_kiln_exec() -> None:
    assert torch_distributed.parse(["--trial", "model_def:MyTrial"]) == \
        ([], ["python3", "-m", "kiln.exec", "model_def:MyTrial"])
    assert torch_distributed.parse(["--foo", "--trial", "model_def:T", "--"]) == \
        (["--foo"], ["python3", "-m", "kiln.exec", "model_def:T"])
    with pytest.raises(SystemExit):
        torch_distributed.parse([])


def test_horovod_runs_gloo_on_this_hosts_slots_with_horovods_rank_variable() -> None:
    assert horovod.horovodrun_argv(_layout(3), [], ["python3", "train.py"]) == [
        PY, "-m", "horovod.runner.launch", "--gloo", "-np", "3", "-H", "localhost:3",
        PY, "-m", "kiln.launch.wrap_rank", "HOROVOD_RANK", "--", PY, "train.py"]
    # Off a cluster (one slot) the user's -np sizes the host list too.
    argv = horovod.horovodrun_argv(_layout(1), ["-np", "2"], ["t.py"])
    assert argv[3:8] == ["--gloo", "-np", "2", "-H", "localhost:2"]


def test_horovodruns_line_prefix_is_removed_so_lines_start_with_the_rank() -> None:
    src = io.BytesIO(b"[1]<stdout>:[rank=1] hello\n"
                     b"Mon Dec  1 10:00:00 2026[0]<stderr>:[rank=0] Traceback (most recent call last):\n"
                     b"Process 1 exit with status code 1.\n[rank=0] x [2]<stdout>: stays\n")
    dst = io.BytesIO()
    strip_lines(src, dst, horovod.HOROVODRUN_PREFIX)
    assert dst.getvalue().decode().splitlines() == [
        "[rank=1] hello", "[rank=0] Traceback (most recent call last):", "Process 1 exit with status code 1.",
        "[rank=0] x [2]<stdout>: stays"]


def test_the_first_traceback_is_found_under_torchs_rank_prefix() -> None:
    lines = ["noise", "[rank1]: Traceback (most recent call last):", '[rank1]:   File "t.py", line 3',
             "[rank1]: ValueError: boom", "[rank1]: more"]
    assert first_traceback(lines) == ["Traceback (most recent call last):", '  File "t.py", line 3',
                                      "ValueError: boom"]
    assert first_traceback(["a", "b"]) == ["a", "b"]
