"""Determined's distributed Core API contract, on real processes (2 ranks, CPU, gloo), without a cluster.

The scripts are Determined's patterns with ``import determined as det`` changed to ``import kiln as det``:
the chief alone stores an unsharded checkpoint and reports metrics; a sharded checkpoint is written by every
rank; a context built by hand from ``chief_ip``/``pub_port`` works without torchrun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deploy.ports import free_port_block

pytestmark = pytest.mark.integration
PY = sys.executable
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "DET_"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def _torchrun(tmp_path: Path, script: str, nproc: int = 2, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    (tmp_path / "train.py").write_text(textwrap.dedent(script))
    argv = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    # Its own session, so a hung run's ranks are killed with torchrun and not left behind.
    proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the ranks hung (desync): {err[-2000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_only_the_chief_stores_an_unsharded_checkpoint_and_the_ranks_stay_in_step(tmp_path: Path) -> None:
    """Determined's core_api/4_distributed.py pattern: store_path and metrics on the chief only.

    Before the contract was Determined's, store_path ran a broadcast on every rank: here the other rank took
    the chief's checkpoint id as its should_preempt() answer and left, and the chief died or hung.
    """
    run = _torchrun(tmp_path, """\
        import json
        import kiln as det

        distributed = det.core.DistributedContext.from_torch_distributed()
        with det.core.init(distributed=distributed) as ctx:
            rank = ctx.distributed.rank
            ids, stopped_at = [], None
            for step in (1, 2, 3):
                seen = ctx.distributed.allgather(step)
                assert seen == [step, step], seen
                if rank == 0:
                    ctx.train.report_training_metrics(steps_completed=step, metrics={"loss": 1.0 / step})
                    with ctx.checkpoint.store_path({"steps_completed": step}) as (path, storage_id):
                        (path / "state.json").write_text(json.dumps({"step": step}))
                    ids.append(storage_id)
                if ctx.preempt.should_preempt():
                    stopped_at = step
                    break
            out = {"rank": rank, "ids": ids, "stopped_at": stopped_at, "last": ctx.distributed.allgather(step)}
            open(f"rank{rank}.json", "w").write(json.dumps(out))
    """)
    assert run.returncode == 0, run.stderr[-3000:]
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(o["stopped_at"] is None and o["last"] == [3, 3] for o in outs), outs
    assert outs[1]["ids"] == [] and len(outs[0]["ids"]) == 3
    stored = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert stored == sorted(outs[0]["ids"])  # three checkpoints, each stored once, by the chief
    newest = tmp_path / "checkpoints" / outs[0]["ids"][-1]
    assert json.loads((newest / "state.json").read_text()) == {"step": 3}


def test_a_non_chief_rank_calling_an_unsharded_store_neither_hangs_nor_stores(tmp_path: Path) -> None:
    """Kiln's older scripts call store_path on every rank: that still works, and only the chief's is kept."""
    run = _torchrun(tmp_path, """\
        import json
        import kiln as det

        with det.core.init() as ctx:
            with ctx.checkpoint.store_path({"steps_completed": 1}) as (path, storage_id):
                (path / f"from{ctx.distributed.rank}").write_text("x")
            open(f"rank{ctx.distributed.rank}.json", "w").write(json.dumps(storage_id))
    """)
    assert run.returncode == 0, run.stderr[-3000:]
    chief_id = json.loads((tmp_path / "rank0.json").read_text())
    assert json.loads((tmp_path / "rank1.json").read_text()) is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [chief_id]
    stored = sorted(p.name for p in (tmp_path / "checkpoints" / chief_id).iterdir())
    assert stored == ["from0", "kiln-manifest.json", "metadata.json"]
    assert "only the chief stores an unsharded checkpoint" in run.stderr


def test_a_sharded_checkpoint_holds_every_ranks_part_under_one_id(tmp_path: Path) -> None:
    run = _torchrun(tmp_path, """\
        import json
        import kiln as det

        distributed = det.core.DistributedContext.from_torch_distributed()
        with det.core.init(distributed=distributed) as ctx:
            rank = ctx.distributed.rank
            with ctx.checkpoint.store_path({"steps_completed": 7}, shard=True) as (path, storage_id):
                (path / f"model-part{rank}.bin").write_bytes(bytes([rank]) * (10 + rank))
            with ctx.checkpoint.restore_path(storage_id) as restored:
                files = sorted(p.name for p in restored.iterdir())
            open(f"rank{rank}.json", "w").write(json.dumps({"id": storage_id, "files": files}))
    """)
    assert run.returncode == 0, run.stderr[-3000:]
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert outs[0]["id"] == outs[1]["id"]
    assert all(o["files"] == ["metadata.json", "model-part0.bin", "model-part1.bin"] for o in outs)
    ckpt = tmp_path / "checkpoints" / outs[0]["id"]
    assert (ckpt / "model-part1.bin").read_bytes() == b"\x01" * 11
    assert json.loads((ckpt / "metadata.json").read_text()) == {"steps_completed": 7}


def test_ranks_writing_the_same_file_of_a_sharded_checkpoint_fail_together(tmp_path: Path) -> None:
    run = _torchrun(tmp_path, """\
        import kiln as det

        with det.core.init() as ctx:
            with ctx.checkpoint.store_path({"steps_completed": 1}, shard=True) as (path, _):
                (path / "conflict").write_text(str(ctx.distributed.rank))
    """)
    assert run.returncode != 0
    assert "several ranks wrote the same file: conflict (ranks [0, 1])" in run.stderr
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_a_context_built_from_chief_ip_and_pub_port_runs_collectives_without_a_launcher(tmp_path: Path) -> None:
    """What ``from_horovod`` builds: the layout and the chief's address, no torchrun rendezvous."""
    port = free_port_block(1)
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""\
        import json, sys
        import kiln as det

        rank = int(sys.argv[1])
        d = det.core.DistributedContext(rank=rank, size=2, local_rank=rank, local_size=2, cross_rank=0,
                                        cross_size=1, chief_ip="127.0.0.1", pub_port={port})
        out = {{"all": d.allgather(rank * 10), "gather": d.gather(rank), "b": d.broadcast(f"from{{rank}}"),
               "local": d.gather_local(rank), "size": d.get_size(), "agents": d.get_num_agents()}}
        d.close()
        print(json.dumps(out))
    """))
    env = _env()
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    procs = [subprocess.Popen([PY, str(script), str(r)], env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for r in (0, 1)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        outs.append(json.loads(out.splitlines()[-1]))
    assert outs[0] == {"all": [0, 10], "gather": [0, 1], "b": "from0", "local": [0, 1], "size": 2, "agents": 1}
    assert outs[1] == {"all": [0, 10], "gather": None, "b": "from0", "local": None, "size": 2, "agents": 1}
