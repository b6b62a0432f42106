"""Horovod on the whole stack: a 2-slot Core API trial started by `python3 -m determined.launch.horovod`
(horovodrun with gloo, on CPU), whose ranks average their gradients with Horovod's allreduce.

Horovod 0.28.1 does not build against torch >= 2.1 as released; `just horovod` builds a patched copy into .venv
(deploy/horovod/). Without it this module is skipped, saying so: the one skip the suite allows, because the
build takes minutes.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import Stack, wait_for


def _horovod_built() -> bool:
    """horovod.torch loads here with gloo (checked in a child process: a build against another torch fails)."""
    if importlib.util.find_spec("horovod") is None:
        return False
    check = "import horovod.torch as hvd, sys; sys.exit(0 if hvd.gloo_built() else 1)"
    return subprocess.run([sys.executable, "-c", check], capture_output=True, timeout=120).returncode == 0


pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not _horovod_built(), reason="horovod not built: run `just horovod`")]

# Determined's Horovod pattern with the Core API; only the import names kiln. The ranks start from different
# weights (the broadcast must replace rank 1's) and train on different data (the allreduce must average).
TRAIN = textwrap.dedent("""\
    import hashlib
    import torch
    import horovod.torch as hvd
    import kiln as det

    def digest(model):
        return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]

    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(1234 + hvd.rank())
    distributed = det.core.DistributedContext.from_horovod(hvd)
    with det.core.init(distributed=distributed) as core_context:
        rank, size = core_context.distributed.rank, core_context.distributed.size
        model = torch.nn.Linear(4, 1)
        print(f"rank {rank} of {size} (horovod {hvd.rank()} of {hvd.size()}) starts from {digest(model)}", flush=True)
        optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                             named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        gen = torch.Generator().manual_seed(rank)
        for step in range(1, 6):
            x = torch.randn(8, 4, generator=gen)
            loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if rank == 0:
                core_context.train.report_training_metrics(steps_completed=step, metrics={"loss": loss.item()})
        digests = core_context.distributed.allgather(digest(model))
        print(f"rank {rank} ends with {digest(model)}; all ranks equal: {len(set(digests)) == 1}", flush=True)
        if rank == 0:
            core_context.train.report_validation_metrics(steps_completed=5, metrics={"loss": loss.item()})
            with core_context.checkpoint.store_path({"steps_completed": 5}) as (path, _):
                torch.save(model.state_dict(), path / "model.pt")
""")

CONFIG = textwrap.dedent("""\
    name: horovod-two-slots
    entrypoint: python3 -m determined.launch.horovod python3 train.py
    searcher: {name: single, metric: loss, max_length: {batches: 5}}
    resources: {slots_per_trial: 2}
    max_restarts: 0
""")


def _expected_weights() -> dict[str, torch.Tensor]:
    """What the two ranks should reach: rank 0's initial weights, SGD on the mean of both ranks' gradients."""
    torch.manual_seed(1234)
    model = torch.nn.Linear(4, 1)
    gens = [torch.Generator().manual_seed(r) for r in (0, 1)]
    for _ in range(5):
        grads = []
        for gen in gens:
            x = torch.randn(8, 4, generator=gen)
            model.zero_grad()
            ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
        with torch.no_grad():
            for p, g0, g1 in zip(model.parameters(), *grads, strict=True):
                p -= 0.1 * (g0 + g1) / 2
    return model.state_dict()


def test_a_two_slot_horovod_trial_averages_gradients_so_both_ranks_end_with_the_same_weights(
        two_slot_stack: Stack, tmp_path: Path) -> None:
    stack = two_slot_stack
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    run = stack.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path), "--follow", timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    exp_id = int(run.stdout.split("Created experiment ", 1)[1].split()[0])
    (trial,) = stack.http.get(f"/api/v1/experiments/{exp_id}/trials").json()

    def logs() -> list[str] | None:
        lines = [line["text"] for line in stack.http.get(f"/api/v1/trials/{trial['id']}/logs").json()]
        return lines if lines and lines[-1].startswith("trial process exited with code") else None

    lines = wait_for(logs, timeout=30, what="the trial's last log line")
    starts = sorted(line for line in lines if " starts from " in line)
    ends = sorted(line for line in lines if " ends with " in line)
    # Two ranks, each line starting with its rank (horovodrun's own prefix removed), Horovod agreeing on the layout.
    assert [line.split(" starts")[0] for line in starts] == ["[rank=0] rank 0 of 2 (horovod 0 of 2)",
                                                             "[rank=1] rank 1 of 2 (horovod 1 of 2)"], lines
    assert starts[0].rsplit(" ", 1)[1] != starts[1].rsplit(" ", 1)[1]  # different initial weights
    assert [line.split(" ends")[0] for line in ends] == ["[rank=0] rank 0", "[rank=1] rank 1"]
    assert ends[0].split(" ends with ")[1] == ends[1].split(" ends with ")[1]  # identical weights, both True
    assert ends[0].endswith("all ranks equal: True")

    # The weights the chief stored are those of SGD on the average of both ranks' gradients.
    (ckpt,) = wait_for(lambda: stack.http.get(f"/api/v1/trials/{trial['id']}/checkpoints").json(), timeout=30,
                       what="the checkpoint")
    target = tmp_path / "ckpt"
    assert stack.kiln("checkpoint", "download", ckpt["uuid"], str(target)).returncode == 0
    stored = torch.load(target / "model.pt", weights_only=True)
    for name, tensor in _expected_weights().items():
        assert torch.allclose(stored[name], tensor, atol=1e-6), name
