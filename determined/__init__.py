"""Determined's package name, answered by Kiln: ``python3 -m determined.launch.X`` runs ``kiln.launch.X``.

Determined's configs and scripts name its launchers as modules (``python3 -m determined.launch.torch_distributed
python3 train.py``), and some scripts start their own ranks with ``python3 -m determined.launch.wrap_rank``.
A rewrite of the entrypoint at submission could fix the first but never the second (the module name is inside
the user's code), so Kiln ships this small package instead. Its other names (``determined.core``,
``determined.get_cluster_info``...) are Kiln's, loaded on first use, so ``import determined as det`` works
too; the documented form stays ``import kiln as det``. Do not install Kiln and Determined in one environment.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """Kiln's name of the same spelling (``core``, ``get_cluster_info``, ``LOG_FORMAT``, ``pytorch``...)."""
    kiln = importlib.import_module("kiln")
    try:
        value = getattr(kiln, name)
    except AttributeError:
        try:
            value = importlib.import_module(f"kiln.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module 'determined' has no attribute {name!r} (Kiln has no {name!r})") from None
    globals()[name] = value
    return value
