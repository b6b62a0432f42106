"""kiln.pytorch's Trainer on two real ranks (torchrun through Kiln's launcher, gloo on CPU), outside a cluster.

The 2-slot contract of Determined's PyTorchTrial: the model trains under DDP with the global batch split across
the ranks, a validation covers the whole validation set (every batch once, whatever the ranks' shares), only
the chief reports and checkpoints, and a run stopped at a checkpoint and resumed from it ends with exactly the
weights and metrics of a run never stopped, even when the ranks draw different random numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

TRIAL = textwrap.dedent("""\
    import json, sys
    import torch
    from torch import nn
    from kiln import pytorch

    def data(n, seed):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, generator=gen)
        return torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))

    class Record(pytorch.PyTorchCallback):
        def __init__(self, context, stop_at):
            self.context, self.stop_at = context, stop_at

        def on_training_workload_end(self, avg_metrics, batch_metrics):
            # The chief alone asks to stop (as a trial reacting to what only it looks at would).
            if self.context.distributed.rank == 0 and self.context.current_train_batch() + 1 == self.stop_at:
                self.context.set_stop_requested(True)

        def on_validation_end(self, metrics):
            if self.context.distributed.rank == 0:
                with open("validations.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\\n")

        def on_checkpoint_upload_end(self, uuid):
            with open(f"checkpoint-rank{self.context.distributed.rank}.txt", "w") as f:
                f.write(uuid)

    class Trial(pytorch.PyTorchTrial):
        def __init__(self, context, stop_at):
            self.context, self.stop_at = context, stop_at
            self.model = context.wrap_model(nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1)))
            self.opt = context.wrap_optimizer(torch.optim.Adam(self.model.parameters(), lr=0.05))
            print(f"rank {context.distributed.rank} of {context.distributed.size}: "
                  f"{type(self.model).__name__}, {context.get_per_slot_batch_size()} per slot", flush=True)

        def build_callbacks(self):
            return {"record": Record(self.context, self.stop_at)}

        def build_training_data_loader(self):
            return pytorch.DataLoader(data(40, 0), batch_size=self.context.get_per_slot_batch_size(), shuffle=True)

        def build_validation_data_loader(self):
            return pytorch.DataLoader(data(13, 1), batch_size=3)  # 5 batches: 3 on the chief, 2 on rank 1

        def train_batch(self, batch, epoch_idx, batch_idx):
            x, y = batch
            # A draw only rank 1 makes (an augmentation one rank applies): the ranks' RNG states part ways.
            if self.context.distributed.rank == 1:
                x = x + 0.01 * torch.randn_like(x)
            loss = nn.functional.mse_loss(self.model(x), y)
            self.context.backward(loss)
            self.context.step_optimizer(self.opt)
            return {"loss": loss}

        def evaluate_batch(self, batch, batch_idx):
            x, y = batch
            return {"sq_err": ((self.model(x) - y) ** 2).sum(), "rows": len(x)}

        def evaluation_reducer(self):
            return {"sq_err": pytorch.Reducer.SUM, "rows": pytorch.Reducer.SUM}

    if __name__ == "__main__":
        stop_at, latest = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else None)
        torch.set_num_threads(1)
        with pytorch.init(hparams={"global_batch_size": 4}, exp_conf={"reproducibility": {"experiment_seed": 5}}) \\
                as context:
            trial = Trial(context, stop_at)
            pytorch.Trainer(trial, context).fit(max_length=pytorch.Batch(12), validation_period=pytorch.Batch(4),
                                                reporting_period=pytorch.Batch(1), latest_checkpoint=latest)
            if context.distributed.rank == 0:
                model = trial.model.module if hasattr(trial.model, "module") else trial.model
                torch.save(model.state_dict(), "final.pt")
""")


def _launch(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "DET_"))}
    env["PYTHONPATH"] = str(REPO)
    # A session of its own, so that a hung run is ended with its ranks (not only the launcher).
    proc = subprocess.Popen([sys.executable, "-m", "kiln.launch.torch_distributed", "--nproc_per_node=2", "--",
                             "python3", "trial.py", *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the 2-rank run {args} hung: {out[-2000:]}{err[-2000:]}") from None
    run = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _validations(cwd: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (cwd / "validations.jsonl").read_text().splitlines()]


def test_two_ranks_train_ddp_validate_the_whole_set_and_resume_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    for d in (whole, parted):
        d.mkdir()
        (d / "trial.py").write_text(TRIAL)

    first = _launch(whole, "0")
    started = sorted(line for line in first.stdout.splitlines() if " per slot" in line)
    assert started == ["[rank=0] rank 0 of 2: DistributedDataParallel, 2 per slot",
                       "[rank=1] rank 1 of 2: DistributedDataParallel, 2 per slot"]
    # Only the chief reports: one validation line per period, each of the whole 13-row set.
    uninterrupted = _validations(whole)
    assert [v["rows"] for v in uninterrupted] == [13, 13, 13]

    # Stopped by the chief after batch 6 (a checkpoint every rank agrees on), then resumed from it.
    _launch(parted, "6")
    uuid = (parted / "checkpoint-rank0.txt").read_text()
    assert uuid and (parted / "checkpoint-rank1.txt").read_text() == uuid  # every rank learns the chief's id
    # Stored by the chief alone: at the validation of batch 4 (locally every validation checkpoints) and at the stop.
    assert len(list((parted / "checkpoints").iterdir())) == 2
    _launch(parted, "0", uuid)

    resumed_weights = torch.load(parted / "final.pt", weights_only=True)
    whole_weights = torch.load(whole / "final.pt", weights_only=True)
    assert resumed_weights.keys() == whole_weights.keys()
    for name, tensor in whole_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    assert _validations(parted)[-1] == uninterrupted[-1]

    # The last validation is a reduction over the whole validation set: recompute it from the final weights.
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    model.load_state_dict(whole_weights)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(13, 3, generator=gen)
    with torch.no_grad():
        sq_err = float(((model(x) - x.sum(dim=1, keepdim=True)) ** 2).sum())
    assert uninterrupted[-1]["sq_err"] == pytest.approx(sq_err, rel=1e-6)
