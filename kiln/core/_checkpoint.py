"""Checkpoint storage for the Core API: the cluster's store (through the worker), an S3 bucket, or a shared path.

On a cluster the trial holds no store credential: ``LinkedS3Storage`` asks its worker for a presigned URL per
object (per part for a big file: S3 multipart) and moves the bytes with plain HTTP. Every storage streams (no
file is held in memory whole), hashes each file while it streams it up, and stores the file list with sizes,
sha256 and modification times as the checkpoint's manifest (schemas.checkpoint); a download checks each file
against it (a corrupted object is a ``CorruptCheckpoint``) and restores its modification time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import msgspec

from schemas.checkpoint import MANIFEST_FILE, CheckpointFile, CheckpointManifest, CorruptCheckpoint, mismatch

METADATA_FILE = "metadata.json"
# Bytes per read while streaming a file up or down.
CHUNK_BYTES = 1 << 20
# A file bigger than this goes up in parts of this size (S3 multipart; S3's smallest part is 5 MiB).
PART_BYTES = 64 << 20

log = logging.getLogger("kiln.core")

Files = dict[str, CheckpointFile]


class Storage(Protocol):
    """Where checkpoints live."""

    def location(self) -> str: ...

    def upload(self, src: Path, storage_id: str) -> Files: ...

    def upload_manifest(self, storage_id: str, manifest: CheckpointManifest) -> None: ...

    def download(self, storage_id: str, dst: Path) -> None: ...


def _sizes(src: Path) -> dict[str, int]:
    """Each file under ``src`` (relative path) and its size now, the manifest left out."""
    return {rel: p.stat().st_size for p in sorted(src.rglob("*"))
            if p.is_file() and (rel := p.relative_to(src).as_posix()) != MANIFEST_FILE}


class _Hashing:
    """A reader of exactly ``size`` bytes of ``fh`` (a file still growing is cut there) that hashes what it
    hands out: the hash of an upload, computed while it streams."""

    def __init__(self, fh: Any, size: int) -> None:
        self._fh = fh
        self.left = size
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        want = self.left if n is None or n < 0 else min(n, self.left)
        data = self._fh.read(want) if want > 0 else b""
        self.left -= len(data)
        self.sha.update(data)
        return data

    def chunks(self, size: int | None = None) -> Iterator[bytes]:
        """Up to ``size`` (default: all that is left) bytes, CHUNK_BYTES at a time."""
        left = self.left if size is None else min(size, self.left)
        while left > 0:
            data = self.read(min(CHUNK_BYTES, left))
            if not data:
                break
            left -= len(data)
            yield data


def _receive(chunks: Iterable[bytes], target: Path, rel: str, want: CheckpointFile | None, storage_id: str) -> None:
    """Write a downloaded file, check it against the manifest's record (``want``) and set its recorded mtime. A
    file that does not match is removed and raised as CorruptCheckpoint."""
    sha = hashlib.sha256()
    size = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as fh:
        for chunk in chunks:
            sha.update(chunk)
            size += len(chunk)
            fh.write(chunk)
    if want is None:
        return
    why = mismatch(rel, want, size, sha.hexdigest())
    if why:
        target.unlink(missing_ok=True)
        raise CorruptCheckpoint(f"checkpoint {storage_id} is corrupted in the store: {why}")
    os.utime(target, (want.mtime, want.mtime))


def _target(dst: Path, rel: str, storage_id: str) -> Path:
    target = (dst / rel).resolve()
    if not rel or not target.is_relative_to(dst.resolve()):
        raise ValueError(f"checkpoint {storage_id}: object {rel!r} escapes the target")
    return target


def _manifest(raw: bytes | None, storage_id: str) -> CheckpointManifest | None:
    if raw is None:
        return None  # a checkpoint stored before manifests: nothing to check against
    try:
        return msgspec.json.decode(raw, type=CheckpointManifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptCheckpoint(f"checkpoint {storage_id}: its {MANIFEST_FILE} is unreadable: {exc}") from exc


def _missing(manifest: CheckpointManifest | None, found: Iterable[str], storage_id: str) -> None:
    if manifest is None:
        return
    gone = sorted(set(manifest.files) - set(found))
    if gone:
        raise CorruptCheckpoint(f"checkpoint {storage_id} is incomplete in the store: missing {', '.join(gone[:5])}"
                                + (f" and {len(gone) - 5} more" if len(gone) > 5 else ""))


class S3Storage:
    """Checkpoints under ``s3://bucket/prefix/<uuid>/`` through the minio SDK, with a key of the trial's own
    (a user's bucket): a file bigger than ``part_bytes`` goes up in parts."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, prefix: str = "",
                 secure: bool = False, part_bytes: int = PART_BYTES) -> None:
        from minio import Minio  # imported here: a laptop run of the Core API does not need it

        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_bytes = part_bytes

    def _key(self, storage_id: str, rel: str = "") -> str:
        parts = [p for p in (self.prefix, storage_id, rel) if p]
        return "/".join(parts)

    def location(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def upload(self, src: Path, storage_id: str) -> Files:
        """Upload every file under ``src``, streamed and hashed on the way."""
        files: Files = {}
        for rel, size in _sizes(src).items():
            path = src / rel
            mtime = path.stat().st_mtime
            with path.open("rb") as fh:
                reader = _Hashing(fh, size)
                self.client.put_object(self.bucket, self._key(storage_id, rel), reader, size,  # type: ignore[arg-type]
                                       part_size=self.part_bytes, metadata={"mtime": repr(mtime)})
            files[rel] = CheckpointFile(size=size, sha256=reader.sha.hexdigest(), mtime=mtime)
        return files

    def upload_manifest(self, storage_id: str, manifest: CheckpointManifest) -> None:
        """Store the manifest beside the files."""
        import io

        raw = msgspec.json.encode(manifest)
        self.client.put_object(self.bucket, self._key(storage_id, MANIFEST_FILE), io.BytesIO(raw), len(raw))

    def _get(self, key: str) -> Iterator[bytes]:
        resp = self.client.get_object(self.bucket, key)
        try:
            yield from resp.stream(CHUNK_BYTES)
        finally:
            resp.close()
            resp.release_conn()

    def download(self, storage_id: str, dst: Path) -> None:
        """Download every object of a checkpoint into ``dst``, each checked against the manifest."""
        from minio.error import S3Error

        prefix = self._key(storage_id) + "/"
        rels = [o.object_name[len(prefix):] for o in self.client.list_objects(self.bucket, prefix=prefix,
                                                                              recursive=True)]
        if not rels:
            raise FileNotFoundError(f"checkpoint {storage_id} not found in {self.location()}")
        try:
            raw = b"".join(self._get(prefix + MANIFEST_FILE)) if MANIFEST_FILE in rels else None
        except S3Error:
            raw = None
        manifest = _manifest(raw, storage_id)
        _missing(manifest, rels, storage_id)
        for rel in rels:
            if rel != MANIFEST_FILE:
                want = manifest.files.get(rel) if manifest else None
                _receive(self._get(prefix + rel), _target(dst, rel, storage_id), rel, want, storage_id)


class Presigner(Protocol):
    """What LinkedS3Storage needs from the worker link (kiln.core._bus.TrialBus)."""

    def presign(self, method: str, key: str, bucket: str = "", upload_id: str = "", part_number: int = 0) -> str: ...

    def list_keys(self, prefix: str) -> list[str]: ...


class LinkedS3Storage:
    """Checkpoints under ``s3://bucket/<prefix>/<uuid>/`` in the cluster's store, through presigned URLs.

    ``presigner`` is called for the link on first use (ranks other than the chief open theirs only when they
    restore a checkpoint). The worker grants this trial its own experiment's prefix, read-only ``elsewhere``
    (a fine-tune's source checkpoint: storage id -> its key prefix), and nothing else. A file bigger than
    ``part_bytes`` goes up as an S3 multipart upload, each step presigned by the worker.
    """

    def __init__(self, presigner: Callable[[], Presigner], bucket: str, prefix: str,
                 elsewhere: dict[str, str] | None = None, part_bytes: int = PART_BYTES) -> None:
        self._presigner = presigner
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.elsewhere = {k: v.strip("/") for k, v in (elsewhere or {}).items()}
        self.part_bytes = part_bytes
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

    def upload(self, src: Path, storage_id: str) -> Files:
        """Upload every file under ``src``, streamed from disk and hashed on the way."""
        return {rel: self.upload_file(src / rel, storage_id, rel, size, f"upload of {rel} of checkpoint {storage_id}")
                for rel, size in _sizes(src).items()}

    def upload_manifest(self, storage_id: str, manifest: CheckpointManifest) -> None:
        """Store the manifest beside the files."""
        url = self._presigner().presign("PUT", self._key(storage_id, MANIFEST_FILE))
        _check(self._client().put(url, content=msgspec.json.encode(manifest)), f"upload of checkpoint {storage_id}'s"
               " manifest")

    def upload_file(self, path: Path, storage_id: str, rel: str, size: int, what: str) -> CheckpointFile:
        """Upload one file as ``<prefix>/<storage_id>/<rel>``: exactly ``size`` bytes of it (a file that is still
        being appended to is sent as it was when measured), streamed from disk; in parts when it is big."""
        key = self._key(storage_id, rel)
        mtime = path.stat().st_mtime
        with path.open("rb") as fh:
            reader = _Hashing(fh, size)
            if size <= self.part_bytes:
                url = self._presigner().presign("PUT", key)
                _check(self._client().put(url, content=reader.chunks(), headers={"Content-Length": str(size)}), what)
            else:
                self._multipart(reader, key, what)
        return CheckpointFile(size=size, sha256=reader.sha.hexdigest(), mtime=mtime)

    def _multipart(self, reader: _Hashing, key: str, what: str) -> None:
        link, http = self._presigner(), self._client()
        resp = http.post(link.presign("CREATE_MULTIPART", key))
        _check(resp, what)
        upload_id = _xml_text(resp.content, "UploadId")
        if not upload_id:
            raise OSError(f"{what} failed: the store answered no UploadId: {resp.text[:300]}")
        try:
            parts: list[str] = []
            while reader.left > 0:
                number = len(parts) + 1
                size = min(self.part_bytes, reader.left)
                url = link.presign("UPLOAD_PART", key, upload_id=upload_id, part_number=number)
                resp = http.put(url, content=reader.chunks(size), headers={"Content-Length": str(size)})
                _check(resp, f"{what} (part {number})")
                parts.append(f"<Part><PartNumber>{number}</PartNumber><ETag>{resp.headers['etag']}</ETag></Part>")
            body = f"<CompleteMultipartUpload>{''.join(parts)}</CompleteMultipartUpload>".encode()
            resp = http.post(link.presign("COMPLETE_MULTIPART", key, upload_id=upload_id), content=body)
            _check(resp, what)
            if _xml_text(resp.content, "Code"):  # S3 may answer 200 and an error in the body
                raise OSError(f"{what} failed: {resp.text[:300]}")
        except BaseException:
            with contextlib.suppress(Exception):
                http.delete(link.presign("ABORT_MULTIPART", key, upload_id=upload_id))
            raise

    def _get(self, key: str) -> Iterator[bytes]:
        url = self._presigner().presign("GET", key)
        with self._client().stream("GET", url) as resp:
            if resp.status_code >= 300:
                resp.read()
            _check(resp, f"download of {key}")
            yield from resp.iter_bytes(CHUNK_BYTES)

    def download(self, storage_id: str, dst: Path) -> None:
        """GET every object of a checkpoint into ``dst``, streamed to disk and checked against the manifest."""
        prefix = (self.elsewhere.get(storage_id) or self._key(storage_id)) + "/"
        keys = self._presigner().list_keys(prefix)
        if not keys:
            raise FileNotFoundError(f"checkpoint {storage_id} not found in {self.location()}")
        if any(not key.startswith(prefix) for key in keys):
            raise ValueError(f"checkpoint {storage_id}: the listing holds keys outside {prefix}")
        rels = [key[len(prefix):] for key in keys]
        manifest = _manifest(b"".join(self._get(prefix + MANIFEST_FILE)) if MANIFEST_FILE in rels else None,
                             storage_id)
        _missing(manifest, rels, storage_id)
        for rel in rels:
            if rel != MANIFEST_FILE:
                want = manifest.files.get(rel) if manifest else None
                target = _target(dst, rel, storage_id)
                _receive(self._get(prefix + rel), target, rel, want, storage_id)


def _xml_text(body: bytes, tag: str) -> str:
    """The text of the first element named ``tag`` (any namespace) in an S3 answer; "" when there is none."""
    with contextlib.suppress(ET.ParseError):
        for element in ET.fromstring(body).iter():
            if element.tag.rsplit("}", 1)[-1] == tag:
                return element.text or ""
    return ""


class WithSources:
    """A trial's own storage (a bucket of the user's, a shared path) that also reads a fine-tune's source
    checkpoints from the cluster's store, through the worker (``LinkedS3Storage`` with ``elsewhere``)."""

    def __init__(self, own: Storage, sources: LinkedS3Storage) -> None:
        self.own = own
        self.sources = sources

    def location(self) -> str:
        """Where this trial's own checkpoints go."""
        return self.own.location()

    def upload(self, src: Path, storage_id: str) -> Files:
        """Upload to the trial's own storage."""
        return self.own.upload(src, storage_id)

    def upload_manifest(self, storage_id: str, manifest: CheckpointManifest) -> None:
        """The manifest goes with the files."""
        self.own.upload_manifest(storage_id, manifest)

    def download(self, storage_id: str, dst: Path) -> None:
        """A source checkpoint from the cluster's store; any other from the trial's own storage."""
        store: Storage = self.sources if storage_id in self.sources.elsewhere else self.own
        store.download(storage_id, dst)


def _read_file(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
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

    def upload(self, src: Path, storage_id: str) -> Files:
        """Copy the directory into the shared path, hashing each file as it is copied, keeping its mtime."""
        files: Files = {}
        for rel, size in _sizes(src).items():
            target = _target(self.root / storage_id, rel, storage_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            mtime = (src / rel).stat().st_mtime
            with (src / rel).open("rb") as fh, target.open("wb") as out:
                reader = _Hashing(fh, size)
                for chunk in reader.chunks():
                    out.write(chunk)
            os.utime(target, (mtime, mtime))
            files[rel] = CheckpointFile(size=size - reader.left, sha256=reader.sha.hexdigest(), mtime=mtime)
        return files

    def upload_manifest(self, storage_id: str, manifest: CheckpointManifest) -> None:
        """Write the manifest beside the files."""
        (self.root / storage_id).mkdir(parents=True, exist_ok=True)
        part = self.root / storage_id / f".{MANIFEST_FILE}.{os.getpid()}"
        part.write_bytes(msgspec.json.encode(manifest))
        part.replace(self.root / storage_id / MANIFEST_FILE)  # whole or absent for a reader

    def download(self, storage_id: str, dst: Path) -> None:
        """Copy a checkpoint directory out of the shared path, each file checked against the manifest."""
        src = self.root / storage_id
        if not src.is_dir():
            raise FileNotFoundError(f"checkpoint {storage_id} not found under {self.root}")
        raw = (src / MANIFEST_FILE).read_bytes() if (src / MANIFEST_FILE).is_file() else None
        manifest = _manifest(raw, storage_id)
        rels = list(_sizes(src))
        _missing(manifest, rels, storage_id)
        for rel in rels:
            want = manifest.files.get(rel) if manifest else None
            _receive(_read_file(src / rel), _target(dst, rel, storage_id), rel, want, storage_id)


def framework(metadata: dict[str, Any]) -> str:
    """What wrote a checkpoint: the metadata's ``framework`` if the trial gave one (Determined's field), else the
    torch (or tensorflow) the trial process imported, else ""."""
    given = metadata.get("framework")
    if isinstance(given, str) and given:
        return given
    for name in ("torch", "tensorflow"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__version__", None):
            return f"{name}-{module.__version__}"
    return ""


class CheckpointContext:
    """Determined's ``core_context.checkpoint``: store, upload, download, restore.

    Determined's contract on several ranks: an unsharded checkpoint (``shard=False``, the default) is stored
    by the chief alone and the other ranks need not call ``store_path``/``upload`` (there is no collective in
    it). A sharded one (``shard=True``) is a collective: every rank calls it, gets the same storage id, and
    writes its own part; file names must not collide across ranks.
    """

    def __init__(self, storage: Storage, on_stored: Callable[[str, int, CheckpointManifest, dict[str, Any]], None],
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
            self._stored(storage_id, steps, self._storage.upload(path, storage_id), metadata)
            return
        # Sharded: agree that no two ranks write the same file before anyone uploads, then every rank uploads
        # its part, and the chief records the checkpoint once all parts are in (the gather waits for them).
        (path / METADATA_FILE).unlink(missing_ok=True)
        mine = sorted(_sizes(path))
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
            files: Files = {}
            for part in parts:
                files.update(part)
            self._stored(storage_id, steps, files, metadata)
        self._dist.allgather(None)  # every rank returns once the manifest is in: the checkpoint is whole

    def _stored(self, storage_id: str, steps: int, files: Files, metadata: dict[str, Any]) -> None:
        """Every file is in: store the manifest last (a checkpoint without one is incomplete), then report."""
        manifest = CheckpointManifest(steps_completed=steps, framework=framework(metadata), files=files)
        self._storage.upload_manifest(storage_id, manifest)
        self._on_stored(storage_id, steps, manifest, metadata)

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
