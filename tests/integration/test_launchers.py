"""Kiln's launchers on real processes (CPU, gloo), outside a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
PY = sys.executable
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "DET_"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def _run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, *argv], cwd=tmp_path, env=_env(), text=True, capture_output=True, timeout=120)


def test_wrap_rank_prefixes_every_line_and_keeps_the_exit_code(tmp_path: Path) -> None:
    (tmp_path / "t.py").write_text("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)\n")
    run = _run(tmp_path, "-m", "kiln.launch.wrap_rank", "5", "--", "python3", "t.py")
    assert (run.returncode, run.stdout, run.stderr) == (3, "[rank=5] out\n", "[rank=5] err\n")
    run = _run(tmp_path, "-m", "determined.launch.wrap_rank", "NO_SUCH_VAR", "python3", "t.py")
    assert run.returncode != 0 and "RANK must be a number" in run.stderr


def test_the_torch_launcher_runs_one_rank_per_process_and_reports_the_first_failing_ranks_error(
        tmp_path: Path) -> None:
    (tmp_path / "t.py").write_text(textwrap.dedent("""\
        import sys, time
        import kiln as det
        with det.core.init() as ctx:
            d = ctx.distributed
            print(f"rank {d.rank} of {d.size}", flush=True)
            d.allgather(d.rank)
            if "fail" in sys.argv:
                if d.rank == 1:
                    raise ValueError("rank one is broken")
                time.sleep(2)
                d.allgather(d.rank)  # the chief then fails too, on the closed connection
    """))
    ok = _run(tmp_path, "-m", "kiln.launch.torch_distributed", "--nproc_per_node=2", "--", "python3", "t.py")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert sorted(ok.stdout.splitlines()) == ["[rank=0] rank 0 of 2", "[rank=1] rank 1 of 2"]
    bad = _run(tmp_path, "-m", "determined.launch.torch_distributed", "--nproc_per_node=2", "--",
               "python3", "t.py", "fail")
    assert bad.returncode != 0
    tail = bad.stderr.splitlines()
    start = max(i for i, line in enumerate(tail) if "failed first" in line)
    assert tail[start].startswith("[kiln] rank 1 failed first (exit code 1)")
    assert tail[start + 1:][-1] == "[rank=1] ValueError: rank one is broken"


def test_horovod_and_deepspeed_launchers_say_clearly_when_their_framework_is_missing(tmp_path: Path) -> None:
    for module, name in (("kiln.launch.horovod", "Horovod"), ("kiln.launch.deepspeed", "DeepSpeed")):
        pkg = name.lower()
        if subprocess.run([PY, "-c", f"import {pkg}"], capture_output=True).returncode == 0:
            continue  # installed here: the launcher would run it
        run = _run(tmp_path, "-m", module, "python3", "t.py")
        assert run.returncode == 2
        assert f"{name} is not installed in this environment" in run.stderr
