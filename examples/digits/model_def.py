"""The digits CNN as a Determined PyTorchTrial, trained by ``kiln.pytorch.Trainer``.

Determined code; the only Kiln-specific lines are the imports (``import kiln as det``,
``from kiln import pytorch``). Run locally, ``python model_def.py`` trains ``--epochs`` epochs with the
defaults below, validating and checkpointing (under ./checkpoints) once per epoch. On Kiln
(``pytorch_trial.yaml``) the hyperparameters and seed come from the trial, the length from the searcher,
and a restarted trial resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from model import build_model
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import kiln as det
from kiln import pytorch

# Used as is locally; on a cluster the trial's hyperparameters replace them.
DEFAULT_HPARAMS: dict[str, Any] = {"learning_rate": 0.05, "momentum": 0.9, "width": 16, "global_batch_size": 32}
SPLIT_SEED = 0  # the same train/validation split for every trial, so their accuracies compare
log = logging.getLogger("digits")


def load_data() -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    """The digits as (N, 1, 8, 8) float images in [0, 1] with int labels, split 80/20."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_val, y_train, y_val = train_test_split(images, labels, test_size=0.2, random_state=SPLIT_SEED,
                                                      stratify=labels)
    return torch.utils.data.TensorDataset(x_train, y_train), torch.utils.data.TensorDataset(x_val, y_val)


class ValidationTotals(pytorch.MetricReducer):
    """Loss and accuracy over every validation record, however the set is cut into batches and slots: each
    slot sums its own records, then the slots' sums are added up."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.correct, self.records = 0.0, 0, 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.records += len(labels)

    def per_slot_reduce(self) -> tuple[float, int, int]:
        return self.loss_sum, self.correct, self.records

    def cross_slot_reduce(self, per_slot_metrics: list[tuple[float, int, int]]) -> dict[str, float]:
        loss_sum = sum(m[0] for m in per_slot_metrics)
        correct = sum(m[1] for m in per_slot_metrics)
        records = sum(m[2] for m in per_slot_metrics)
        return {"validation_loss": loss_sum / records, "validation_accuracy": correct / records}


class DigitsTrial(pytorch.PyTorchTrial):
    """The CNN of model.py, SGD with momentum, a step-decayed learning rate.

    On several slots (``pytorch_trial_distributed.yaml``) the model is trained data-parallel: each slot takes
    ``global_batch_size / slots`` records of every batch, and a validation splits the validation set's batches
    between the slots.
    """

    def __init__(self, context: pytorch.PyTorchTrialContext) -> None:
        self.context = context
        self.train_data, self.val_data = load_data()
        self.totals = context.wrap_reducer(ValidationTotals(), for_training=False)
        self.model = context.wrap_model(build_model(int(context.get_hparam("width"))))
        dist = context.distributed
        log.info("rank %d of %d: %d records of each batch of %d", dist.rank, dist.size,
                 context.get_per_slot_batch_size(), context.get_global_batch_size())
        self.optimizer = context.wrap_optimizer(torch.optim.SGD(
            self.model.parameters(), lr=float(context.get_hparam("learning_rate")),
            momentum=float(context.get_hparam("momentum"))))
        context.wrap_lr_scheduler(torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.5),
                                  step_mode=pytorch.LRScheduler.StepMode.STEP_EVERY_EPOCH)

    def build_training_data_loader(self) -> pytorch.DataLoader:
        return pytorch.DataLoader(self.train_data, batch_size=self.context.get_per_slot_batch_size(), shuffle=True)

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        return pytorch.DataLoader(self.val_data, batch_size=256)

    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
        images, labels = batch
        loss = nn.functional.cross_entropy(self.model(images), labels)
        self.context.backward(loss)
        self.context.step_optimizer(self.optimizer)
        return {"loss": loss}

    def evaluate_batch(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        images, labels = batch
        self.totals.update(self.model(images), labels)
        return {"validation_records": len(labels)}

    def evaluation_reducer(self) -> dict[str, pytorch.Reducer]:
        return {"validation_records": pytorch.Reducer.SUM}


def main(argv: list[str] | None = None) -> int:
    """Train DigitsTrial with the Trainer: one validation and checkpoint per epoch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs to train locally (on Kiln the searcher decides)")
    parser.add_argument("--latest-checkpoint", default=None,
                        help="locally: a checkpoint uuid under ./checkpoints to resume from")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT)
    torch.set_num_threads(1)  # a tiny model: threads cost more than they save

    info = det.get_cluster_info()
    hparams = None if info is not None else DEFAULT_HPARAMS
    latest_checkpoint = info.latest_checkpoint if info is not None else args.latest_checkpoint
    with pytorch.init(hparams=hparams, exp_conf={"reproducibility": {"experiment_seed": 0}}) as context:
        trial = DigitsTrial(context)
        trainer = pytorch.Trainer(trial, context)
        trainer.fit(max_length=pytorch.Epoch(args.epochs) if info is None else None,
                    validation_period=pytorch.Epoch(1), checkpoint_period=pytorch.Epoch(1),
                    reporting_period=pytorch.Batch(10), latest_checkpoint=latest_checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
