"""``PyTorchTrialContext``: what a PyTorchTrial is built from and trains through.

The trial registers its models, optimizers and LR schedulers here (``wrap_*``), so the Trainer can move
them to the slot's device, wrap them for distributed training, checkpoint and restore them. ``backward`` and
``step_optimizer`` apply gradient aggregation; the rest answers questions about the trial.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kiln.pytorch import _data
from kiln.pytorch._reducer import MetricReducer, _SimpleReducer

log = logging.getLogger("kiln.pytorch")


class LRScheduler:
    """A torch LR scheduler and when the Trainer steps it (``wrap_lr_scheduler`` makes these)."""

    class StepMode(enum.Enum):
        """When the Trainer calls ``step()``; MANUAL_STEP leaves it to the trial (still checkpointed)."""

        STEP_EVERY_EPOCH = 1
        STEP_EVERY_BATCH = 2
        MANUAL_STEP = 3
        STEP_EVERY_OPTIMIZER_STEP = 4

    def __init__(self, scheduler: Any, step_mode: LRScheduler.StepMode, frequency: int = 1) -> None:
        if not isinstance(step_mode, LRScheduler.StepMode):
            raise TypeError(f"step_mode must be a LRScheduler.StepMode, got {step_mode!r}")
        if frequency < 1:
            raise ValueError(f"frequency must be at least 1, got {frequency}")
        self.scheduler = scheduler
        self._step_mode = step_mode
        self._frequency = frequency

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Step the scheduler."""
        self.scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:
        """The scheduler's last learning rates."""
        return list(self.scheduler.get_last_lr())

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state."""
        return dict(self.scheduler.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scheduler's state."""
        self.scheduler.load_state_dict(state)


class PyTorchExperimentalContext:
    """``context.experimental``: the switches Kiln supports from Determined's experimental context."""

    def __init__(self) -> None:
        self._data_repro_checks_disabled = False
        self._auto_to_device = True

    def disable_dataset_reproducibility_checks(self) -> None:
        """Allow plain torch DataLoaders (their order is then not restored exactly on resume)."""
        self._data_repro_checks_disabled = True

    def disable_auto_to_device(self) -> None:
        """Leave batches where the data loader put them."""
        self._auto_to_device = False

    def use_amp(self) -> None:
        """Not supported yet: say so instead of training without it."""
        raise NotImplementedError("context.experimental.use_amp() is not supported by Kiln yet; "
                                  "use context.wrap_scaler(torch.amp.GradScaler()) with torch.autocast")


class PyTorchTrialContext:
    """The trial's hyperparameters, slot and distributed facts, and the wrapped training objects."""

    def __init__(self, *, core_context: Any, hparams: dict[str, Any], trial_seed: int,
                 exp_conf: dict[str, Any] | None = None, aggregation_frequency: int = 1,
                 average_aggregated_gradients: bool = True, managed_training: bool = True,
                 enable_tensorboard_logging: bool = True) -> None:
        if aggregation_frequency < 1:
            raise ValueError(f"aggregation_frequency must be at least 1, got {aggregation_frequency}")
        self._core = core_context
        self._hparams = dict(hparams)
        self._trial_seed = trial_seed
        self._exp_conf = exp_conf
        self._aggregation_frequency = aggregation_frequency
        self._average_aggregated_gradients = average_aggregated_gradients
        self._managed_training = managed_training
        self._enable_tensorboard_logging = enable_tensorboard_logging
        self._tensorboard_writer: Any = None
        self.distributed = core_context.distributed
        self.models: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_schedulers: list[LRScheduler] = []
        self.experimental = PyTorchExperimentalContext()
        self._scaler: Any = None
        self._reducers: list[tuple[MetricReducer, str | None, bool, bool]] = []
        self._stop_requested = False
        self._current_batch_idx: int | None = None
        self._epoch_len: int | None = None
        if torch.cuda.is_available() and managed_training:
            self.device = torch.device("cuda", self.distributed.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    # --- what the trial is -------------------------------------------------------------------------------

    def get_hparams(self) -> dict[str, Any]:
        """All hyperparameters of this trial."""
        return dict(self._hparams)

    def get_hparam(self, name: str) -> Any:
        """One hyperparameter."""
        if name not in self._hparams:
            raise KeyError(f"hyperparameter {name!r} is not set; the trial has {sorted(self._hparams)}")
        return self._hparams[name]

    def get_experiment_config(self) -> dict[str, Any]:
        """The experiment config (on a cluster; locally the ``exp_conf`` given to ``pytorch.init``)."""
        if self._exp_conf is None:
            raise ValueError("no experiment config: pass exp_conf= to pytorch.init() when training locally")
        return self._exp_conf

    def get_data_config(self) -> dict[str, Any]:
        """The config's ``data`` section."""
        return dict((self._exp_conf or {}).get("data") or {})

    def get_trial_seed(self) -> int:
        """The seed the Trainer seeded Python, numpy and torch with."""
        return self._trial_seed

    def get_trial_id(self) -> int:
        """The trial id (0 locally)."""
        info = getattr(self._core, "info", None)
        return int(info.trial.trial_id) if info is not None else 0

    def get_experiment_id(self) -> int:
        """The experiment id (0 locally)."""
        info = getattr(self._core, "info", None)
        return int(info.trial.experiment_id) if info is not None else 0

    def get_global_batch_size(self) -> int:
        """The hyperparameter ``global_batch_size``: records per optimizer step across all slots."""
        if "global_batch_size" not in self._hparams:
            raise KeyError("PyTorchTrial needs the hyperparameter global_batch_size (records per step, all slots)")
        return int(self._hparams["global_batch_size"])

    def get_per_slot_batch_size(self) -> int:
        """``global_batch_size`` divided by the number of slots."""
        size = int(self.distributed.size)
        global_batch_size = self.get_global_batch_size()
        if global_batch_size % size:
            log.warning("global_batch_size %d is not divisible by %d slots; each slot takes %d",
                        global_batch_size, size, global_batch_size // size)
        return max(global_batch_size // size, 1)

    def get_aggregation_frequency(self) -> int:
        """Batches whose gradients are summed before each optimizer step."""
        return self._aggregation_frequency

    def get_enable_tensorboard_logging(self) -> bool:
        """Whether Kiln writes the Trainer's metrics as TensorBoard scalars and uploads the TensorBoard
        directory by itself (``pytorch.init(enable_tensorboard_logging=)``; the Core API's AUTO mode)."""
        return self._enable_tensorboard_logging

    def get_tensorboard_path(self) -> Any:
        """This process's TensorBoard directory (``core_context.train.get_tensorboard_path()``): what the trial
        writes there is uploaded with the trial's TensorBoard files."""
        return self._core.train.get_tensorboard_path()

    def get_tensorboard_writer(self) -> Any:
        """A ``torch.utils.tensorboard.SummaryWriter`` on the TensorBoard directory (one per context)."""
        if self._tensorboard_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard_writer = SummaryWriter(log_dir=str(self.get_tensorboard_path()))
        return self._tensorboard_writer

    def _close_tensorboard_writer(self) -> None:
        """Flush and close the trial's SummaryWriter (before the context's last upload)."""
        if self._tensorboard_writer is not None:
            self._tensorboard_writer.close()
            self._tensorboard_writer = None

    def get_stop_requested(self) -> bool:
        """Whether the trial asked to stop (``set_stop_requested``)."""
        return self._stop_requested

    def set_stop_requested(self, stop_requested: bool) -> None:
        """Ask the Trainer to checkpoint and stop after the current step, as if preempted."""
        self._stop_requested = bool(stop_requested)

    # --- where we are ------------------------------------------------------------------------------------

    def current_train_batch(self) -> int:
        """The index of the batch being trained (0-based, counted since the trial started)."""
        if self._current_batch_idx is None:
            raise RuntimeError("current_train_batch() is known only while training")
        return int(self._current_batch_idx)

    def current_train_epoch(self) -> int:
        """The index of the epoch being trained."""
        return self.current_train_batch() // self._require_epoch_len()

    def is_epoch_start(self) -> bool:
        """True on the first batch of an epoch."""
        return self.current_train_batch() % self._require_epoch_len() == 0

    def is_epoch_end(self) -> bool:
        """True on the last batch of an epoch."""
        return (self.current_train_batch() + 1) % self._require_epoch_len() == 0

    def _require_epoch_len(self) -> int:
        if not self._epoch_len:
            raise RuntimeError("the epoch length is known once the Trainer built the training data loader")
        return self._epoch_len

    # --- the objects we train ----------------------------------------------------------------------------

    def to_device(self, data: Any) -> Any:
        """Move a batch (tensors in nested dicts, lists, tuples) to this slot's device."""
        return _data.to_device(data, self.device)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Register a model: moved to the device and, with several slots, wrapped in DistributedDataParallel."""
        model = model.to(self.device)
        if self.distributed.size > 1 and self._managed_training:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None)
        self.models.append(model)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer,
                       backward_passes_per_step: int = 1) -> torch.optim.Optimizer:
        """Register an optimizer (built over wrapped models' parameters)."""
        if backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be at least 1, got {backward_passes_per_step}")
        self.optimizers.append(optimizer)
        return optimizer

    def wrap_lr_scheduler(self, lr_scheduler: Any, step_mode: LRScheduler.StepMode, frequency: int = 1) -> Any:
        """Register an LR scheduler over a wrapped optimizer; returns it unchanged."""
        if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and \
                step_mode != LRScheduler.StepMode.MANUAL_STEP:
            raise ValueError("ReduceLROnPlateau steps on a metric: wrap it with step_mode=MANUAL_STEP and call "
                             "step(metric) yourself (e.g. from a PyTorchCallback's on_validation_end)")
        opt = getattr(lr_scheduler, "optimizer", None)
        if opt is not None and not any(opt is o for o in self.optimizers):
            raise ValueError("the LR scheduler's optimizer was not returned by wrap_optimizer()")
        self.lr_schedulers.append(LRScheduler(lr_scheduler, step_mode, frequency))
        return lr_scheduler

    def wrap_scaler(self, scaler: Any) -> Any:
        """Register a ``torch.amp.GradScaler``: checkpointed, and updated once per batch by the Trainer."""
        if self._scaler is not None:
            raise ValueError("wrap_scaler() may be called once")
        self._scaler = scaler
        return scaler

    def configure_apex_amp(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported: apex is deprecated upstream; torch.amp with wrap_scaler does the same."""
        raise NotImplementedError("configure_apex_amp is not supported by Kiln; use torch.autocast and "
                                  "context.wrap_scaler(torch.amp.GradScaler())")

    def wrap_reducer(self, reducer: MetricReducer | Callable[[list[Any]], Any], name: str | None = None,
                     for_training: bool = True, for_validation: bool = True) -> MetricReducer:
        """Register a custom metric reducer; a plain function gets a reducer with ``update(value)``."""
        wrapped = reducer if isinstance(reducer, MetricReducer) else _SimpleReducer(reducer)
        if not isinstance(wrapped, MetricReducer):
            raise TypeError(f"wrap_reducer takes a MetricReducer or a function, got {type(reducer).__name__}")
        if not for_training and not for_validation:
            raise ValueError("a reducer must be for training, validation, or both")
        self._reducers.append((wrapped, name, for_training, for_validation))
        return wrapped

    def reset_reducers(self) -> None:
        """Reset every registered reducer (the Trainer does it before each report and validation)."""
        for reducer, *_ in self._reducers:
            reducer.reset()

    def reduce_metrics(self, for_training: bool) -> dict[str, Any]:
        """The registered reducers' metrics, combined across slots (on every slot)."""
        out: dict[str, Any] = {}
        for reducer, name, training, validation in self._reducers:
            if not (training if for_training else validation):
                continue
            partials = self.distributed.allgather(reducer.per_slot_reduce()) if self.distributed.size > 1 \
                else [reducer.per_slot_reduce()]
            value = reducer.cross_slot_reduce(partials)
            if name is None:
                if not isinstance(value, dict):
                    raise TypeError("a reducer wrapped without a name must return a dict of metrics")
                out.update(value)
            else:
                out[name] = value
        return out

    def _should_communicate_and_update(self) -> bool:
        """Whether this batch ends a gradient-aggregation window (the optimizers step on it)."""
        if self._current_batch_idx is None:
            return True
        return (self._current_batch_idx + 1) % self._aggregation_frequency == 0

    def backward(self, loss: torch.Tensor, gradient: torch.Tensor | None = None, retain_graph: bool = False,
                 create_graph: bool = False) -> None:
        """``loss.backward()``, scaled so aggregated gradients average over the window."""
        if self._aggregation_frequency > 1 and self._average_aggregated_gradients:
            loss = loss / self._aggregation_frequency
        loss.backward(gradient=gradient, retain_graph=retain_graph,  # type: ignore[no-untyped-call]
                      create_graph=create_graph)

    def step_optimizer(self, optimizer: torch.optim.Optimizer,
                       clip_grads: Callable[[Any], None] | None = None, auto_zero_grads: bool = True,
                       scaler: Any = None) -> None:
        """Step ``optimizer`` at the end of each aggregation window (every batch by default), clipping first."""
        if not any(optimizer is o for o in self.optimizers):
            raise ValueError("step_optimizer() takes an optimizer returned by wrap_optimizer()")
        if not self._should_communicate_and_update():
            return
        if clip_grads is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            clip_grads([p for group in optimizer.param_groups for p in group["params"]])
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        if auto_zero_grads:
            optimizer.zero_grad()
