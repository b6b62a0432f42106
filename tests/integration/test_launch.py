"""A multi-slot trial's launch, for real: torchrun starts one process per slot running the Core API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.worker.runner import entrypoint_argv

pytestmark = pytest.mark.integration
PY = sys.executable


def test_two_slots_run_two_ranks_that_agree_through_the_core_api(tmp_path: Path) -> None:
    """The launch a 2-slot trial gets: two ranks, collectives work, both see the chief's checkpoint id."""
    (tmp_path / "train.py").write_text(textwrap.dedent("""\
        import json, kiln
        with kiln.core.init() as ctx:
            d = ctx.distributed
            ranks = d.allgather(d.rank)
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
    assert all(len(set(o["ids"])) == 1 for o in outs)  # one checkpoint, one id, on every rank
    stored = list((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in stored] == [outs[0]["ids"][0]]  # only the chief wrote it
