"""A multi-slot trial's launch, for real: torchrun starts one process per slot running the Core API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deploy.ports import free_port_block
from services.worker.runner import Rendezvous, entrypoint_argv

pytestmark = pytest.mark.integration
PY = sys.executable


def test_two_slots_run_two_ranks_that_agree_through_the_core_api(tmp_path: Path) -> None:
    """The launch a 2-slot trial gets: two ranks, collectives work, the chief alone stores the checkpoint."""
    (tmp_path / "train.py").write_text(textwrap.dedent("""\
        import json, kiln
        with kiln.core.init() as ctx:
            d = ctx.distributed
            ranks = d.allgather(d.rank)
            storage_id = None
            if d.rank == 0:  # Determined's contract: only the chief stores an unsharded checkpoint
                with ctx.checkpoint.store_path({"steps_completed": 1}) as (path, storage_id):
                    (path / "w").write_text("x")
            ids = d.allgather(storage_id)
            stop = ctx.preempt.should_preempt()
            out = {"rank": d.rank, "size": d.size, "ranks": ranks, "ids": ids, "stop": stop}
            open(f"rank{d.rank}.json", "w").write(json.dumps(out))
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    run = subprocess.run(entrypoint_argv("python3 train.py", PY, 2), cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(o["rank"] for o in outs) == [0, 1]
    assert all(o["size"] == 2 and o["ranks"] == [0, 1] and not o["stop"] for o in outs)
    assert all(o["ids"][1] is None and o["ids"][0] == outs[0]["ids"][0] for o in outs)
    stored = list((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in stored] == [outs[0]["ids"][0]]  # only the chief wrote it


def test_two_hosts_with_unequal_slots_run_one_job_whose_ranks_span_both(tmp_path: Path) -> None:
    """The launch a 3-slot trial spread over two hosts (2 + 1 slots) gets: three ranks, one world.

    Each host's torchrun joins node 0's rendezvous; ranks are numbered across hosts and every rank
    knows which host it is on, so the per-host collectives group the right ranks.
    """
    script = textwrap.dedent("""\
        import json, kiln
        with kiln.core.init() as ctx:
            d = ctx.distributed
            out = {"rank": d.rank, "size": d.size, "host": d.cross_rank, "hosts": d.cross_size,
                   "all": d.allgather(d.rank), "local": d.allgather_local(d.rank),
                   "chief": d.broadcast(d.rank == 0), "stop": ctx.preempt.should_preempt()}
            open(f"rank{d.rank}.json", "w").write(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    port = free_port_block(1, "127.0.0.1")
    procs = []
    for node, slots in ((0, 2), (1, 1)):
        host_dir = tmp_path / f"host{node}"
        host_dir.mkdir()
        (host_dir / "train.py").write_text(script)
        argv = entrypoint_argv("python3 train.py", PY, slots,
                               Rendezvous(nnodes=2, node_rank=node, master_addr="127.0.0.1", master_port=port))
        procs.append(subprocess.Popen(argv, cwd=host_dir, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
    outs = {r: json.loads(next(tmp_path.glob(f"host*/rank{r}.json")).read_text()) for r in range(3)}
    assert all(o["size"] == 3 and o["all"] == [0, 1, 2] and o["hosts"] == 2 and not o["stop"] for o in outs.values())
    assert all(o["chief"] is True for o in outs.values())  # rank 0's answer, everywhere
    on_host = {r: o["host"] for r, o in outs.items()}
    assert sorted(on_host.values()) == [0, 0, 1]
    for r, o in outs.items():
        assert o["local"] == [q for q in range(3) if on_host[q] == on_host[r]]
    assert sorted(p.parent.name for p in tmp_path.glob("host*/rank*.json")) == ["host0", "host0", "host1"]
