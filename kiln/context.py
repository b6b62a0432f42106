"""Code contexts: the tar.gz of a model directory that travels with an experiment.

The client packs it, the gateway checks it before storing it, the worker unpacks it. A hostile archive
(paths leaving the tree, links, devices, too big) is refused with the offending member named.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path, PurePosixPath

DEFAULT_MAX_BYTES = 96 * 1024 * 1024  # compressed; Determined caps contexts at 95 MiB too
DEFAULT_MAX_UNPACKED_BYTES = 512 * 1024 * 1024
_SKIP_DIRS = {".git", "__pycache__", ".venv", ".kiln", ".pytest_cache", ".mypy_cache"}


class ContextError(ValueError):
    """The code context is unacceptable; the message says which member and why."""


def pack(directory: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Pack a model directory into a reproducible tar.gz (sorted, no owners or mtimes)."""
    directory = directory.resolve()
    if not directory.is_dir():
        raise ContextError(f"{directory}: not a directory")
    buf = io.BytesIO()
    # mtime=0: tarfile's own "w:gz" stamps the gzip header with the current time, so the same
    # directory packed a second later would get another digest.
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for root, dirs, files in os.walk(directory):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            for name in sorted(files):
                path = Path(root) / name
                if path.is_symlink() or not path.is_file():
                    continue  # links and special files never travel
                rel = path.relative_to(directory).as_posix()
                info = tar.gettarinfo(str(path), arcname=rel)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
                if buf.tell() > max_bytes:
                    raise ContextError(f"{directory}: context exceeds {max_bytes} bytes compressed")
    data = buf.getvalue()
    if len(data) > max_bytes:
        raise ContextError(f"{directory}: context is {len(data)} bytes, over the {max_bytes}-byte limit")
    return data


def digest(data: bytes) -> str:
    """The content address of a context: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def object_key(context_digest: str) -> str:
    """Where a context lives in the object store, derived from its digest only."""
    return f"contexts/{context_digest.replace(':', '/')}.tar.gz"


def check(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_unpacked: int = DEFAULT_MAX_UNPACKED_BYTES) -> int:
    """Validate an archive without unpacking it; return its member count or raise ContextError."""
    if len(data) > max_bytes:
        raise ContextError(f"context is {len(data)} bytes, over the {max_bytes}-byte limit")
    total = 0
    count = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                _check_member(member)
                total += member.size
                count += 1
                if total > max_unpacked:
                    raise ContextError(f"context unpacks to more than {max_unpacked} bytes")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ContextError(f"context is not a readable tar.gz: {exc}") from exc
    return count


def _check_member(member: tarfile.TarInfo) -> None:
    """Refuse members that could write outside the target or are not plain files/dirs."""
    name = member.name
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/") or "\\" in name:
        raise ContextError(f"context member {name!r}: absolute paths are not allowed")
    if ".." in path.parts:
        raise ContextError(f"context member {name!r}: '..' would leave the context directory")
    if member.issym() or member.islnk():
        raise ContextError(f"context member {name!r}: links are not allowed (target {member.linkname!r})")
    if not (member.isfile() or member.isdir()):
        raise ContextError(f"context member {name!r}: only regular files and directories are allowed")


def extract(data: bytes, target: Path) -> None:
    """Unpack a checked archive into ``target`` (re-checked here: never trust the sender)."""
    check(data)
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        # The "data" filter is a second guard on top of our own member check.
        tar.extractall(target, filter="data")
