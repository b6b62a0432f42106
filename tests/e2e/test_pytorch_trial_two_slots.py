"""A Determined PyTorchTrial on 2 slots on the whole stack: DDP through the launcher, validations over the whole
validation set, chief-only reports and checkpoints, and a pause/activate that ends exactly where an
uninterrupted run ends."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.e2e.conftest import REPO, Stack, wait_for

pytestmark = pytest.mark.e2e

# A Determined PyTorchTrial (only the imports name kiln), started the Determined way for several slots:
# `python3 -m determined.launch.torch_distributed --trial model_def:SlowTrial`. It sleeps a little per batch so
# that a pause lands mid-run; dropout, a shuffled loader, Adam and a per-batch LR schedule are what a resume must
# restore exactly.
SLOW_TRIAL = textwrap.dedent("""\
    import logging, time
    import torch
    from sklearn.datasets import load_digits
    from torch import nn
    import kiln as det
    from kiln import pytorch

    logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT)
    torch.set_num_threads(1)

    def data():
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        return torch.utils.data.TensorDataset(x[:1200], y[:1200]), torch.utils.data.TensorDataset(x[1200:], y[1200:])

    class SlowTrial(pytorch.PyTorchTrial):
        def __init__(self, context):
            self.context = context
            self.train_data, self.val_data = data()
            self.model = context.wrap_model(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2),
                                                          nn.Linear(32, 10)))
            self.opt = context.wrap_optimizer(torch.optim.Adam(self.model.parameters(), lr=context.get_hparam("lr")))
            context.wrap_lr_scheduler(torch.optim.lr_scheduler.StepLR(self.opt, step_size=10, gamma=0.8),
                                      step_mode=pytorch.LRScheduler.StepMode.STEP_EVERY_BATCH)
            d = context.distributed
            print(f"rank {d.rank} of {d.size} started: {type(self.model).__name__}, "
                  f"{context.get_per_slot_batch_size()} records per slot", flush=True)

        def build_training_data_loader(self):
            return pytorch.DataLoader(self.train_data, batch_size=self.context.get_per_slot_batch_size(), shuffle=True)

        def build_validation_data_loader(self):
            return pytorch.DataLoader(self.val_data, batch_size=128)  # 597 records: 5 batches, 3 and 2 per slot

        def train_batch(self, batch, epoch_idx, batch_idx):
            time.sleep(self.context.get_hparam("batch_sleep"))
            x, y = batch
            loss = nn.functional.cross_entropy(self.model(x), y)
            self.context.backward(loss)
            self.context.step_optimizer(self.opt)
            return {"loss": loss}

        def evaluate_batch(self, batch, batch_idx):
            x, y = batch
            logits = self.model(x)
            return {"loss_sum": nn.functional.cross_entropy(logits, y, reduction="sum"),
                    "correct": int((logits.argmax(dim=1) == y).sum()), "records": len(y)}

        def evaluation_reducer(self):
            return pytorch.Reducer.SUM
""")

SLOW_CONFIG = textwrap.dedent("""\
    name: NAME
    entrypoint: python3 -m determined.launch.torch_distributed --trial model_def:SlowTrial
    hyperparameters: {global_batch_size: 32, lr: 0.01, batch_sleep: 0.15}
    searcher: {name: single, metric: correct, smaller_is_better: false, max_length: {batches: 100}}
    min_validation_period: {batches: 20}
    scheduling_unit: 10
    resources: {slots_per_trial: 2}
    reproducibility: {experiment_seed: 11}
    max_restarts: 0
""")


def _created(run: subprocess.CompletedProcess[str]) -> int:
    assert "Created experiment " in run.stdout, run.stdout + run.stderr
    return int(run.stdout.split("Created experiment ", 1)[1].split()[0])


def _trial(stack: Stack, exp_id: int) -> dict[str, Any]:
    (trial,) = stack.http.get(f"/api/v1/experiments/{exp_id}/trials").json()
    return stack.http.get(f"/api/v1/trials/{trial['id']}").json()  # type: ignore[no-any-return]


def _ended(stack: Stack, exp_id: int) -> dict[str, Any]:
    """The trial once it and its experiment ended (the rows may lag the end a moment)."""
    def ended() -> dict[str, Any] | None:
        exp = stack.http.get(f"/api/v1/experiments/{exp_id}").json()
        trial = _trial(stack, exp_id)
        return trial if exp.get("state") in ("COMPLETED", "ERROR", "CANCELED") and \
            trial["state"] in ("COMPLETED", "ERROR", "CANCELED") else None

    return wait_for(ended, timeout=300, what=f"experiment {exp_id} ended", poll_s=0.5)


def _logs(stack: Stack, trial_id: int) -> list[str]:
    """The trial's log lines, once its last run's exit line is in (logs are projected a moment after the end)."""
    def complete() -> list[str] | None:
        lines = [line["text"] for line in stack.http.get(f"/api/v1/trials/{trial_id}/logs").json()]
        return lines if lines and lines[-1].startswith("trial process exited with code") else None

    return wait_for(complete, timeout=30, what="the trial's last log line")


def _validations(stack: Stack, trial_id: int) -> list[tuple[int, dict[str, Any]]]:
    points = stack.http.get(f"/api/v1/trials/{trial_id}/metrics", params={"kind": "validation"}).json()
    return [(p["steps_completed"], p["metrics"]) for p in points]


def _checkpoint_state(stack: Stack, uuid: str, target: Path) -> dict[str, Any]:
    dl = stack.kiln("checkpoint", "download", uuid, str(target))
    assert dl.returncode == 0, dl.stderr
    return torch.load(target / "state_dict.pth", weights_only=True)  # type: ignore[no-any-return]


def test_the_digits_pytorch_trial_trains_on_two_slots_and_validates_the_whole_set(two_slot_stack: Stack,
                                                                                  tmp_path: Path) -> None:
    """`kiln experiment create examples/digits/pytorch_trial_distributed.yaml examples/digits` completes."""
    stack = two_slot_stack
    run = stack.kiln("experiment", "create", "examples/digits/pytorch_trial_distributed.yaml", "examples/digits",
                     "--follow", timeout=400)
    assert run.returncode == 0, run.stdout + run.stderr
    trial = _ended(stack, _created(run))
    assert trial["state"] == "COMPLETED"
    logs = _logs(stack, trial["id"])
    ranks = sorted(line.split("] ", 1)[0] + "] " + line.split("digits: ", 1)[1] for line in logs
                   if "digits: rank " in line)
    assert ranks == ["[rank=0] rank 0 of 2: 16 records of each batch of 32",
                     "[rank=1] rank 1 of 2: 16 records of each batch of 32"]
    # Only the chief reports: one validation per epoch of 45 global batches (1437 images, 32 a step).
    validations = _validations(stack, trial["id"])
    assert [(s, m["epochs"]) for s, m in validations] == [(45, 1), (90, 2), (135, 3)]
    final = validations[-1][1]
    assert final["validation_records"] == 360  # every validation image once, split between the two slots
    # Stored by the chief alone: one checkpoint per epoch, none twice.
    ckpts = stack.http.get(f"/api/v1/trials/{trial['id']}/checkpoints").json()
    assert sorted(c["steps_completed"] for c in ckpts) == [45, 90, 135]

    # The reported accuracy and loss are those of the whole validation set, recomputed here from the final
    # checkpoint in one pass (no batches, no slots).
    target = tmp_path / "ckpt"
    assert stack.kiln("checkpoint", "download", trial["latest_checkpoint"], str(target)).returncode == 0
    code = ("import json, sys, torch; sys.path.insert(0, sys.argv[2]); from kiln import pytorch\n"
            "trial = pytorch.load_trial_from_checkpoint_path(sys.argv[1])\n"
            "x, y = trial.val_data.tensors\n"
            "with torch.no_grad(): logits = trial.model(x)\n"
            "print(json.dumps({'correct': int((logits.argmax(1) == y).sum()), 'records': len(y),\n"
            "    'loss': float(torch.nn.functional.cross_entropy(logits, y, reduction='sum')) / len(y)}))")
    loaded = subprocess.run([sys.executable, "-c", code, str(target), str(REPO / "examples" / "digits")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    whole = json.loads(loaded.stdout)
    assert whole["records"] == 360
    assert final["validation_accuracy"] == whole["correct"] / 360
    assert final["validation_loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert final["validation_accuracy"] > 0.85


def test_pause_and_activate_on_two_slots_end_with_the_weights_and_metrics_of_an_uninterrupted_run(
        two_slot_stack: Stack, tmp_path: Path) -> None:
    stack = two_slot_stack
    for name in ("whole", "paused"):
        d = tmp_path / name
        d.mkdir()
        (d / "model_def.py").write_text(SLOW_TRIAL)
        (d / "cfg.yaml").write_text(SLOW_CONFIG.replace("NAME", f"two-slot-{name}"))
    whole = stack.kiln("experiment", "create", str(tmp_path / "whole" / "cfg.yaml"), str(tmp_path / "whole"),
                       "--follow", timeout=400)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    whole_trial = _ended(stack, _created(whole))
    assert whole_trial["state"] == "COMPLETED"
    started = sorted(line.split(" started")[0] for line in _logs(stack, whole_trial["id"]) if " started: " in line)
    assert started == ["[rank=0] rank 0 of 2", "[rank=1] rank 1 of 2"]

    paused = stack.kiln("experiment", "create", str(tmp_path / "paused" / "cfg.yaml"), str(tmp_path / "paused"))
    assert paused.returncode == 0, paused.stderr
    exp_id = _created(paused)
    wait_for(lambda: (t := _trial(stack, exp_id))["state"] == "RUNNING" and t["steps_completed"] >= 20, timeout=240,
             what="the second run past batch 20", poll_s=0.3)
    assert stack.kiln("experiment", "pause", str(exp_id)).returncode == 0
    # Both ranks stop at the same boundary; the chief stores one checkpoint there and the slots are released.
    stopped = wait_for(lambda: (t := _trial(stack, exp_id))["state"] == "QUEUED" and t["latest_checkpoint"] and t,
                       timeout=120, what="the paused trial checkpointed and queued")
    assert 20 <= stopped["steps_completed"] < 100
    assert stack.kiln("experiment", "activate", str(exp_id)).returncode == 0
    paused_trial = _ended(stack, exp_id)
    assert paused_trial["state"] == "COMPLETED"
    assert len(paused_trial["allocations"]) == 2 and paused_trial["restarts"] == 0
    restored = [line for line in _logs(stack, paused_trial["id"]) if "restoring the trial from checkpoint" in line]
    assert sorted(line.split("] ", 1)[0] for line in restored) == ["[rank=0", "[rank=1"]  # both ranks restored

    # The same validations, value for value, and the same final weights as the run never paused.
    assert _validations(stack, paused_trial["id"]) == _validations(stack, whole_trial["id"])
    assert [s for s, _ in _validations(stack, whole_trial["id"])] == [20, 40, 60, 80, 100]
    final_whole = _checkpoint_state(stack, whole_trial["latest_checkpoint"], tmp_path / "ckpt-whole")
    final_paused = _checkpoint_state(stack, paused_trial["latest_checkpoint"], tmp_path / "ckpt-paused")
    (model_whole,), (model_paused,) = final_whole["models_state_dict"], final_paused["models_state_dict"]
    assert model_whole.keys() == model_paused.keys()
    for name, tensor in model_whole.items():
        assert torch.equal(tensor, model_paused[name]), name

    # The last validation is a SUM over the whole 597-record validation set: recompute it in one pass.
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)[1200:] / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)[1200:]
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 10))
    model.load_state_dict(model_whole)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    final = _validations(stack, whole_trial["id"])[-1][1]
    assert final["records"] == len(y) == 597
    assert final["correct"] == int((logits.argmax(dim=1) == y).sum())
    assert final["loss_sum"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y, reduction="sum")),
                                              rel=1e-5)
