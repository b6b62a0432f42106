"""Checkpoint storage for the Core API: the cluster's store (through the worker), an S3 bucket, or a shared path.

On a cluster the trial holds no store credential: ``LinkedS3Storage`` asks its worker for a presigned URL per
object and moves the bytes with plain HTTP, streaming (no file is held in memory whole).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import msgspec

METADATA_FILE = "metadata.json"
# Bytes per read while streaming a file up or down.
CHUNK_BYTES = 1 << 20

log = logging.getLogger("kiln.core")


class Storage(Protocol):
    """Where checkpoints live."""

    def location(self) -> str: ...

    def upload(self, src: Path, storage_id: str) -> dict[str, int]: ...

    def download(self, storage_id: str, dst: Path) -> None: ...


def _files(src: Path) -> dict[str, int]:
    return {p.relative_to(src).as_posix(): p.stat().st_size for p in sorted(src.rglob("*")) if p.is_file()}


class S3Storage:
    """Checkpoints under ``s3://bucket/prefix/<uuid>/`` through the minio SDK."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, prefix: str = "",
                 secure: bool = False) -> None:
        from minio import Minio  # imported here: a laptop run of the Core API does not need it

        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure)
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, storage_id: str, rel: str = "") -> str:
        parts = [p for p in (self.prefix, storage_id, rel) if p]
        return "/".join(parts)

    def location(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def upload(self, src: Path, storage_id: str) -> dict[str, int]:
        """Upload every file under ``src``; return relative path → size."""
        files = _files(src)
        for rel in files:
            self.client.fput_object(self.bucket, self._key(storage_id, rel), str(src / rel))
        return files

    def download(self, storage_id: str, dst: Path) -> None:
        """Download every object of a checkpoint into ``dst``."""
        prefix = self._key(storage_id) + "/"
        found = False
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
            rel = obj.object_name[len(prefix):]
            target = (dst / rel).resolve()
            if not str(target).startswith(str(dst.resolve())):
                raise ValueError(f"checkpoint {storage_id}: object {obj.object_name!r} escapes the target")
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.fget_object(self.bucket, obj.object_name, str(target))
            found = True
        if not found:
            raise FileNotFoundError(f"checkpoint {storage_id} not found in {self.location()}")


class Presigner(Protocol):
    """What LinkedS3Storage needs from the worker link (kiln.core._bus.TrialBus)."""

    def presign(self, method: str, key: str) -> str: ...

    def list_keys(self, prefix: str) -> list[str]: ...


class LinkedS3Storage:
    """Checkpoints under ``s3://bucket/<prefix>/<uuid>/`` in the cluster's store, through presigned URLs.

    ``presigner`` is called for the link on first use (ranks other than the chief open theirs only when they
    restore a checkpoint). The worker grants this trial its own experiment's prefix, read-only ``elsewhere``
    (a fine-tune's source checkpoint: storage id -> its key prefix), and nothing else.
    """

    def __init__(self, presigner: Callable[[], Presigner], bucket: str, prefix: str,
                 elsewhere: dict[str, str] | None = None) -> None:
        self._presigner = presigner
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.elsewhere = {k: v.strip("/") for k, v in (elsewhere or {}).items()}
        self._http: Any = None

    def _client(self) -> Any:
        if self._http is None:
            import httpx  # imported here: a laptop run of the Core API does not need it

            # trust_env off: the store is the worker's, reached directly (no proxy from the environment).
            self._http = httpx.Client(trust_env=False, timeout=httpx.Timeout(60.0, connect=10.0))
        return self._http

    def _key(self, storage_id: str, rel: str = "") -> str:
        return "/".join(p for p in (self.prefix, storage_id, rel) if p)

    def location(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def upload(self, src: Path, storage_id: str) -> dict[str, int]:
        """PUT every file under ``src``, one presigned URL each, streamed from disk."""
        files = _files(src)
        for rel, size in files.items():
            self.upload_file(src / rel, storage_id, rel, size, f"upload of {rel} of checkpoint {storage_id}")
        return files

    def upload_file(self, path: Path, storage_id: str, rel: str, size: int, what: str) -> None:
        """PUT one file as ``<prefix>/<storage_id>/<rel>``: exactly ``size`` bytes of it (a file that is still
        being appended to is sent as it was when measured), through one presigned URL, streamed from disk."""
        url = self._presigner().presign("PUT", self._key(storage_id, rel))
        with path.open("rb") as fh:
            resp = self._client().put(url, content=_chunks(fh, size), headers={"Content-Length": str(size)})
        _check(resp, what)

    def download(self, storage_id: str, dst: Path) -> None:
        """GET every object of a checkpoint into ``dst``, streamed to disk."""
        prefix = (self.elsewhere.get(storage_id) or self._key(storage_id)) + "/"
        keys = self._presigner().list_keys(prefix)
        if not keys:
            raise FileNotFoundError(f"checkpoint {storage_id} not found in {self.location()}")
        root = dst.resolve()
        for key in keys:
            target = (dst / key[len(prefix):]).resolve()
            if not key.startswith(prefix) or not target.is_relative_to(root):
                raise ValueError(f"checkpoint {storage_id}: object {key!r} escapes the target")
            target.parent.mkdir(parents=True, exist_ok=True)
            url = self._presigner().presign("GET", key)
            with self._client().stream("GET", url) as resp:
                if resp.status_code >= 300:
                    resp.read()
                _check(resp, f"download of {key}")
                with target.open("wb") as fh:
                    for chunk in resp.iter_bytes(CHUNK_BYTES):
                        fh.write(chunk)


class WithSources:
    """A trial's own storage (a bucket of the user's, a shared path) that also reads a fine-tune's source
    checkpoints from the cluster's store, through the worker (``LinkedS3Storage`` with ``elsewhere``)."""

    def __init__(self, own: Storage, sources: LinkedS3Storage) -> None:
        self.own = own
        self.sources = sources

    def location(self) -> str:
        """Where this trial's own checkpoints go."""
        return self.own.location()

    def upload(self, src: Path, storage_id: str) -> dict[str, int]:
        """Upload to the trial's own storage."""
        return self.own.upload(src, storage_id)

    def download(self, storage_id: str, dst: Path) -> None:
        """A source checkpoint from the cluster's store; any other from the trial's own storage."""
        store: Storage = self.sources if storage_id in self.sources.elsewhere else self.own
        store.download(storage_id, dst)


def _chunks(fh: Any, size: int | None = None) -> Iterator[bytes]:
    """The file's bytes in chunks; with ``size``, exactly that many (a file that grew meanwhile is cut there)."""
    left = size
    while left is None or left > 0:
        chunk = fh.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
        if not chunk:
            break
        if left is not None:
            left -= len(chunk)
        yield chunk


def _check(resp: Any, what: str) -> None:
    if resp.status_code >= 300:
        raise OSError(f"{what} failed: HTTP {resp.status_code} {resp.text[:300]}")


class SharedFSStorage:
    """Checkpoints as directories under a path every host mounts (``shared_fs``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def location(self) -> str:
        """``file://<root>``."""
        return f"file://{self.root}"

    def upload(self, src: Path, storage_id: str) -> dict[str, int]:
        """Copy the directory into the shared path."""
        dst = self.root / storage_id
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return _files(dst)

    def download(self, storage_id: str, dst: Path) -> None:
        """Copy a checkpoint directory out of the shared path."""
        src = self.root / storage_id
        if not src.is_dir():
            raise FileNotFoundError(f"checkpoint {storage_id} not found under {self.root}")
        shutil.copytree(src, dst, dirs_exist_ok=True)


class CheckpointContext:
    """Determined's ``core_context.checkpoint``: store, upload, download, restore.

    Determined's contract on several ranks: an unsharded checkpoint (``shard=False``, the default) is stored
    by the chief alone and the other ranks need not call ``store_path``/``upload`` (there is no collective in
    it). A sharded one (``shard=True``) is a collective: every rank calls it, gets the same storage id, and
    writes its own part; file names must not collide across ranks.
    """

    def __init__(self, storage: Storage, on_stored: Callable[[str, int, dict[str, int], dict[str, Any]], None],
                 is_chief: bool = True, distributed: Any = None) -> None:
        self._storage = storage
        self._on_stored = on_stored
        self._is_chief = is_chief
        self._dist = distributed
        self._warned = False

    def _several(self) -> bool:
        return self._dist is not None and self._dist.size > 1

    def _discarding(self, what: str) -> None:
        """A non-chief rank called an unsharded store: nothing of it is kept (said once per process)."""
        if not self._warned:
            self._warned = True
            log.warning("%s(shard=False) on rank %d: only the chief stores an unsharded checkpoint, so what this "
                        "rank writes is discarded and it gets no storage id (use shard=True to store every "
                        "rank's part)", what, self._dist.rank)

    @contextlib.contextmanager
    def store_path(self, metadata: dict[str, Any], *, shard: bool = False) -> Iterator[tuple[Path, str]]:
        """Yield ``(path, storage_id)``; what is written under path is uploaded when the block exits."""
        steps = _steps_completed(metadata)
        if not shard and not self._is_chief:
            self._discarding("store_path")
            with tempfile.TemporaryDirectory(prefix="kiln-ckpt-discarded-") as tmp:
                yield Path(tmp), None  # type: ignore[misc]
            return
        storage_id = self._new_id(shard)
        with tempfile.TemporaryDirectory(prefix="kiln-ckpt-") as tmp:
            path = Path(tmp)
            yield path, storage_id
            self._finish(path, storage_id, steps, metadata, shard)

    def upload(self, ckpt_dir: str | os.PathLike[str], metadata: dict[str, Any], *, shard: bool = False) -> str:
        """Upload an existing directory as a new checkpoint; return its storage id."""
        steps = _steps_completed(metadata)
        if not shard and not self._is_chief:
            self._discarding("upload")
            return None  # type: ignore[return-value]
        storage_id = self._new_id(shard)
        self._finish(Path(ckpt_dir), storage_id, steps, metadata, shard)
        return storage_id

    def _new_id(self, shard: bool) -> str:
        """A fresh storage id; a sharded checkpoint's is the chief's, on every rank (a collective)."""
        storage_id = str(uuidlib.uuid4())
        if shard and self._several():
            storage_id = str(self._dist.broadcast(storage_id))
        return storage_id

    def _finish(self, path: Path, storage_id: str, steps: int, metadata: dict[str, Any], shard: bool) -> None:
        if not shard or not self._several():
            (path / METADATA_FILE).write_bytes(msgspec.json.encode(metadata))
            self._on_stored(storage_id, steps, self._storage.upload(path, storage_id), metadata)
            return
        # Sharded: agree that no two ranks write the same file before anyone uploads, then every rank uploads
        # its part, and the chief records the checkpoint once all parts are in (the gather waits for them).
        (path / METADATA_FILE).unlink(missing_ok=True)
        mine = sorted(_files(path))
        owners: dict[str, list[int]] = {}
        for rank, names in enumerate(self._dist.allgather(mine)):
            for name in names:
                owners.setdefault(name, []).append(rank)
        clashes = {name: ranks for name, ranks in owners.items() if len(ranks) > 1}
        if clashes:
            shown = ", ".join(f"{name} (ranks {ranks})" for name, ranks in sorted(clashes.items())[:5])
            raise RuntimeError(f"sharded checkpoint {storage_id}: several ranks wrote the same file: {shown}")
        if self._is_chief:
            (path / METADATA_FILE).write_bytes(msgspec.json.encode(metadata))
        uploaded = self._storage.upload(path, storage_id) if any(path.iterdir()) else {}
        parts = self._dist.gather(uploaded)
        if self._is_chief:
            resources: dict[str, int] = {}
            for part in parts:
                resources.update(part)
            self._on_stored(storage_id, steps, resources, metadata)

    def download(self, storage_id: str, ckpt_dir: str | os.PathLike[str]) -> None:
        """Download a checkpoint into ``ckpt_dir``."""
        dst = Path(ckpt_dir)
        dst.mkdir(parents=True, exist_ok=True)
        self._storage.download(storage_id, dst)

    @contextlib.contextmanager
    def restore_path(self, storage_id: str) -> Iterator[Path]:
        """Yield a local directory holding the checkpoint; it is removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="kiln-restore-") as tmp:
            self.download(storage_id, tmp)
            yield Path(tmp)

    def get_metadata(self, storage_id: str) -> dict[str, Any]:
        """The metadata stored with a checkpoint."""
        with self.restore_path(storage_id) as path:
            meta = path / METADATA_FILE
            return msgspec.json.decode(meta.read_bytes()) if meta.exists() else {}


def _steps_completed(metadata: dict[str, Any]) -> int:
    if "steps_completed" not in metadata:
        # Determined requires it too: it is how a checkpoint is placed on the trial's timeline.
        raise ValueError("checkpoint metadata must include 'steps_completed'")
    return int(metadata["steps_completed"])
