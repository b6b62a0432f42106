"""The seed story's trial: a small CNN on the digits Delta table, at the version the experiment pinned.

A Determined Core-API script (``import kiln as det``). It reads its data with ``kiln.data.delta_table()``
(rows: ``image`` PGM bytes, ``label``, ``split``), trains on the ``train`` rows, and after each epoch reports
the validation accuracy overall and per class (``class_8_accuracy``...: one metric, and one TensorBoard series,
per class).

Where its first checkpoint comes from decides how it starts:
- none: fresh weights (the search);
- one of another trial (``searcher.source_trial_id`` / ``source_checkpoint_uuid``: a fine-tune): that trial's
  weights and width, a fresh optimizer and step 0; it logs the digest of the weights it loaded;
- its own (a restart): weights, optimizer and position, exactly where it stopped.

On several slots (``python3 -m determined.launch.torch_distributed python3 train.py``) it trains data-parallel
(DDP over gloo); only the chief reports and stores checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import torch
from net import build_model, images_tensor, per_class_accuracy, weights_digest
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import kiln as det
import kiln.data

log = logging.getLogger("seed-story")


def load_split(table: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one split of the pinned table version."""
    rows = table.filter(np.asarray(table.column("split").to_pylist()) == split)
    return images_tensor(rows.column("image").to_pylist()), torch.tensor(rows.column("label").to_pylist())


def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Loss, accuracy and per-class accuracy over the validation rows."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        predicted = logits.argmax(dim=1)
        metrics = {"validation_loss": nn.functional.cross_entropy(logits, y).item(),
                   "validation_accuracy": float((predicted == y).float().mean()),
                   **per_class_accuracy(predicted, y)}
    model.train()
    return metrics


def main() -> int:
    """Train for the searcher's length in epochs; validate and checkpoint after each."""
    logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT)
    torch.set_num_threads(1)  # a tiny model: threads cost more than they save, and trials share the worker's cores
    info = det.get_cluster_info()
    if info is None:
        raise SystemExit("run this on Kiln: kiln experiment create search.yaml model/ (see the README)")
    hparams = info.trial.hparams
    seed = info.trial.trial_seed
    torch.manual_seed(seed)

    data = kiln.data.delta_table()  # the version pinned at submission, whatever the table holds now
    table = data.to_pyarrow(["image", "label", "split"])
    x_train, y_train = load_split(table, "train")
    x_val, y_val = load_split(table, "val")
    log.info("data %s version %d: %d training rows, %d validation rows; training rows per class %s", data.uri,
             data.version, len(y_train), len(y_val), torch.bincount(y_train, minlength=10).tolist())

    distributed = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process per slot, started by the launcher
        torch.distributed.init_process_group("gloo")
        distributed = det.core.DistributedContext.from_torch_distributed()
    rank, size = (distributed.rank, distributed.size) if distributed is not None else (0, 1)

    with det.core.init(distributed=distributed) as core_context:
        width, state, start = int(hparams["width"]), None, None
        if info.latest_checkpoint:
            with core_context.checkpoint.restore_path(info.latest_checkpoint) as path:
                start = json.loads((path / "state.json").read_text())
                state = {"model": torch.load(path / "model.pt", weights_only=True),
                         "optimizer": torch.load(path / "optimizer.pt", weights_only=True)}
            width = int(start["width"])  # the checkpoint's architecture, whatever the hparams say
        model = build_model(width)
        optimizer = torch.optim.SGD(model.parameters(), lr=float(hparams["learning_rate"]),
                                    momentum=float(hparams["momentum"]))
        epoch, steps = 0, 0
        if state is not None and start is not None:
            model.load_state_dict(state["model"])
            if int(start["trial_id"]) == info.trial.trial_id:  # our own: a restart goes on where it stopped
                optimizer.load_state_dict(state["optimizer"])
                epoch, steps = int(start["epoch"]), int(start["steps"])
                log.info("resumed from own checkpoint %s at epoch %d", info.latest_checkpoint, epoch)
            else:
                log.info("fine-tune: loaded weights of checkpoint %s (trial %s, data version %s, width %d):"
                         " digest %s", info.latest_checkpoint, start["trial_id"], start["data_version"], width,
                         weights_digest(model.state_dict()))
        trained = DistributedDataParallel(model) if size > 1 else model

        total = int(core_context.searcher.max_length or 1)
        batch_size = int(hparams["batch_size"])
        metrics: dict[str, Any] = {}
        while epoch < total:
            order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            for idx in order.split(batch_size):
                mine = idx[rank::size]
                loss = nn.functional.cross_entropy(trained(x_train[mine]), y_train[mine])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
            epoch += 1
            metrics = validate(model, x_val, y_val)
            core_context.train.report_validation_metrics(
                steps_completed=steps, metrics={**metrics, "epochs": epoch, "data_version": data.version})
            log.info("epoch %d/%d: validation accuracy %.4f", epoch, total, metrics["validation_accuracy"])
            if rank == 0:
                digest = weights_digest(model.state_dict())
                meta = {"steps_completed": steps, "epoch": epoch, "weights_digest": digest,
                        "data_version": data.version}
                with core_context.checkpoint.store_path(meta) as (path, _):
                    torch.save(model.state_dict(), path / "model.pt")
                    torch.save(optimizer.state_dict(), path / "optimizer.pt")
                    (path / "state.json").write_text(json.dumps({
                        "epoch": epoch, "steps": steps, "width": width, "trial_id": info.trial.trial_id,
                        "data_version": data.version, "weights_digest": digest}))
            core_context.train.report_progress(min(1.0, epoch / total))
            if core_context.preempt.should_preempt():
                return 0
        if rank == 0 and metrics:
            print(f"final validation_accuracy: {metrics['validation_accuracy']:.4f}", flush=True)
    if size > 1:
        del trained  # DDP's reducer before its process group
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
