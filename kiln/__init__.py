"""Kiln: the client SDK, the Core API for training code, and the ``kiln`` CLI.

Training scripts written for Determined run with one changed line: ``import kiln as det``.
The Core API's names and ``kiln.pytorch`` load on first use (PEP 562), so the CLI and the client SDK,
which live in this package too, do not pay for ``kiln.core`` and its event schemas (or torch) when they
start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln import core, data, experimental, models, pytorch
    from kiln._info import ClusterInfo, TrialInfo, get_cluster_info
    from kiln.core import InvalidHP

# Determined's log format, so log parsers written for it keep working.
LOG_FORMAT = "%(levelname)s: [%(process)s] %(name)s: %(message)s"

__all__ = ["ClusterInfo", "InvalidHP", "LOG_FORMAT", "TrialInfo", "core", "data", "experimental",
           "get_cluster_info", "models", "pytorch"]

# name -> the module that defines it (a submodule's own name maps to the submodule itself).
_SUBMODULES = {"core", "data", "experimental", "models", "pytorch"}
_LAZY = {
    "core": "kiln.core",
    "data": "kiln.data",
    "pytorch": "kiln.pytorch",
    "experimental": "kiln.experimental",
    "models": "kiln.models",  # the model registry's files: kiln.models.load(name)
    "ClusterInfo": "kiln._info",
    "TrialInfo": "kiln._info",
    "get_cluster_info": "kiln._info",
    "InvalidHP": "kiln.core",
}


def __getattr__(name: str) -> Any:
    """Load a Core API name the first time it is asked for, then keep it as a plain attribute."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    loaded = importlib.import_module(module)
    value = loaded if name in _SUBMODULES else getattr(loaded, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
