"""A trial's TensorBoard files, kept the way Determined's Core API keeps them (``tensorboard_mode``).

Every process has a TensorBoard directory, ``core_context.train.get_tensorboard_path()``; training code may write
there (a ``SummaryWriter``, profiler traces...). On a cluster the chief uploads that directory's new and grown
files to the cluster's store, under its own trial's prefix (``schemas.trial.tensorboard_prefix``), through
presigned URLs its worker grants for that prefix only; other ranks upload nothing.

``AUTO`` (the default): Kiln itself writes every training and validation metric the chief reports as a scalar
(``training/<name>``, ``validation/<name>``; a dict or list of numbers, such as per-class accuracy, as one series
per item, ``validation/<name>/<key>``), with TensorBoard's own event writer, and uploads the directory after each
validation report, after each checkpoint, after a training report when the last upload is ``SYNC_SECONDS`` old,
and when the context closes (also after an exception). So once ``report_validation_metrics`` or a checkpoint
returns, what was written before it is in the store; a process killed outright (SIGKILL, out of memory) loses
at most the training scalars and user-written bytes of the last ``SYNC_SECONDS`` (its metrics themselves are
in Kiln's metric store either way). ``MANUAL``: Kiln writes nothing and uploads only when the script calls
``upload_tensorboard_files()``.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("kiln.core")

# After a training report, upload when the last upload is this old (validations and checkpoints always upload).
SYNC_SECONDS = 30.0
# Kiln's own event file is closed and a new one started once it is this big: a grown file is uploaded whole
# again, so this bounds what each upload resends.
ROLL_BYTES = 1 << 20
# Series one metric may expand into (a dict or list of numbers), and how deep it is followed.
MAX_SERIES = 1000
MAX_DEPTH = 4

# Uploads ``path`` (exactly ``size`` bytes of it) as ``rel`` under the trial's prefix; raises when it cannot.
Uploader = Callable[[Path, str, int], None]
Selector = Callable[[Path], bool]
Mangler = Callable[[Path, int], Path]


def scalar_series(name: str, value: Any) -> list[tuple[str, float]]:
    """The scalars a metric's value stands for: a number is one series named ``name``; a dict, list, tuple,
    array or tensor of numbers one series per item (``name/<key>``, ``name/<index>``); text and None none."""
    out: list[tuple[str, float]] = []
    _flatten(name, value, out, 0)
    return out


def _flatten(name: str, value: Any, out: list[tuple[str, float]], depth: int) -> None:
    if len(out) >= MAX_SERIES or depth > MAX_DEPTH:
        return
    if isinstance(value, (bool, int, float)):
        out.append((name, float(value)))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{name}/{key}", item, out, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _flatten(f"{name}/{i}", item, out, depth + 1)
    elif callable(getattr(value, "tolist", None)):  # numpy scalars and arrays, torch tensors
        try:
            plain = value.tolist()
        except (TypeError, ValueError, RuntimeError):
            return
        if not hasattr(plain, "tolist"):
            _flatten(name, plain, out, depth)


class TensorboardFiles:
    """One process's TensorBoard directory and, on the chief of a cluster run, its uploads."""

    def __init__(self, path: Path, upload: Uploader | None, *, auto: bool, rank: int = 0, owned: bool = False,
                 sync_s: float = SYNC_SECONDS, roll_bytes: int = ROLL_BYTES) -> None:
        self._path = path
        self._upload = upload
        # Kiln writes scalars only where they will be uploaded: the chief of a cluster run, in AUTO mode.
        self.auto = auto
        self._writes = auto and upload is not None
        self._rank = rank
        self._owned = owned  # a directory Kiln made for this process: removed when the context closes
        self._sync_s = sync_s
        self._roll_bytes = roll_bytes
        self._uploaded: dict[str, int] = {}  # key under the trial's prefix -> size uploaded
        self._failed: set[str] = set()  # keys whose failure was logged (each once)
        self._writer: Any = None
        self._writer_file: Path | None = None
        self._last_sync = time.monotonic()
        self._lock = threading.RLock()
        self._closed = False

    @property
    def path(self) -> Path:
        """The directory (created on first use)."""
        self._path.mkdir(parents=True, exist_ok=True)
        return self._path

    def write_metrics(self, group: str, steps_completed: int, metrics: Mapping[str, Any]) -> None:
        """AUTO, chief of a cluster run: write the metrics as scalars at ``steps_completed`` (else nothing)."""
        if not self._writes or self._closed:
            return
        points = [(f"{group}/{tag}", number) for name, value in metrics.items()
                  for tag, number in scalar_series(str(name), value)]
        if not points:
            return
        with self._lock:
            writer = self._open_writer()
            wall_time = time.time()
            for tag, number in points:
                writer.add_scalar(tag, number, int(steps_completed), wall_time=wall_time)

    def _open_writer(self) -> Any:
        if self._writer is None:
            from tensorboard.summary import Writer  # imported here: training code that never reports pays nothing

            before = set(self._files())
            self._writer = Writer(str(self.path))
            created = [p for p in self._files() if p not in before]  # the writer makes its file at once
            self._writer_file = created[0] if len(created) == 1 else None
        return self._writer

    def _files(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.is_file())

    def sync_if_due(self) -> None:
        """AUTO: upload when the last upload is ``sync_s`` old."""
        if self._writes and time.monotonic() - self._last_sync >= self._sync_s:
            self.sync()

    def sync(self, selector: Selector | None = None, mangler: Mangler | None = None) -> list[str]:
        """Upload the files that are new or grew since they were last uploaded; return their keys.

        ``selector(path)`` picks files (default all), ``mangler(relative path, rank)`` renames them in the store
        (Determined's arguments). A file that fails is logged once and tried again at the next sync; training
        goes on either way.
        """
        if self._upload is None:
            return []
        with self._lock:
            if self._writer is not None:
                self._writer.flush()
            done: list[str] = []
            for file in self._files():
                if selector is not None and not selector(file):
                    continue
                rel = file.relative_to(self.path)
                key = (mangler(rel, self._rank) if mangler is not None else rel).as_posix()
                try:
                    size = file.stat().st_size
                except OSError:  # removed meanwhile by the code that wrote it
                    continue
                if self._uploaded.get(key) == size:
                    continue
                try:
                    self._upload(file, key, size)
                except Exception as exc:  # noqa: BLE001 - TensorBoard files never stop training
                    if key not in self._failed:
                        self._failed.add(key)
                        log.error("TensorBoard file %s not uploaded (tried again at the next upload): %s", key, exc)
                    continue
                self._uploaded[key] = size
                self._failed.discard(key)
                done.append(key)
            self._last_sync = time.monotonic()
            self._roll()
            return done

    def _roll(self) -> None:
        """Close Kiln's event file once it is big (it was just uploaded); the next scalar starts a new one."""
        file = self._writer_file
        if self._writer is not None and file is not None and file.exists() and file.stat().st_size >= self._roll_bytes:
            self._writer.close()
            self._writer = None
            self._writer_file = None

    def close(self) -> None:
        """AUTO: the last upload. Then close Kiln's writer and remove a directory Kiln made."""
        with self._lock:
            if self._closed:
                return
            if self.auto:
                self.sync()
            self._closed = True
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._owned:
                shutil.rmtree(self._path, ignore_errors=True)
