"""``pytorch.init()`` and ``Trainer(trial, context).fit(...)``: a PyTorchTrial trained through the Core API.

On a cluster the length comes from the searcher (in the unit of the experiment's ``searcher.max_length``),
hyperparameters and seed from the trial, and the periods from ``fit``'s arguments. Off a cluster
``kiln.core.init()`` runs locally (metrics logged, checkpoints under ./checkpoints) and ``fit`` needs
``max_length``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kiln import core
from kiln._info import get_cluster_info
from kiln.pytorch._context import PyTorchTrialContext
from kiln.pytorch._trial import PyTorchTrial, _TrialLoop
from kiln.pytorch._units import NEVER, Batch, SearcherUnit, TrainUnit, from_searcher_unit

log = logging.getLogger("kiln.pytorch")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _trial_cls_spec(trial: PyTorchTrial) -> str:
    """``module:Class`` for load_trial_from_checkpoint_path; a script run as __main__ is named by its file."""
    cls = type(trial)
    module = cls.__module__
    if module == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        module = Path(main_file).stem if main_file else module
    return f"{module}:{cls.__qualname__}"


class Trainer:
    """Trains a PyTorchTrial: ``Trainer(trial, context).fit(max_length=pytorch.Epoch(1))``."""

    def __init__(self, trial: PyTorchTrial, context: PyTorchTrialContext) -> None:
        self._trial = trial
        self._context = context
        self._info = get_cluster_info()

    def configure_profiler(self, *args: Any, **kwargs: Any) -> None:
        """Accepted for compatibility; Kiln does not collect Determined's profiler metrics."""
        log.warning("Trainer.configure_profiler is not supported by Kiln and is ignored")

    def fit(self, checkpoint_period: TrainUnit | None = None, validation_period: TrainUnit | None = None,
            max_length: TrainUnit | None = None, reporting_period: TrainUnit | None = None,
            checkpoint_policy: str = "best", latest_checkpoint: str | None = None,
            step_zero_validation: bool = False, test_mode: bool = False,
            profiling_enabled: bool = False) -> None:
        """Train to the length, validating, checkpointing and reporting at the given periods."""
        for name, unit in (("checkpoint_period", checkpoint_period), ("validation_period", validation_period),
                           ("max_length", max_length), ("reporting_period", reporting_period)):
            if unit is not None and not isinstance(unit, TrainUnit):
                raise TypeError(f"{name} must be a kiln.pytorch.Batch or Epoch, got {unit!r}")
        if profiling_enabled:
            log.warning("fit(profiling_enabled=True): Kiln does not collect Determined's profiler metrics")
        ctx = self._context
        searcher_metric: str | None = None
        smaller_is_better = True
        time_metric: str | None = None
        global_batch_size = int(ctx._hparams["global_batch_size"]) if "global_batch_size" in ctx._hparams else None
        if self._info is None:
            if max_length is None:
                raise ValueError("fit(max_length=...) is required when training locally (e.g. pytorch.Epoch(1))")
            max_length.length()
            if checkpoint_policy == "best":
                log.info("checkpoint_policy='best' needs the searcher's metric; locally it is 'all'")
                checkpoint_policy = "all"
            length = max_length
        else:
            if test_mode:
                raise ValueError("test_mode is for local training only")
            if latest_checkpoint is None and self._info.latest_checkpoint is not None:
                log.warning("fit() was not given latest_checkpoint, so this restarted trial starts over; pass "
                            "fit(latest_checkpoint=det.get_cluster_info().latest_checkpoint) to continue")
            from schemas import config as schema  # the typed experiment config, on a cluster only

            config = schema.config_from_wire(self._info.trial.config)
            searcher_metric = config.searcher.metric
            smaller_is_better = config.searcher.smaller_is_better
            length, time_metric = _cluster_length(config, ctx._core.searcher.max_length, max_length,
                                                  global_batch_size)
        loop = _TrialLoop(
            self._trial, ctx, max_length=length, checkpoint_period=checkpoint_period or NEVER,
            validation_period=validation_period or NEVER, reporting_period=reporting_period or Batch(100),
            checkpoint_policy=checkpoint_policy, latest_checkpoint=latest_checkpoint,
            step_zero_validation=step_zero_validation, test_mode=test_mode, searcher_metric=searcher_metric,
            smaller_is_better=smaller_is_better, time_metric=time_metric, global_batch_size=global_batch_size,
            trial_cls_spec=_trial_cls_spec(self._trial))
        loop.run()


def _cluster_length(config: Any, searcher_length: int | None, fit_length: TrainUnit | None,
                    global_batch_size: int | None) -> tuple[TrainUnit, str | None]:
    """How long to train on a cluster, and the metric the searcher reads progress from.

    The searcher's target (``core_context.searcher.max_length``) is a number in the unit of the config's
    ``searcher.max_length: {batches|records|epochs: N}``, or of ``time_metric`` when that names one of those
    units; a plain ``max_length: N`` counts batches.
    """
    from schemas import config as schema

    s = config.searcher
    unit: SearcherUnit | None = None
    if isinstance(s.max_length, schema.Length):
        unit = s.max_length.unit
    elif s.time_metric == "batches" or s.time_metric == "records" or s.time_metric == "epochs":
        unit = s.time_metric
    elif isinstance(s.max_length, int):
        unit = "batches"
    if unit is not None and searcher_length:
        if fit_length is not None:
            log.warning("fit(max_length=%r) is ignored on a cluster: the searcher says %d %s",
                        fit_length, searcher_length, unit)
        return from_searcher_unit(searcher_length, unit, global_batch_size), (None if unit == "batches" and
                                                                             s.time_metric is None else unit)
    if fit_length is not None:
        log.info("the searcher's time metric %r is not a training unit; training to fit(max_length=%r)",
                 s.time_metric, fit_length)
        return fit_length, None
    raise ValueError("cannot tell how long to train: give the experiment searcher.max_length in batches, "
                     "records or epochs (or time_metric batches/records/epochs), or pass fit(max_length=...)")


@contextlib.contextmanager
def init(*, hparams: dict[str, Any] | None = None, exp_conf: dict[str, Any] | None = None,
         distributed: Any = None, aggregation_frequency: int = 1,
         enable_tensorboard_logging: bool = True) -> Iterator[PyTorchTrialContext]:
    """The context a PyTorchTrial is built with; ``Trainer`` calls belong inside this block."""
    info = get_cluster_info()
    if info is not None:
        trial_seed = int(info.trial.trial_seed)
        exp_conf = info.trial.config
        hparams = dict(info.trial.hparams) if hparams is None else hparams
    else:
        if hparams is None:
            raise ValueError("pytorch.init(hparams=...) is required when training locally")
        repro = (exp_conf or {}).get("reproducibility") or {}
        trial_seed = int(repro["experiment_seed"]) if repro.get("experiment_seed") is not None \
            else random.randint(0, 2**31 - 1)
    _seed_everything(trial_seed)
    # Determined's Trainer starts torch.distributed itself when launched with several ranks; wrap_model
    # needs the process group before the first model is wrapped.
    started_group = False
    # enable_tensorboard_logging: Kiln writes the metrics as scalars and uploads the TensorBoard directory
    # itself (AUTO); without it nothing is uploaded unless the trial calls upload_tensorboard_files (MANUAL).
    mode = core.TensorboardMode.AUTO if enable_tensorboard_logging else core.TensorboardMode.MANUAL
    with core.init(distributed=distributed, tensorboard_mode=mode) as core_context:
        if core_context.distributed.size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                # Rank and size from the context, not torchrun's RANK/WORLD_SIZE: under horovodrun only
                # MASTER_ADDR/MASTER_PORT (set by kiln.launch.horovod) are there for the rendezvous.
                layout = core_context.distributed
                dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                        rank=layout.rank, world_size=layout.size)
                started_group = True
        context = PyTorchTrialContext(core_context=core_context, hparams=hparams, trial_seed=trial_seed,
                                      exp_conf=exp_conf, aggregation_frequency=aggregation_frequency,
                                      enable_tensorboard_logging=enable_tensorboard_logging)
        try:
            yield context
        finally:
            context._close_tensorboard_writer()  # its last events reach the file before the context uploads it
            if started_group:
                import torch.distributed as dist

                dist.destroy_process_group()


def _train_trial_class(trial_class: type[PyTorchTrial]) -> int:
    """Run a ``module:TrialClass`` entrypoint the way Determined's harness does: periods from the config."""
    info = get_cluster_info()
    if info is None:
        raise RuntimeError(f"{trial_class.__name__} is a PyTorchTrial entrypoint: it runs on a Kiln cluster; "
                           "locally, build it inside `with pytorch.init(hparams=...)` and call Trainer.fit")
    from schemas import config as schema

    config = schema.config_from_wire(info.trial.config)
    gbs = info.trial.hparams.get("global_batch_size")

    def unit(length: Any) -> TrainUnit | None:
        if length is None:
            return None
        return from_searcher_unit(length.units, length.unit, int(gbs) if gbs else None)

    with init() as context:
        trial = trial_class(context)
        Trainer(trial, context).fit(
            validation_period=unit(config.min_validation_period), checkpoint_period=unit(config.min_checkpoint_period),
            reporting_period=Batch(config.scheduling_unit), checkpoint_policy=config.checkpoint_policy,
            latest_checkpoint=info.latest_checkpoint, step_zero_validation=config.perform_initial_validation)
    return 0
