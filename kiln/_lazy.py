"""A module stand-in that imports the real module on first attribute access.

The client SDK needs httpx only once it sends a request; ``kiln --help``, ``kiln preview-search`` and the
stack commands never do, and httpx (with the CLI extras it pulls in when they are installed) costs about
0.1 s to import.
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands in for module ``name``; every attribute is read from the real module, imported on first use."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        # import_module takes the import lock and returns the cached module after the first call,
        # so concurrent first uses from several threads import it once.
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"
