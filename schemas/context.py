"""Code contexts: the tar.gz of a model directory that travels with an experiment.

The client packs it, the gateway checks it before storing it, the worker unpacks it. A hostile archive
(paths leaving the tree, links, devices, too big) is refused with the offending member named. Size limits
hold while the archive is streamed: a decompression bomb is refused at the header that declares too much,
before anything big is held or written (see ``_Capped``).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

_MiB = 1024 * 1024
# Settings of the gateway and the worker: KILN_MAX_CONTEXT_BYTES, KILN_MAX_CONTEXT_UNPACKED_BYTES,
# KILN_MAX_CONTEXT_FILES.
DEFAULT_MAX_BYTES = 96 * _MiB  # compressed; Determined caps contexts at 95 MiB too
DEFAULT_MAX_UNPACKED_BYTES = 256 * _MiB
DEFAULT_MAX_FILES = 10_000
# The largest single read tarfile may make: headers, pax records and long names are read whole, so one
# header declaring gigabytes would otherwise be held in memory. File data is copied in 16 KiB chunks.
_MAX_READ = 1 * _MiB
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


def check(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_unpacked: int = DEFAULT_MAX_UNPACKED_BYTES,
          max_files: int = DEFAULT_MAX_FILES) -> int:
    """Validate an archive without unpacking it; return its member count or raise ContextError."""
    if len(data) > max_bytes:
        raise ContextError(f"context is {len(data)} bytes, over the {max_bytes}-byte limit")
    count = 0
    with _open(data, max_unpacked, max_files) as (tar, tally):
        for member in _members(tar):
            _check_member(member)
            tally(member)
            count += 1
    return count


def extract(data: bytes, target: Path, max_unpacked: int = DEFAULT_MAX_UNPACKED_BYTES,
            max_files: int = DEFAULT_MAX_FILES) -> None:
    """Unpack a checked archive into ``target`` (re-checked here: never trust the sender).

    The limits hold twice (defense in depth): ``check`` first, which writes nothing, then again member
    by member as each is written.
    """
    check(data, max_bytes=len(data), max_unpacked=max_unpacked, max_files=max_files)
    target.mkdir(parents=True, exist_ok=True)
    with _open(data, max_unpacked, max_files) as (tar, tally):

        def guarded(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
            _check_member(member)
            tally(member)
            # The "data" filter is a second guard on top of our own member check.
            return tarfile.data_filter(member, dest)

        tar.extractall(target, filter=guarded)


def _mib(n: int) -> str:
    return f"{n / _MiB:g} MiB"


class _Capped(io.RawIOBase):
    """The decompressed tar stream, refusing to be read or skipped past ``cap`` bytes, or read in
    pieces larger than ``_MAX_READ``: the guard that makes the limits hold while streaming."""

    def __init__(self, inner: Any, cap: int, max_unpacked: int) -> None:
        self._inner = inner
        self._cap = cap
        self._max_unpacked = max_unpacked

    def _guard(self, end: int) -> None:
        if end > self._cap:
            raise ContextError(f"context unpacks to more than {_mib(self._max_unpacked)}")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return int(self._inner.tell())

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.tell() + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR):
            raise io.UnsupportedOperation("seek from the end of a context stream")
        self._guard(target)
        return int(self._inner.seek(target))

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > _MAX_READ:
            raise ContextError(f"context has a member header or record over {_mib(_MAX_READ)}")
        self._guard(self.tell() + size)
        return bytes(self._inner.read(size))

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


class _open:
    """``with _open(data, max_unpacked, max_files) as (tar, tally)``: the archive behind ``_Capped``,
    and a ``tally(member)`` that raises once the members pass a limit. Read errors become ContextError."""

    def __init__(self, data: bytes, max_unpacked: int, max_files: int) -> None:
        raw: Any = io.BytesIO(data)
        if data[:2] == b"\x1f\x8b":
            raw = gzip.GzipFile(fileobj=raw, mode="rb")
        elif data[:3] == b"BZh":
            raw = bz2.BZ2File(raw)
        elif data[:6] == b"\xfd7zXZ\x00":
            raw = lzma.LZMAFile(raw)  # noqa: SIM115 - in-memory views, closed with the tar
        # Room for the headers (and padding) of every allowed member on top of the data itself.
        cap = max_unpacked + (max_files + 4) * 2048
        self._stream = _Capped(raw, cap, max_unpacked)
        self._max_unpacked = max_unpacked
        self._max_files = max_files
        self._count = 0
        self._total = 0

    def tally(self, member: tarfile.TarInfo) -> None:
        self._count += 1
        if self._count > self._max_files:
            raise ContextError(f"context has more than {self._max_files} files")
        if member.isfile():
            self._total += member.size
            if self._total > self._max_unpacked:
                raise ContextError(f"context unpacks to more than {_mib(self._max_unpacked)}"
                                   f" (at member {member.name!r})")

    def __enter__(self) -> tuple[tarfile.TarFile, Any]:
        try:
            self._tar = tarfile.open(fileobj=self._stream, mode="r:")
        except _READ_ERRORS as exc:
            raise ContextError(f"context is not a readable tar.gz: {exc}") from exc
        return self._tar, self.tally

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._tar.close()
        if isinstance(exc, _READ_ERRORS) and not isinstance(exc, ContextError):
            raise ContextError(f"context is not a readable tar.gz: {exc}") from exc


_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


def _members(tar: tarfile.TarFile) -> Any:
    """The members one by one, without keeping them (``tar.members`` would grow with every header)."""
    while (member := tar.next()) is not None:
        yield member
        tar.members.clear()  # type: ignore[attr-defined]  # TarFile's list of members so far (not in typeshed)


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
