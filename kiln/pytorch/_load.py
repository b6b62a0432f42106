"""``load_trial_from_checkpoint_path``: a trained PyTorchTrial back from a downloaded checkpoint directory."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from kiln.pytorch._context import PyTorchTrialContext
from kiln.pytorch._trial import LOAD_DATA_FILE, STATE_DICT_FILE, PyTorchTrial, _unwrap


class _OneProcess:
    """The distributed facts of a trial loaded for inference: one process, no collectives."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    cross_rank = 0
    cross_size = 1

    def allgather(self, stuff: Any) -> list[Any]:
        return [stuff]

    def gather(self, stuff: Any) -> list[Any]:
        return [stuff]

    def broadcast(self, stuff: Any) -> Any:
        return stuff


class _CheckpointLoadCore:
    """Stands in for the Core API context: a loaded trial trains nothing and reports nothing."""

    def __init__(self) -> None:
        self.distributed = _OneProcess()
        self.info = None


def _import_spec(spec: str, code_dir: Path) -> type[PyTorchTrial]:
    module_name, _, qualname = spec.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"the checkpoint names its trial class as {spec!r}; pass trial_class= instead")
    if code_dir.is_dir() and str(code_dir) not in sys.path:
        sys.path.insert(0, str(code_dir))
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target  # type: ignore[no-any-return]


def load_trial_from_checkpoint_path(path: str | Path, trial_class: type[PyTorchTrial] | None = None,
                                    trial_kwargs: dict[str, Any] | None = None,
                                    torch_load_kwargs: dict[str, Any] | None = None) -> PyTorchTrial:
    """Build the trial with the checkpoint's hyperparameters and load its models' weights.

    ``trial_class`` defaults to the class the checkpoint records (``module:Class``, imported from the
    checkpoint's ``code/`` directory or ``sys.path``); ``torch_load_kwargs`` go to ``torch.load``.
    """
    ckpt = Path(path)
    load_data_file = ckpt / LOAD_DATA_FILE
    if not load_data_file.exists():
        raise FileNotFoundError(f"{ckpt} holds no {LOAD_DATA_FILE}: not a checkpoint written by the PyTorch Trainer")
    load_data = json.loads(load_data_file.read_text())
    if trial_class is None:
        trial_class = _import_spec(str(load_data.get("trial_cls_spec", "")), ckpt / "code")
    context = PyTorchTrialContext(core_context=_CheckpointLoadCore(), hparams=load_data.get("hparams") or {},
                                  trial_seed=0, exp_conf=load_data.get("experiment_config") or None,
                                  managed_training=False)
    trial = trial_class(context, **(trial_kwargs or {}))
    kwargs = {"map_location": "cpu", "weights_only": True, **(torch_load_kwargs or {})}
    state = torch.load(ckpt / STATE_DICT_FILE, **kwargs)
    models = state.get("models_state_dict", [])
    if len(models) != len(context.models):
        raise ValueError(f"the checkpoint holds {len(models)} models, the trial wrapped {len(context.models)}")
    for model, model_state in zip(context.models, models, strict=True):
        _unwrap(model).load_state_dict(model_state)
        model.eval()
    return trial
