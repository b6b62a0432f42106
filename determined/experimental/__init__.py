"""``from determined.experimental import client`` answered by Kiln's SDK (``kiln.experimental.client``)."""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """``client`` (and any other name of ``kiln.experimental``), loaded on first use."""
    try:
        value = importlib.import_module(f"kiln.experimental.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'determined.experimental' has no attribute {name!r}") from None
    globals()[name] = value
    return value
