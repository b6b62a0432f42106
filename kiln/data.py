"""``kiln.data``: the Delta table version an experiment pinned, read in its trials (pyarrow, torch).

An experiment config names a table in ``data`` (``data: {delta_table: s3://bucket/path, version: 3}``); the
gateway pins the version at submission (the latest when none is named) and the trial's config carries it, so
``kiln.data.delta_table()`` reads exactly that version however often the trial restarts, while the table moves
on::

    import kiln.data

    data = kiln.data.delta_table()          # the running trial's table, at its pinned version
    data.version, data.num_rows
    table = data.to_pyarrow()               # a pyarrow.Table
    for batch in data.to_batches(1024): ...  # pyarrow.RecordBatch
    for batch in data.torch_batches(64, columns=["x", "y"], shuffle=True, seed=1): ...  # dicts of tensors

The trial holds no store credential (README "Security"): a table in the stack's S3 store is copied, the log up
to the pinned version and the data files that version uses, into a local cache through URLs the worker
presigns (it grants this trial the table's prefix, read-only, and nothing else), then read from there. A
local table (an absolute path every worker mounts) is read in place. Outside a cluster, name the table:
``delta_table("/data/t", version=0)`` or an ``s3://`` URI with ``storage_options``.

``deltalake``, ``pyarrow`` and ``torch`` load on first use, not with ``import kiln``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas import data as schema

if TYPE_CHECKING:
    import pyarrow as pa
    import torch
    from deltalake import DeltaTable

    from kiln.core._bus import TrialBus

__all__ = ["DeltaData", "delta_source", "delta_table"]

# Where copies of tables in the store go (per table; versions share files): KILN_DATA_CACHE, else under HOME,
# which in a trial is the allocation's own work dir (removed with it).
CACHE_ENV = "KILN_DATA_CACHE"
_CHUNK = 1 << 20


def delta_source() -> schema.DeltaSource | None:
    """The table and pinned version the running trial's config names (``data.delta_table``), or None (no table
    named, or not on a cluster)."""
    from kiln._info import wire_cluster_info

    wire = wire_cluster_info()
    if wire is None:
        return None
    return schema.delta_source(wire.trial.config.get("data") or {})


def delta_table(table: str | None = None, version: int | None = None, *,
                storage_options: dict[str, str] | None = None, cache_dir: str | os.PathLike[str] | None = None
                ) -> DeltaData:
    """The Delta table to train on: by default the running trial's (``data.delta_table`` at the version pinned at
    submission); else ``table`` (a path or URI) at ``version`` (None: its latest), opened directly."""
    if table is not None:
        from deltalake import DeltaTable

        opened = DeltaTable(table, version=version, storage_options=storage_options)
        return DeltaData(opened, table, opened.version())
    source = delta_source()
    if source is None:
        raise LookupError("no Delta table to read: this is not a trial whose experiment config names"
                          " data.delta_table (outside a cluster, name it: delta_table('/path/or/uri', version=N))")
    if source.version is None:
        raise LookupError(f"data.delta_table {source.table!r} has no pinned version in this trial's config (the"
                          " gateway pins it at submission; was this experiment submitted to an older Kiln?)")
    if version is not None and version != source.version:
        raise ValueError(f"version {version}: this trial reads version {source.version} of {source.table!r}, pinned"
                         " at submission")
    location = schema.locate(source.table)
    if location.kind == "local":
        from deltalake import DeltaTable

        return DeltaData(DeltaTable(location.path, version=source.version), source.table, source.version)
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    return DeltaData(_mirrored(location, source.version, root / schema.cache_name(location)), source.table,
                     source.version)


def _cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "kiln-data"


class DeltaData:
    """One version of a Delta table: as pyarrow (a table, record batches) or torch tensors."""

    def __init__(self, table: DeltaTable, uri: str, version: int) -> None:
        self.delta = table  # the deltalake.DeltaTable, for anything not covered here
        self.uri = uri
        self.version = version

    def __repr__(self) -> str:
        return f"DeltaData({self.uri!r}, version={self.version})"

    @property
    def num_rows(self) -> int:
        """Rows in this version (from the log's file statistics when they have them, else by reading)."""
        return int(self.delta.count())

    def to_pyarrow(self, columns: list[str] | None = None) -> pa.Table:
        """The whole version as one ``pyarrow.Table``."""
        return self.delta.to_pyarrow_table(columns=columns)

    def to_batches(self, batch_size: int = 65_536, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The version as ``pyarrow.RecordBatch`` es of at most ``batch_size`` rows, file by file."""
        dataset = self.delta.to_pyarrow_dataset()
        yield from dataset.to_batches(columns=columns, batch_size=batch_size)

    def to_torch(self, columns: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Every row, one tensor per column: numbers and booleans 1-D, fixed-length lists of numbers 2-D. Other
        types (strings, structs) are refused naming the column: select the numeric ones with ``columns``."""
        return _tensors(self.to_pyarrow(columns))

    def torch_batches(self, batch_size: int, columns: list[str] | None = None, *, shuffle: bool = False,
                      seed: int = 0, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Mini-batches of tensors (see ``to_torch``); ``shuffle`` permutes rows with a generator seeded by
        ``seed`` (pass the epoch, or the trial's seed plus the epoch, for a new order each epoch)."""
        import torch

        tensors = self.to_torch(columns)
        rows = len(next(iter(tensors.values()))) if tensors else 0
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(rows)
        stop = rows - rows % batch_size if drop_last else rows
        for start in range(0, stop, batch_size):
            index = order[start:start + batch_size]
            yield {name: t[index] for name, t in tensors.items()}

    def torch_dataset(self, columns: list[str] | None = None) -> torch.utils.data.Dataset[dict[str, torch.Tensor]]:
        """A map-style ``torch.utils.data.Dataset`` of rows (dicts of tensors), for a ``DataLoader``."""
        from torch.utils.data import Dataset

        tensors = self.to_torch(columns)

        class _Rows(Dataset[dict[str, Any]]):
            def __len__(self) -> int:
                return len(next(iter(tensors.values()))) if tensors else 0

            def __getitem__(self, i: int) -> dict[str, Any]:
                return {name: t[i] for name, t in tensors.items()}

        return _Rows()


def _tensors(table: pa.Table) -> dict[str, torch.Tensor]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        kind = column.type
        if column.null_count:
            raise ValueError(f"column {name!r} has {column.null_count} nulls: tensors cannot hold them")
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            out[name] = torch.from_numpy(np.ascontiguousarray(column.to_numpy()))
            continue
        if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
            values = pa.concat_arrays([c.flatten() for c in column.chunks]) if column.num_chunks else pa.array([])
            width = len(values) // max(len(column), 1)
            inner = kind.value_type
            numeric = pa.types.is_integer(inner) or pa.types.is_floating(inner) or pa.types.is_boolean(inner)
            lengths = pc.list_value_length(column).to_numpy() if not pa.types.is_fixed_size_list(kind) \
                else None
            if numeric and (lengths is None or (lengths == width).all()):
                array = np.ascontiguousarray(values.to_numpy(zero_copy_only=False)).reshape(len(column), width)
                out[name] = torch.from_numpy(array)
                continue
        raise TypeError(f"column {name!r} of type {kind} has no tensor form: pick numeric columns with columns=[...]")
    return out


# -- a table in the store: copied through the worker's presigned URLs ------------------------------------------------


def _mirrored(location: schema.TableLocation, version: int, root: Path) -> DeltaTable:
    """The table at ``version``, from a local copy of what that version needs (made through the worker link)."""
    from deltalake import DeltaTable

    from kiln._info import wire_cluster_info
    from kiln.core._bus import TrialBus

    wire = wire_cluster_info()
    assert wire is not None  # only trials reach here
    link = TrialBus(wire.link_path, wire.trial.experiment_id, wire.trial.trial_id, wire.allocation_id)
    copier = _Copier(link, location, root.resolve())
    try:
        log_prefix = f"{location.prefix}/_delta_log/"
        names = [k[len(log_prefix):] for k in link.list_keys(log_prefix, location.bucket) if k.startswith(log_prefix)]
        needed = schema.log_files_for(names, version)
        if not needed:
            raise FileNotFoundError(f"{location.uri}: no Delta log for version {version} in the store")
        for name in needed:
            copier.fetch(f"_delta_log/{name}")
        table = DeltaTable(str(copier.root), version=version)
        for uri in table.file_uris():
            copier.fetch(copier.relative(uri))
        if "deletionVectors" in (table.protocol().reader_features or []):
            # Deletion vectors sit beside the data files; they are small: copy every one.
            for key in link.list_keys(f"{location.prefix}/", location.bucket):
                rel = key[len(location.prefix) + 1:]
                if Path(rel).name.startswith("deletion_vector_") and not rel.startswith("_delta_log/"):
                    copier.fetch(rel)
        return DeltaTable(str(copier.root), version=version)
    finally:
        link.close()
        copier.close()


class _Copier:
    """Copies objects of one table into ``root`` (same relative paths), each once: files of a Delta table never
    change once written, so a file already there is the right one."""

    def __init__(self, link: TrialBus, location: schema.TableLocation, root: Path) -> None:
        import httpx

        self.link = link
        self.location = location
        self.root = root
        # trust_env off: the store is the worker's, reached directly (no proxy from the environment).
        self.http = httpx.Client(trust_env=False, timeout=httpx.Timeout(60.0, connect=10.0))
        (root / "_delta_log").mkdir(parents=True, exist_ok=True)

    def relative(self, uri: str) -> str:
        """The path of a data file (as delta-rs names it in the copy) relative to the table."""
        path = Path(uri.removeprefix("file://")).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"{self.location.uri}: data file {uri!r} lies outside the table (absolute paths in the"
                             " log are not supported)")
        return path.relative_to(self.root).as_posix()

    def fetch(self, rel: str) -> None:
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.root):
            raise ValueError(f"{self.location.uri}: {rel!r} escapes the table")
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        url = self.link.presign("GET", f"{self.location.prefix}/{rel}", self.location.bucket)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as fh, self.http.stream("GET", url) as resp:
                if resp.status_code >= 300:
                    resp.read()
                    raise OSError(f"{self.location.uri}: GET {rel} failed: HTTP {resp.status_code}"
                                  f" {resp.text[:300]}")
                for chunk in resp.iter_bytes(_CHUNK):
                    fh.write(chunk)
            os.replace(tmp, target)  # atomic: another rank copying the same file meanwhile is harmless
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        self.http.close()
