"""``PyTorchTrial`` (what users subclass), ``PyTorchCallback``, and the loop that trains a trial.

The loop (``_TrialLoop``) trains batch by batch until a boundary is reached (the length to train, or a
validation, checkpoint or reporting period), then reports the averaged training metrics and acts on the
boundaries. Its state (batches and epochs trained, when it last validated and checkpointed, the data seed,
the best validation) is checkpointed with the models, optimizers, LR schedulers and RNG states, so a trial
restored from a checkpoint continues exactly where the uninterrupted run would be.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import torch
import torch.utils.data

from kiln.pytorch import _data
from kiln.pytorch._context import LRScheduler, PyTorchTrialContext
from kiln.pytorch._reducer import Reducer, reduce_batch_metrics, to_python
from kiln.pytorch._units import Epoch, TrainUnit

log = logging.getLogger("kiln.pytorch")

STATE_DICT_FILE = "state_dict.pth"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_STATE_FILE = "rng_state.json"
LOAD_DATA_FILE = "load_data.json"


class PyTorchTrial(abc.ABC):
    """Subclass this: build models and optimizers in ``__init__`` (through the context's ``wrap_*``),
    return data loaders, train one batch, and evaluate one batch (or the whole validation set)."""

    @abc.abstractmethod
    def __init__(self, context: PyTorchTrialContext) -> None:
        """Build and wrap the models, optimizers and LR schedulers."""

    @abc.abstractmethod
    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> torch.Tensor | dict[str, Any]:
        """Forward, ``context.backward(loss)``, ``context.step_optimizer(opt)``; return the metrics."""

    @abc.abstractmethod
    def build_training_data_loader(self) -> _data.DataLoader | torch.utils.data.DataLoader[Any]:
        """The training data (a ``kiln.pytorch.DataLoader``, so the order resumes exactly)."""

    @abc.abstractmethod
    def build_validation_data_loader(self) -> _data.DataLoader | torch.utils.data.DataLoader[Any]:
        """The validation data."""

    def build_callbacks(self) -> dict[str, PyTorchCallback]:
        """Named callbacks; a callback's ``state_dict`` is checkpointed under its name."""
        return {}

    def evaluate_batch(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Metrics of one validation batch; reduced over batches by ``evaluation_reducer()``."""
        raise NotImplementedError

    def evaluation_reducer(self) -> Reducer | dict[str, Reducer]:
        """How ``evaluate_batch`` metrics are reduced: one Reducer, or one per metric (default AVG)."""
        return Reducer.AVG

    def evaluate_full_dataset(self, data_loader: torch.utils.data.DataLoader[Any]) -> dict[str, Any]:
        """Metrics over the whole validation set, computed on the chief only."""
        raise NotImplementedError

    def get_batch_length(self, batch: Any) -> int:
        """Records in a batch; override for custom batch types."""
        return _data.data_length(batch)


class PyTorchCallback:
    """Hooks into the Trainer's loop; override the ones you need."""

    def on_trial_startup(self, first_batch_idx: int, checkpoint_uuid: str | None) -> None:
        """Before anything else, with the batch training starts from and the checkpoint restored."""

    def on_trial_shutdown(self) -> None:
        """After training ends, however it ends."""

    def on_training_start(self) -> None:
        """After the checkpoint (if any) was restored, before the first batch."""

    def on_training_epoch_start(self, epoch_idx: int) -> None:
        """Before the first batch of an epoch."""

    def on_training_epoch_end(self, epoch_idx: int) -> None:
        """After the last batch of an epoch."""

    def on_training_workload_end(self, avg_metrics: dict[str, Any], batch_metrics: list[dict[str, Any]]) -> None:
        """After a stretch of batches, with their metrics."""

    def on_validation_start(self) -> None:
        """Before a validation."""

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        """After a validation, with its metrics."""

    def on_checkpoint_load_start(self, checkpoint: dict[str, Any]) -> None:
        """Before the state dict of a checkpoint is loaded."""

    def on_checkpoint_save_start(self, checkpoint: dict[str, Any]) -> None:
        """Before a checkpoint's state dict is written; may add entries."""

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        """After the checkpoint's files are written, before they are uploaded."""

    def on_checkpoint_upload_end(self, uuid: str) -> None:
        """After the checkpoint is stored, with its id."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore checkpointed state."""


class _Stop(Exception):
    """Leave the loop (preempted, stopped by the trial, or done); checkpoint first unless told not to."""

    def __init__(self, checkpoint: bool = True) -> None:
        super().__init__()
        self.checkpoint = checkpoint


class _State(msgspec.Struct, kw_only=True):
    """Where the loop is; checkpointed as trainer_state.json."""

    trial_id: int = 0
    seed: int = 0
    batches_trained: int = 0
    epochs_trained: int = 0
    last_val: int = 0
    last_ckpt: int = 0
    best_validation: float | None = None


def _overrides(trial: PyTorchTrial, name: str) -> bool:
    return getattr(type(trial), name) is not getattr(PyTorchTrial, name)


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return state


def _rank_rng_state() -> dict[str, Any]:
    """This process's RNG states: Python's and numpy's (JSON) under "host", torch's (tensors) under "torch"."""
    torch_state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        torch_state["cuda"] = torch.cuda.get_rng_state_all()
    return {"host": _rng_state(), "torch": torch_state}


def _set_rng_state(state: dict[str, Any], torch_state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state["cpu"])
    if torch.cuda.is_available() and "cuda" in torch_state:
        torch.cuda.set_rng_state_all(torch_state["cuda"])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, not its DistributedDataParallel wrapper (so checkpoints load anywhere)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: to_python(v) for k, v in metrics.items()}


def _average(batch_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-key mean over batches, of the scalar metrics."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for metrics in batch_metrics:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


class _TrialLoop:
    """Trains one PyTorchTrial through the Core API (``context._core``)."""

    def __init__(self, trial: PyTorchTrial, context: PyTorchTrialContext, *, max_length: TrainUnit,
                 checkpoint_period: TrainUnit, validation_period: TrainUnit, reporting_period: TrainUnit,
                 checkpoint_policy: str, latest_checkpoint: str | None, step_zero_validation: bool,
                 test_mode: bool, searcher_metric: str | None, smaller_is_better: bool,
                 time_metric: str | None, global_batch_size: int | None, trial_cls_spec: str) -> None:
        if not isinstance(trial, PyTorchTrial):
            raise TypeError(f"the Trainer trains a PyTorchTrial, got {type(trial).__name__}")
        if not context.models:
            raise ValueError("the trial wrapped no model: call context.wrap_model() in __init__")
        if not context.optimizers:
            raise ValueError("the trial wrapped no optimizer: call context.wrap_optimizer() in __init__")
        if _overrides(trial, "evaluate_batch") == _overrides(trial, "evaluate_full_dataset"):
            raise ValueError("define exactly one of evaluate_batch() and evaluate_full_dataset()")
        if checkpoint_policy not in ("best", "all", "none"):
            raise ValueError(f"checkpoint_policy must be best, all or none, got {checkpoint_policy!r}")
        self.trial = trial
        self.context = context
        self.core = context._core
        self.dist = context.distributed
        self.is_chief = self.dist.rank == 0
        self.max_length = max_length
        self.checkpoint_period = checkpoint_period
        self.validation_period = validation_period
        self.reporting_period = reporting_period
        self.checkpoint_policy = checkpoint_policy
        self.latest_checkpoint = latest_checkpoint
        self.step_zero_validation = step_zero_validation
        self.test_mode = test_mode
        self.searcher_metric = searcher_metric
        self.smaller_is_better = smaller_is_better
        self.time_metric = time_metric
        self.global_batch_size = global_batch_size
        self.trial_cls_spec = trial_cls_spec
        self.callbacks = trial.build_callbacks()
        self.state = _State(trial_id=context.get_trial_id(), seed=context.get_trial_seed())
        self.train_loader: Any = None
        self.val_loader: Any = None

    # --- the run -----------------------------------------------------------------------------------------

    def run(self) -> None:
        """Restore, train to the length, validate and checkpoint; stop early when asked."""
        with contextlib.ExitStack() as stack:
            for cb in self.callbacks.values():
                cb.on_trial_startup(0, self.latest_checkpoint)
                stack.callback(cb.on_trial_shutdown)
            if self.latest_checkpoint:
                log.info("restoring the trial from checkpoint %s", self.latest_checkpoint)
                with self.core.checkpoint.restore_path(self.latest_checkpoint) as path:
                    self._load(Path(path))
            self._build_loaders()
            for cb in self.callbacks.values():
                cb.on_training_start()
            try:
                self._train()
            except _Stop as stop:
                if stop.checkpoint and not self._checkpoint_is_current():
                    self._checkpoint()

    def _done(self) -> bool:
        if self.test_mode:
            return self.state.batches_trained >= 1
        trained = self.state.epochs_trained if isinstance(self.max_length, Epoch) else self.state.batches_trained
        return trained >= self.max_length.length()

    def _train(self) -> None:
        if self.step_zero_validation and self.state.batches_trained == 0:
            self._validate()
        batches = iter(self.train_loader)
        while not self._done():
            reached, batch_metrics = self._train_until_boundary(batches)
            self._report_training(batch_metrics)
            if "validate" in reached and self.state.last_val != self.state.batches_trained:
                self._validate()
            if "checkpoint" in reached and not self._checkpoint_is_current():
                self._checkpoint()
            self._check_stop()
        if self.state.last_val != self.state.batches_trained:
            self._validate()
        if not self._checkpoint_is_current():
            self._checkpoint()

    def _check_stop(self) -> None:
        if self.core.preempt.should_preempt():
            log.info("preempted at batch %d: checkpointing and stopping", self.state.batches_trained)
            raise _Stop()
        stop = self.context.get_stop_requested()
        if self.dist.size > 1:
            # Any rank may ask; all must leave together, or the others would wait in the next collective.
            stop = any(self.dist.allgather(stop))
        if stop:
            log.info("the trial asked to stop at batch %d", self.state.batches_trained)
            raise _Stop()

    def _reached(self, unit: TrainUnit, epoch_end: bool) -> bool:
        if isinstance(unit, Epoch):
            return epoch_end and unit.reached(self.state.epochs_trained)
        return unit.reached(self.state.batches_trained)

    def _train_until_boundary(self, batches: Iterator[Any]) -> tuple[set[str], list[dict[str, Any]]]:
        """Train batches until the length or a period boundary; return which boundaries were reached."""
        for model in self.context.models:
            model.train()
        self.context.reset_reducers()
        epoch_len = self.context._require_epoch_len()
        collected: list[dict[str, Any]] = []
        while True:
            batch_idx = self.state.batches_trained
            epoch_idx, in_epoch = divmod(batch_idx, epoch_len)
            if in_epoch == 0:
                for cb in self.callbacks.values():
                    cb.on_training_epoch_start(epoch_idx)
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError("the training data loader ran out (a repeating loader never should)") from None
            collected.append(self._train_batch(batch, epoch_idx, batch_idx))
            self.state.batches_trained += 1
            epoch_end = in_epoch == epoch_len - 1
            if epoch_end:
                self.state.epochs_trained += 1
                for cb in self.callbacks.values():
                    cb.on_training_epoch_end(epoch_idx)
                for sched in self.context.lr_schedulers:
                    if sched._step_mode == LRScheduler.StepMode.STEP_EVERY_EPOCH and \
                            self.state.epochs_trained % sched._frequency == 0:
                        sched.step()
            reached = {name for name, unit in (("validate", self.validation_period),
                                               ("checkpoint", self.checkpoint_period),
                                               ("report", self.reporting_period))
                       if self._reached(unit, epoch_end)}
            if reached or self._done():
                return reached, collected

    def _train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
        self.context._current_batch_idx = batch_idx
        if self.context.experimental._auto_to_device:
            batch = self.context.to_device(batch)
        metrics = self.trial.train_batch(batch=batch, epoch_idx=epoch_idx, batch_idx=batch_idx)
        if isinstance(metrics, torch.Tensor):
            metrics = {"loss": metrics}
        if not isinstance(metrics, dict):
            raise TypeError(f"train_batch must return a tensor or a dict of metrics, got {type(metrics).__name__}")
        stepped = self.context._should_communicate_and_update()
        if stepped and self.context._scaler is not None:
            self.context._scaler.update()
        agg = self.context._aggregation_frequency
        for sched in self.context.lr_schedulers if stepped else ():
            if sched._step_mode == LRScheduler.StepMode.STEP_EVERY_BATCH:
                # Every batch of the aggregation window that ended counts, stepped now.
                for _ in range(sum((i + 1) % sched._frequency == 0 for i in range(batch_idx - agg + 1, batch_idx + 1))):
                    sched.step()
            elif sched._step_mode == LRScheduler.StepMode.STEP_EVERY_OPTIMIZER_STEP and \
                    ((batch_idx + 1) // agg) % sched._frequency == 0:
                sched.step()
        return _scalar_metrics(metrics)

    # --- reports -----------------------------------------------------------------------------------------

    def _report_training(self, batch_metrics: list[dict[str, Any]]) -> None:
        if self.dist.size > 1:
            batch_metrics = [m for slot in self.dist.allgather(batch_metrics) for m in slot]
        metrics = _average(batch_metrics)
        metrics.update(_scalar_metrics(self.context.reduce_metrics(for_training=True)))
        for cb in self.callbacks.values():
            cb.on_training_workload_end(metrics, batch_metrics)
        if not self.is_chief:
            return
        self.core.train.report_training_metrics(steps_completed=self.state.batches_trained, metrics=metrics)
        self.core.train.report_progress(min(1.0, self._progress()))

    def _progress(self) -> float:
        total = max(self.max_length.length(), 1)
        trained = self.state.epochs_trained if isinstance(self.max_length, Epoch) else self.state.batches_trained
        return trained / total

    @torch.no_grad()
    def _validate(self) -> dict[str, Any]:
        for model in self.context.models:
            model.eval()
        self.context.reset_reducers()
        for cb in self.callbacks.values():
            cb.on_validation_start()
        start = time.monotonic()
        metrics: dict[str, Any] = {}
        if _overrides(self.trial, "evaluate_batch"):
            takes_idx = "batch_idx" in inspect.signature(self.trial.evaluate_batch).parameters
            batch_metrics: list[dict[str, Any]] = []
            for idx, batch in enumerate(self.val_loader):
                if self.context.experimental._auto_to_device:
                    batch = self.context.to_device(batch)
                out = self.trial.evaluate_batch(batch=batch, batch_idx=idx) if takes_idx \
                    else self.trial.evaluate_batch(batch=batch)  # type: ignore[call-arg]
                if not isinstance(out, dict):
                    raise TypeError(f"evaluate_batch must return a dict of metrics, got {type(out).__name__}")
                batch_metrics.append(_scalar_metrics(out))
                if self.test_mode:
                    break
            if self.dist.size > 1:
                batch_metrics = [m for slot in self.dist.allgather(batch_metrics) for m in slot]
            if not batch_metrics:
                raise RuntimeError("the validation data loader is empty")
            metrics = reduce_batch_metrics(batch_metrics, self.trial.evaluation_reducer())
        elif self.is_chief:
            out = self.trial.evaluate_full_dataset(data_loader=self.val_loader)
            if not isinstance(out, dict):
                raise TypeError(f"evaluate_full_dataset must return a dict, got {type(out).__name__}")
            metrics = _scalar_metrics(out)
        metrics.update(_scalar_metrics(self.context.reduce_metrics(for_training=False)))
        if self.dist.size > 1:
            metrics = self.dist.broadcast(metrics)  # evaluate_full_dataset ran on the chief only
        self._add_time_metric(metrics)
        self.state.last_val = self.state.batches_trained
        for model in self.context.models:
            model.train()
        for cb in self.callbacks.values():
            cb.on_validation_end(metrics)

        should_checkpoint = False
        if self.is_chief:
            log.info("validated at batch %d in %.2fs: %s", self.state.batches_trained, time.monotonic() - start,
                     metrics)
            self.core.train.report_validation_metrics(steps_completed=self.state.batches_trained, metrics=metrics)
            if self.checkpoint_policy == "all":
                should_checkpoint = True
            elif self.checkpoint_policy == "best":
                should_checkpoint = self._is_best(metrics)
        if self.dist.size > 1:
            should_checkpoint = bool(self.dist.broadcast(should_checkpoint))
        if should_checkpoint and not self._checkpoint_is_current():
            self._checkpoint()
        return metrics

    def _add_time_metric(self, metrics: dict[str, Any]) -> None:
        """The searcher reads a trial's progress in epochs or records from its validation metrics."""
        if self.time_metric == "epochs":
            metrics.setdefault("epochs", self.state.epochs_trained)
        elif self.time_metric == "records" and self.global_batch_size:
            metrics.setdefault("records", self.state.batches_trained * self.global_batch_size)
        elif self.time_metric == "batches":
            metrics.setdefault("batches", self.state.batches_trained)

    def _is_best(self, metrics: dict[str, Any]) -> bool:
        if self.searcher_metric is None:
            return True
        if self.searcher_metric not in metrics:
            raise RuntimeError(f"the searcher's metric {self.searcher_metric!r} is not among the validation "
                               f"metrics {sorted(metrics)}")
        value = metrics[self.searcher_metric]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RuntimeError(f"the searcher's metric {self.searcher_metric!r} is not a number: {value!r}")
        best = self.state.best_validation
        better = best is None or (value < best if self.smaller_is_better else value > best)
        if better:
            self.state.best_validation = float(value)
        return better

    # --- checkpoints -------------------------------------------------------------------------------------

    def _checkpoint_is_current(self) -> bool:
        # At batch 0 there is nothing to save: the checkpoint is "current" until a batch is trained.
        return self.state.last_ckpt == self.state.batches_trained

    def _checkpoint(self) -> None:
        self.state.last_ckpt = self.state.batches_trained
        uuid = ""
        # Every rank's RNG states go into the chief's checkpoint: ranks that drew different random numbers
        # (an augmentation on some ranks only) each continue from their own state on resume.
        rng = _rank_rng_state()
        ranks_rng = self.dist.allgather(rng) if self.dist.size > 1 else [rng]
        if self.is_chief:
            # Determined's contract: only the chief stores an unsharded checkpoint.
            metadata = {"steps_completed": self.state.batches_trained, "framework": f"torch-{torch.__version__}",
                        "format": "pickle"}
            with self.core.checkpoint.store_path(metadata) as (path, storage_id):
                self._save(Path(path), ranks_rng)
                uuid = storage_id
            log.info("checkpoint %s at batch %d", uuid, self.state.batches_trained)
        if self.dist.size > 1:
            uuid = str(self.dist.broadcast(uuid))
        for cb in self.callbacks.values():
            cb.on_checkpoint_upload_end(uuid=uuid)

    def _save(self, path: Path, ranks_rng: list[dict[str, Any]]) -> None:
        ctx = self.context
        checkpoint: dict[str, Any] = {
            "models_state_dict": [_unwrap(m).state_dict() for m in ctx.models],
            "optimizers_state_dict": [o.state_dict() for o in ctx.optimizers],
            "lr_schedulers_state_dict": [s.state_dict() for s in ctx.lr_schedulers],
            "callbacks": {name: cb.state_dict() for name, cb in self.callbacks.items()},
            # The chief's torch RNG state at the top (what a one-slot checkpoint holds), every rank's in "ranks".
            "rng_state": {**ranks_rng[0]["torch"], "ranks": [r["torch"] for r in ranks_rng]},
        }
        if ctx._scaler is not None:
            checkpoint["scaler_state_dict"] = ctx._scaler.state_dict()
        for cb in self.callbacks.values():
            cb.on_checkpoint_save_start(checkpoint)
        torch.save(checkpoint, path / STATE_DICT_FILE)
        (path / TRAINER_STATE_FILE).write_bytes(msgspec.json.encode(self.state))
        (path / RNG_STATE_FILE).write_text(json.dumps({**ranks_rng[0]["host"],
                                                       "ranks": [r["host"] for r in ranks_rng]}))
        (path / LOAD_DATA_FILE).write_text(json.dumps({
            "trial_type": "PyTorchTrial", "trial_cls_spec": self.trial_cls_spec,
            "hparams": ctx.get_hparams(), "experiment_config": ctx._exp_conf or {}}, default=str))
        for cb in self.callbacks.values():
            cb.on_checkpoint_write_end(str(path))

    def _load(self, path: Path) -> None:
        # weights_only: a checkpoint is data, never code to run (callback states must be plain data too).
        checkpoint = torch.load(path / STATE_DICT_FILE, map_location="cpu", weights_only=True)
        for cb in self.callbacks.values():
            cb.on_checkpoint_load_start(checkpoint)
        ctx = self.context
        restorable: list[tuple[str, list[Any]]] = [("models", [_unwrap(m) for m in ctx.models]),
                                                    ("optimizers", list(ctx.optimizers)),
                                                    ("lr_schedulers", list(ctx.lr_schedulers))]
        for kind, objects in restorable:
            states = checkpoint.get(f"{kind}_state_dict", [])
            if len(states) != len(objects):
                raise ValueError(f"the checkpoint holds {len(states)} {kind}, the trial wrapped {len(objects)}")
            for obj, state in zip(objects, states, strict=True):
                obj.load_state_dict(state)
        if ctx._scaler is not None and "scaler_state_dict" in checkpoint:
            ctx._scaler.load_state_dict(checkpoint["scaler_state_dict"])
        for name, cb in self.callbacks.items():
            if name in checkpoint.get("callbacks", {}):
                cb.load_state_dict(checkpoint["callbacks"][name])
        state_file = path / TRAINER_STATE_FILE
        if state_file.exists():
            restored = msgspec.json.decode(state_file.read_bytes(), type=_State)
            if restored.trial_id != self.state.trial_id:
                # Another trial's checkpoint (e.g. warm start): its weights, but a fresh timeline.
                log.info("checkpoint of trial %d: weights restored, training starts at batch 0", restored.trial_id)
            else:
                self.state = restored
                rng_file = path / RNG_STATE_FILE
                if rng_file.exists():
                    self._restore_rng(json.loads(rng_file.read_text()), checkpoint["rng_state"])

    def _restore_rng(self, host: dict[str, Any], torch_state: dict[str, Any]) -> None:
        """This rank's own RNG states when the checkpoint has one per rank of this many; else the chief's."""
        rank, size = self.dist.rank, self.dist.size
        hosts, torches = host.get("ranks"), torch_state.get("ranks")
        if isinstance(hosts, list) and isinstance(torches, list) and len(hosts) == len(torches) == size:
            _set_rng_state(hosts[rank], torches[rank])
            return
        if size > 1 or (isinstance(hosts, list) and len(hosts) > 1):
            log.warning("the checkpoint holds the RNG states of %s ranks, this trial runs %d: every rank "
                        "continues from the chief's", len(hosts) if isinstance(hosts, list) else 1, size)
        _set_rng_state(host, torch_state)

    def _build_loaders(self) -> None:
        size, rank = self.dist.size, self.dist.rank
        train = self.trial.build_training_data_loader()
        if isinstance(train, _data.DataLoader):
            self.train_loader = train.get_data_loader(repeat=True, skip=self.state.batches_trained,
                                                      num_replicas=size, rank=rank, seed=self.state.seed)
        elif self.context.experimental._data_repro_checks_disabled:
            self.train_loader = _Repeat(train)
        else:
            raise RuntimeError("build_training_data_loader returned a torch DataLoader: return a "
                               "kiln.pytorch.DataLoader (its order resumes exactly), or call "
                               "context.experimental.disable_dataset_reproducibility_checks() in __init__")
        epoch_len = len(self.train_loader)
        self.context._epoch_len = int(self.dist.broadcast(epoch_len)) if size > 1 else epoch_len
        if not self.context._epoch_len:
            raise RuntimeError("the training data loader has no batches")
        val = self.trial.build_validation_data_loader()
        by_batch = _overrides(self.trial, "evaluate_batch")
        if isinstance(val, _data.DataLoader):
            self.val_loader = val.get_data_loader(repeat=False, num_replicas=size if by_batch else 1,
                                                  rank=rank if by_batch else 0)
        elif self.context.experimental._data_repro_checks_disabled:
            self.val_loader = val
        else:
            raise RuntimeError("build_validation_data_loader returned a torch DataLoader: return a "
                               "kiln.pytorch.DataLoader, or call "
                               "context.experimental.disable_dataset_reproducibility_checks() in __init__")


class _Repeat:
    """A user's plain torch DataLoader, repeated across epochs (no exact resume: the user opted out)."""

    def __init__(self, loader: torch.utils.data.DataLoader[Any]) -> None:
        self._loader = loader

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield from self._loader
