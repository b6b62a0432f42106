"""Determined's distributed patterns on a real stack: launcher entrypoints on 2 slots, chief-only and
sharded checkpoints, and a failing rank whose own error is what the user sees."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Stack, wait_for

pytestmark = pytest.mark.e2e

# Determined's Core API distributed pattern; only the import differs from Determined's.
TRAIN = textwrap.dedent("""\
    import os, sys
    import kiln as det

    distributed = det.core.DistributedContext.from_torch_distributed()
    with det.core.init(distributed=distributed) as ctx:
        rank, size = ctx.distributed.rank, ctx.distributed.size
        print(f"rank {rank} of {size} started (pid {os.getpid()})", flush=True)
        for step in (1, 2):
            assert ctx.distributed.allgather(step) == [step] * size
            if "fail" in sys.argv and rank == 1:
                raise ValueError("rank one is broken")
            if rank == 0:  # Determined's contract: the chief reports and stores; the others need not call
                ctx.train.report_validation_metrics(steps_completed=step, metrics={"accuracy": step / 2})
                with ctx.checkpoint.store_path({"steps_completed": step}) as (path, _):
                    (path / "model.txt").write_text(str(step))
            if ctx.preempt.should_preempt():
                break
        with ctx.checkpoint.store_path({"steps_completed": 2, "sharded": True}, shard=True) as (path, _):
            (path / f"part{rank}.txt").write_text(str(rank))
""")


def _run(stack: Stack, tmp_path: Path, entrypoint: str, max_restarts: int = 0) -> tuple[dict[str, Any], int]:
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent(f"""\
        name: dist
        entrypoint: {entrypoint}
        searcher: {{name: single, metric: accuracy, smaller_is_better: false, max_length: {{batches: 2}}}}
        resources: {{slots_per_trial: 2}}
        max_restarts: {max_restarts}
    """))
    run = stack.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path), "--follow", timeout=240)
    exp_id = int(run.stdout.split("Created experiment ", 1)[1].split()[0])
    trial = stack.http.get(f"/api/v1/experiments/{exp_id}/trials").json()[0]
    # --follow returns once the experiment ended; the trial's row may be a moment behind.
    trial = wait_for(lambda: (t := stack.http.get(f"/api/v1/trials/{trial['id']}").json())["state"] in
                     ("COMPLETED", "ERROR") and t, timeout=60, what="trial ended")
    return {"follow": run, "trial": trial}, trial["id"]


def _logs(stack: Stack, trial_id: int) -> list[str]:
    """The trial's log lines, once the last one (the worker's exit line) is in: logs are their own stream and
    may be projected a moment after the trial's end."""
    def complete() -> list[str] | None:
        lines = [line["text"] for line in stack.http.get(f"/api/v1/trials/{trial_id}/logs").json()]
        return lines if lines and lines[-1].startswith("trial process exited with code") else None

    return wait_for(complete, timeout=30, what="the trial's last log line")


def test_a_launcher_entrypoint_on_two_slots_runs_two_ranks_with_one_checkpoint_per_store(
        two_slot_stack: Stack, tmp_path: Path) -> None:
    out, trial_id = _run(two_slot_stack, tmp_path, "python3 -m kiln.launch.torch_distributed python3 train.py")
    assert out["follow"].returncode == 0, out["follow"].stdout + out["follow"].stderr
    logs = _logs(two_slot_stack, trial_id)
    started = [line for line in logs if " started (pid " in line]
    # Exactly two ranks (not one torchrun per slot, each starting two), each line carrying its rank.
    assert sorted(line.split(" started")[0] for line in started) == \
        ["[rank=0] rank 0 of 2", "[rank=1] rank 1 of 2"], started
    ckpts = two_slot_stack.http.get(f"/api/v1/trials/{trial_id}/checkpoints").json()
    # Two chief-only and one sharded, each stored once (two share step 2: their order in the list is not fixed).
    stored = sorted((c["steps_completed"], sorted(c["resources"])) for c in ckpts)
    assert stored == [(1, ["metadata.json", "model.txt"]), (2, ["metadata.json", "model.txt"]),
                      (2, ["metadata.json", "part0.txt", "part1.txt"])]


def test_determineds_launcher_name_runs_and_the_failing_ranks_own_error_is_what_the_user_sees(
        two_slot_stack: Stack, tmp_path: Path) -> None:
    out, trial_id = _run(two_slot_stack, tmp_path,
                         "python3 -m determined.launch.torch_distributed python3 train.py fail")
    follow = out["follow"]
    assert follow.returncode == 1
    assert out["trial"]["state"] == "ERROR"
    # The trial's exit reason names the failing rank's exception, not torchrun's "exitcode: 1".
    assert "ValueError: rank one is broken (rank 1)" in out["trial"]["end_reason"], out["trial"]
    # The last lines of its log (what `trial logs` and --follow show) hold that rank's traceback.
    tail = _logs(two_slot_stack, trial_id)[-12:]
    assert any("raise ValueError(\"rank one is broken\")" in line for line in tail), tail
    assert tail[-1] == "trial process exited with code 1"
    assert "ValueError: rank one is broken" in follow.stderr.splitlines()[-1] or \
        any("ValueError: rank one is broken" in line for line in follow.stderr.splitlines()[-6:]), follow.stderr
    cli = two_slot_stack.kiln("trial", "logs", str(trial_id))
    assert "ValueError: rank one is broken" in "\n".join(cli.stdout.splitlines()[-6:])


# Determined's Core API tutorial 4 shape: the script is its own launcher ("launcher" mode starts one worker per
# slot under wrap_rank), and the workers build their DistributedContext by hand from rank, size and chief_ip.
OWN_LAUNCHER = textwrap.dedent("""\
    import os, subprocess, sys
    import kiln as det

    def launcher():
        info = det.get_cluster_info()
        slots = len(info.slot_ids)
        procs = []
        for rank in range(slots):
            env = dict(os.environ, RANK=str(rank), SIZE=str(slots), CHIEF_IP=info.container_addrs[0])
            cmd = [sys.executable, "-m", "determined.launch.wrap_rank", str(rank), "--", "python3", __file__, "worker"]
            procs.append(subprocess.Popen(cmd, env=env))
        return max(p.wait() for p in procs)

    def worker():
        rank, size = int(os.environ["RANK"]), int(os.environ["SIZE"])
        distributed = det.core.DistributedContext(rank=rank, size=size, local_rank=rank, local_size=size,
                                                  cross_rank=0, cross_size=1, chief_ip=os.environ["CHIEF_IP"])
        with det.core.init(distributed=distributed) as ctx:
            print(f"worker {rank} of {size} started", flush=True)
            for step in (1, 2):
                if rank == 0:
                    ctx.train.report_validation_metrics(steps_completed=step, metrics={"accuracy": step / 2})
                    with ctx.checkpoint.store_path({"steps_completed": step}) as (path, _):
                        (path / "x").write_text(str(step))
                if ctx.preempt.should_preempt():
                    return

    if __name__ == "__main__":
        sys.exit(launcher() if sys.argv[1] == "launcher" else worker())
""")


def test_a_script_that_launches_its_own_ranks_runs_once_per_host(two_slot_stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(OWN_LAUNCHER)
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent("""\
        name: own-launcher
        entrypoint: python3 train.py launcher
        searcher: {name: single, metric: accuracy, smaller_is_better: false, max_length: {batches: 2}}
        resources: {slots_per_trial: 2}
        max_restarts: 0
    """))
    run = two_slot_stack.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path), "--follow",
                              timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    exp_id = int(run.stdout.split("Created experiment ", 1)[1].split()[0])
    trial_id = two_slot_stack.http.get(f"/api/v1/experiments/{exp_id}/trials").json()[0]["id"]
    started = sorted(line for line in _logs(two_slot_stack, trial_id) if " started" in line)
    assert started == ["[rank=0] worker 0 of 2 started", "[rank=1] worker 1 of 2 started"]  # 2, not 4
    ckpts = wait_for(lambda: two_slot_stack.http.get(f"/api/v1/trials/{trial_id}/checkpoints").json(), timeout=30,
                     what="checkpoints")
    assert [c["steps_completed"] for c in ckpts] == [1, 2]


def test_the_digits_example_trains_data_parallel_on_two_slots(two_slot_stack: Stack) -> None:
    """`kiln experiment create examples/digits/distributed.yaml examples/digits` completes, as README says."""
    repo = Path(__file__).resolve().parents[2]
    run = two_slot_stack.kiln("experiment", "create", str(repo / "examples/digits/distributed.yaml"),
                              str(repo / "examples/digits"), "--follow", timeout=280)
    assert run.returncode == 0, run.stdout + run.stderr
    exp_id = int(run.stdout.split("Created experiment ", 1)[1].split()[0])
    trial = two_slot_stack.http.get(f"/api/v1/experiments/{exp_id}/trials").json()[0]
    logs = _logs(two_slot_stack, trial["id"])
    assert any(line.startswith("[rank=1] ") for line in logs) and any(line.startswith("[rank=0] ") for line in logs)
    final = [line for line in logs if "final validation_accuracy" in line]
    assert len(final) == 1 and final[0].startswith("[rank=0] ")  # the chief's, once
    assert float(final[0].rsplit(" ", 1)[1]) > 0.8
    ckpts = two_slot_stack.http.get(f"/api/v1/trials/{trial['id']}/checkpoints").json()
    assert len(ckpts) == 5  # one per epoch, stored by the chief alone
