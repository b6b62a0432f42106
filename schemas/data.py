"""Data versions: the Delta Lake table an experiment reads, and where it lives.

An experiment config names a Delta table in its ``data`` block (``data: {delta_table: URI, version: N}``);
the rest of ``data`` is the user's own (Determined passes it to the trial untouched, and so does Kiln). The
gateway resolves the table at submission (``version`` left out: the latest one) and records the config with
``version`` filled in, so every trial, restart and replay reads that one version; it never resolves again.

Pure: no deltalake import here (the gateway and ``kiln.data`` open tables); this module only says what a
``data`` block means, where a URI points and which options delta-rs needs for the stack's S3 store.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal

import msgspec

# The keys of ``data`` Kiln reads; everything else in ``data`` belongs to the user's training code.
DELTA_TABLE = "delta_table"
DELTA_VERSION = "version"
# A Delta log's file names: a commit, a (multi-part) classic checkpoint, a v2 checkpoint.
_COMMIT = re.compile(r"^(\d{20})\.json$")
_CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint(?:\.(\d{10})\.(\d{10}))?\.parquet$")
_V2_CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint\.[0-9a-fA-F-]{36}\.(?:json|parquet)$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Characters a table's key prefix may hold: delta-rs reads an s3:// URI as a URL (a "?" or "#" would cut the path,
# "%" and spaces are encoded again), so the prefix it opens must be the one the worker grants, byte for byte.
_S3_PATH = re.compile(r"^[A-Za-z0-9._=+@,-]+(/[A-Za-z0-9._=+@,-]+)*$")
_URL_SPECIAL = re.compile(r"[?#%]")
_INT64_MAX = 2**63 - 1


class DeltaSource(msgspec.Struct, frozen=True, kw_only=True):
    """The Delta table an experiment reads (``data.delta_table``) and the version it reads (``data.version``;
    None until the gateway pinned the latest at submission)."""

    table: str
    version: int | None = None


class TableLocation(msgspec.Struct, frozen=True, kw_only=True):
    """Where a table URI points: the stack's S3 store (``bucket``, ``prefix`` without slashes at either end)
    or a local directory (``path``, absolute), seen at the same path by the gateway and every worker."""

    kind: Literal["s3", "local"]
    bucket: str = ""
    prefix: str = ""
    path: str = ""

    @property
    def uri(self) -> str:
        """The URI delta-rs opens."""
        return f"s3://{self.bucket}/{self.prefix}" if self.kind == "s3" else self.path


def locate(uri: str) -> TableLocation:
    """Where ``uri`` points; ValueError saying what is wrong with it.

    ``s3://bucket/path`` is a table in the stack's own S3 store; ``file:///abs/path`` or ``/abs/path`` a
    directory on a filesystem every worker mounts at that path. Anything else is refused, by name.
    """
    if any(ord(c) < 32 for c in uri):
        raise ValueError("control characters in the table URI")
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.match(bucket):
            raise ValueError(f"{uri!r}: {bucket!r} is not a bucket name (3-63 of a-z, 0-9, '.', '-')")
        if not prefix:
            raise ValueError(f"{uri!r}: name the table's directory inside the bucket (s3://{bucket}/path/to/table)")
        if any(seg in ("", ".", "..") for seg in prefix.split("/")):
            raise ValueError(f"{uri!r}: the path has an empty, '.' or '..' segment")
        if not _S3_PATH.match(prefix):
            raise ValueError(f"{uri!r}: the path may hold only letters, digits and . _ = + @ , - between slashes")
        return TableLocation(kind="s3", bucket=bucket, prefix=prefix)
    path = uri.removeprefix("file://") if uri.startswith("file://") else uri
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", path)
    if scheme:
        raise ValueError(f"{uri!r}: {scheme.group(1)}:// tables are not supported yet by Kiln; expected s3://bucket/"
                         "path (the stack's S3 store) or an absolute local path")
    if not path.startswith("/"):
        raise ValueError(f"{uri!r}: a local table needs an absolute path (the gateway and the workers resolve it,"
                         " not the directory the CLI ran in)")
    if any(seg in (".", "..") for seg in path.split("/")):
        raise ValueError(f"{uri!r}: the path has a '.' or '..' segment")
    if _URL_SPECIAL.search(path):
        raise ValueError(f"{uri!r}: '?', '#' and '%' are not allowed in a table path")
    return TableLocation(kind="local", path="/" + path.strip("/"))


def data_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """What is wrong with the Delta part of a ``data`` block: ``(key, message)`` pairs; other keys are the
    user's and are not looked at. ``version`` means a table version only beside ``delta_table``."""
    if DELTA_TABLE not in data:
        return []
    problems: list[tuple[str, str]] = []
    table = data[DELTA_TABLE]
    if not isinstance(table, str) or not table:
        problems.append((DELTA_TABLE, f"expected a table URI (s3://bucket/path or an absolute path), got {table!r}"))
    else:
        try:
            locate(table)
        except ValueError as exc:
            problems.append((DELTA_TABLE, str(exc)))
    version = data.get(DELTA_VERSION)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or not 0 <= version <= _INT64_MAX):
        problems.append((DELTA_VERSION, f"expected a table version (int >= 0) or null for the latest, got {version!r}"))
    return problems


def delta_source(data: dict[str, Any]) -> DeltaSource | None:
    """The Delta table a (validated) ``data`` block names, or None."""
    table = data.get(DELTA_TABLE)
    if not isinstance(table, str) or not table:
        return None
    version = data.get(DELTA_VERSION)
    return DeltaSource(table=table, version=version if isinstance(version, int) and not isinstance(version, bool)
                       else None)


def pinned(data: dict[str, Any], version: int) -> dict[str, Any]:
    """``data`` with its table's version set: what the gateway records, so nothing resolves it again."""
    return {**data, DELTA_VERSION: version}


def s3_storage_options(endpoint: str, access_key: str, secret_key: str, *, secure: bool) -> dict[str, str]:
    """delta-rs options for the stack's S3 store (``endpoint`` as host:port).

    SeaweedFS takes any region name; path-style URLs because buckets are not DNS names here; writers (tests,
    users' own jobs) need ``AWS_S3_ALLOW_UNSAFE_RENAME`` unless the store does conditional puts: Kiln only
    reads, so the reading side never needs it.
    """
    return {
        "AWS_ENDPOINT_URL": f"{'https' if secure else 'http'}://{endpoint}",
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "false" if secure else "true",
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false",
    }


def log_files_for(names: list[str], version: int) -> list[str]:
    """The files of a table's ``_delta_log`` (names relative to it) that a reader of ``version`` needs: the
    newest checkpoint at or below it (every part) and the commits after that up to it; all commits up to it when
    there is no checkpoint. ``_last_checkpoint`` is left out on purpose: it may point past ``version``."""
    checkpoints: dict[int, list[str]] = {}
    commits: dict[int, str] = {}
    sidecars = [n for n in names if n.startswith("_sidecars/")]
    for name in names:
        if m := _COMMIT.match(name):
            commits[int(m.group(1))] = name
        elif (m := _CHECKPOINT.match(name)) or (m := _V2_CHECKPOINT.match(name)):
            checkpoints.setdefault(int(m.group(1)), []).append(name)
    usable = [v for v, parts in checkpoints.items() if v <= version and _complete(parts)]
    base = max(usable, default=-1)
    chosen = sorted(checkpoints.get(base, [])) + [commits[v] for v in sorted(commits) if base < v <= version]
    if any(_V2_CHECKPOINT.match(n) for n in chosen):
        chosen += sorted(sidecars)  # a v2 checkpoint may keep its actions in sidecar files
    return chosen


def _complete(parts: list[str]) -> bool:
    """A classic multi-part checkpoint is usable only with all of its parts."""
    multi = [m for p in parts if (m := _CHECKPOINT.match(p)) and m.group(2)]
    if not multi:
        return True
    total = int(multi[0].group(3))
    return len({int(m.group(2)) for m in multi}) == total


def cache_name(location: TableLocation) -> str:
    """A directory name for a local copy of a table's files (one per table, shared by its versions)."""
    return hashlib.sha256(location.uri.encode()).hexdigest()[:16]
