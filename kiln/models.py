"""Models from the registry, as files: ``kiln.models.load("digits")`` gives a local directory holding the files of
the checkpoint that the model's latest version (or ``version=N``) names.

The files come through the gateway, as ``kiln checkpoint download`` gets them (so the same rule holds: the
checkpoint's experiment's owner or an admin may read them), and are kept in a cache keyed by the checkpoint's uuid:
a checkpoint never changes once stored, so a second ``load`` of any version naming it reads nothing again. The
cache is ``$KILN_CACHE_DIR/checkpoints`` (else ``$XDG_CACHE_HOME/kiln``, else ``~/.cache/kiln``).

Example, with the digits example's network::

    import torch, kiln.models
    from model import build_model  # examples/digits/model.py

    path = kiln.models.load("digits")
    net = build_model(16)
    net.load_state_dict(torch.load(path / "model.pt", weights_only=True))
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from kiln.client import Client
from schemas.registry import parse_version

__all__ = ["cache_dir", "fetch", "load"]


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept, one directory per uuid."""
    root = os.environ.get("KILN_CACHE_DIR")
    if root:
        return Path(root) / "checkpoints"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) / "kiln" if xdg else Path.home() / ".cache" / "kiln") / "checkpoints"


def load(name: str, version: int | str | None = "latest", *, client: Client | None = None,
         cache: str | Path | None = None) -> Path:
    """The local directory holding the files of model ``name``'s ``version`` (a number, or ``latest``).

    Downloaded once per checkpoint into the cache (``cache`` overrides where); the directory appears whole or
    not at all (files land in a scratch directory beside it first), so an interrupted load leaves nothing half
    there. Raises ``kiln.client.APIError`` for what the gateway refuses (no such model or version: 404; not
    allowed to read the checkpoint: 403; its files deleted: 410).
    """
    selector = parse_version(version)
    own = client is None
    session = client or Client()
    try:
        found = session.get_model_version(name, selector)
        return fetch(str(found["checkpoint_uuid"]), client=session, cache=cache)
    finally:
        if own:
            session.close()


def fetch(uuid: str, *, client: Client | None = None, cache: str | Path | None = None) -> Path:
    """The local directory holding checkpoint ``uuid``'s files, downloaded through the gateway the first time
    (into the cache, whole or not at all) and read from there after that, by any process on this host."""
    root = Path(cache) if cache is not None else cache_dir()
    target = root / uuid
    if target.is_dir():
        return target
    own = client is None
    session = client or Client()
    try:
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{uuid}.", dir=root))
        try:
            session.download_checkpoint(uuid, scratch)
            try:
                scratch.rename(target)
            except OSError:
                if not target.is_dir():  # another load put it there first: keep that one
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return target
    finally:
        if own:
            session.close()
