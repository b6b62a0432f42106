"""Train a small CNN on scikit-learn's bundled digits (8x8 images, 10 classes) with the Core API.

A Determined Core-API script; the only Kiln-specific line is ``import kiln as det``.

On a cluster the hyperparameters come from the trial, the length (in epochs) from the searcher, and a
restarted trial resumes from its latest checkpoint. Run locally (``python train.py``) it uses the defaults
below, trains ``--epochs`` epochs and writes checkpoints under ./checkpoints; ``--latest-checkpoint UUID``
resumes from one of them, the way a restarted trial would.

With several processes (``distributed.yaml``: 2 slots through ``kiln.launch.torch_distributed``, or
``torchrun --nproc_per_node=2 train.py`` locally) it trains data-parallel (DDP over gloo): each rank takes its
share of every batch, and only the chief reports metrics and stores checkpoints (Determined's contract).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from model import build_model
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import kiln as det

log = logging.getLogger("digits")

# Used as is locally; on a cluster the trial's hyperparameters override them.
DEFAULT_HPARAMS: dict[str, Any] = {"learning_rate": 0.05, "momentum": 0.9, "width": 16, "batch_size": 32}
DEFAULT_EPOCHS = 5  # locally, or if the searcher gives no length
REPORT_EVERY = 10  # batches between training-metric reports
SPLIT_SEED = 0  # the same train/validation split for every trial, so their accuracies compare


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits as (N, 1, 8, 8) float images in [0, 1] and int labels, split 80/20."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_val, y_train, y_val = train_test_split(images, labels, test_size=0.2, random_state=SPLIT_SEED,
                                                      stratify=labels)
    return x_train, y_train, x_val, y_val


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of epoch ``epoch``: derived from (seed, epoch) only, so a resumed trial sees the same
    batches it would have seen without the restart."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen)


def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Loss and accuracy over the whole validation set (small enough for one forward pass)."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    model.train()
    return {"validation_loss": loss, "validation_accuracy": accuracy}


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    steps: int) -> None:
    """model.pt holds only the state_dict, so ``torch.load(..., weights_only=True)`` can read it."""
    torch.save(model.state_dict(), path / "model.pt")
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps({"epoch": epoch, "steps": steps}))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Restore model and optimizer; return (epochs completed, batches completed)."""
    model.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    return int(state["epoch"]), int(state["steps"])


def main(argv: list[str] | None = None) -> int:
    """Train, validate and checkpoint once per epoch; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help="epochs to train when run locally (on a cluster the searcher decides)")
    parser.add_argument("--latest-checkpoint", default=None,
                        help="locally: a checkpoint uuid under ./checkpoints to resume from")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT)
    # The model is tiny: intra-op threads cost more in synchronisation than they save, and a trial should
    # not take every core of a worker that may run other trials beside it.
    torch.set_num_threads(1)

    info = det.get_cluster_info()
    if info is not None:
        hparams = {**DEFAULT_HPARAMS, **info.trial.hparams}
        seed = info.trial.trial_seed
        latest_checkpoint = info.latest_checkpoint
    else:
        hparams = dict(DEFAULT_HPARAMS)
        seed = 0
        latest_checkpoint = args.latest_checkpoint
    torch.manual_seed(seed)
    log.info("hyperparameters: %s, seed %d", hparams, seed)

    x_train, y_train, x_val, y_val = load_data()
    batch_size = int(hparams["batch_size"])
    model = build_model(int(hparams["width"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=float(hparams["learning_rate"]),
                                momentum=float(hparams["momentum"]))

    distributed = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started once per slot by torchrun
        torch.distributed.init_process_group("gloo")
        distributed = det.core.DistributedContext.from_torch_distributed()
    rank, size = (distributed.rank, distributed.size) if distributed is not None else (0, 1)
    # The same starting weights on every rank (DDP also broadcasts them from rank 0).
    trained = DistributedDataParallel(model) if size > 1 else model

    with det.core.init(distributed=distributed) as core_context:
        # The config's ``max_length: {epochs: N}`` arrives as N; the unit is this script's to interpret.
        total_epochs = core_context.searcher.max_length if info is not None else args.epochs
        if not total_epochs:
            log.warning("the searcher gave no length; training %d epochs", DEFAULT_EPOCHS)
            total_epochs = DEFAULT_EPOCHS

        epoch, steps = 0, 0
        if latest_checkpoint:
            with core_context.checkpoint.restore_path(latest_checkpoint) as path:
                epoch, steps = load_checkpoint(path, model, optimizer)
            log.info("resumed from checkpoint %s: %d epochs, %d batches done", latest_checkpoint, epoch, steps)

        metrics: dict[str, float] | None = None
        while epoch < total_epochs:
            running_loss, running_batches = 0.0, 0
            for idx in epoch_order(len(x_train), seed, epoch).split(batch_size):
                mine = idx[rank::size]  # this rank's share of the batch (all of it in one process)
                loss = nn.functional.cross_entropy(trained(x_train[mine]), y_train[mine])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
                running_loss += loss.item()
                running_batches += 1
                if steps % REPORT_EVERY == 0:
                    core_context.train.report_training_metrics(
                        steps_completed=steps, metrics={"loss": running_loss / running_batches})
                    running_loss, running_batches = 0.0, 0
            epoch += 1

            metrics = validate(model, x_val, y_val)
            core_context.train.report_validation_metrics(steps_completed=steps, metrics={**metrics, "epochs": epoch})
            log.info("epoch %d/%d: validation accuracy %.4f, loss %.4f", epoch, total_epochs,
                     metrics["validation_accuracy"], metrics["validation_loss"])

            if rank == 0:  # the other ranks hold the same weights; only the chief stores them
                with core_context.checkpoint.store_path({"steps_completed": steps, "epoch": epoch}) as (path, _):
                    save_checkpoint(path, model, optimizer, epoch, steps)
            core_context.train.report_progress(min(1.0, epoch / total_epochs))
            if core_context.preempt.should_preempt():
                # The checkpoint just taken holds everything; a resumed trial continues from it.
                log.info("preempted after epoch %d; exiting", epoch)
                return 0

        if metrics is None:  # resumed from a checkpoint already at the full length
            metrics = validate(model, x_val, y_val)
        if rank == 0:
            print(f"final validation_accuracy: {metrics['validation_accuracy']:.4f}", flush=True)
    if size > 1:
        del trained  # DDP's reducer first: destroyed after its process group, it waits for ever
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
