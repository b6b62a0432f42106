"""``kiln.pytorch``: Determined's PyTorchTrial and Trainer, on Kiln's Core API.

Determined code written against ``determined.pytorch`` runs with ``from kiln import pytorch``::

    with pytorch.init(hparams={"global_batch_size": 32, ...}) as context:
        trial = MyTrial(context)
        pytorch.Trainer(trial, context).fit(max_length=pytorch.Epoch(5), validation_period=pytorch.Epoch(1))

This package imports torch; ``import kiln`` does not (it loads ``kiln.pytorch`` on first use).
"""

from kiln.pytorch._context import LRScheduler, PyTorchExperimentalContext, PyTorchTrialContext
from kiln.pytorch._data import DataLoader, TorchData, data_length, to_device
from kiln.pytorch._load import load_trial_from_checkpoint_path
from kiln.pytorch._reducer import MetricReducer, Reducer
from kiln.pytorch._trainer import Trainer, init
from kiln.pytorch._trial import PyTorchCallback, PyTorchTrial
from kiln.pytorch._units import Batch, Epoch, TrainUnit

__all__ = [
    "Batch",
    "DataLoader",
    "Epoch",
    "LRScheduler",
    "MetricReducer",
    "PyTorchCallback",
    "PyTorchExperimentalContext",
    "PyTorchTrial",
    "PyTorchTrialContext",
    "Reducer",
    "TorchData",
    "TrainUnit",
    "Trainer",
    "data_length",
    "init",
    "load_trial_from_checkpoint_path",
    "to_device",
]
