"""The Core API, in Determined's shape: ``with kiln.core.init() as core_context: ...``.

On a cluster the context reports through its worker (a local socket, ``kiln.core._bus``), stores
checkpoints in the configured storage and uploads the trial's TensorBoard files (``kiln.core._tensorboard``).
Outside one (no ``KILN_CLUSTER_INFO``), ``init()`` returns a local
context: metrics are logged, checkpoints go to ``./checkpoints``, ``should_preempt()`` is False, so the same
script runs on a laptop.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kiln._info import ClusterInfo, get_cluster_info, wire_cluster_info
from kiln.core._checkpoint import (
    CheckpointContext,
    LinkedS3Storage,
    Presigner,
    S3Storage,
    SharedFSStorage,
    Storage,
    WithSources,
)
from kiln.core._distributed import DistributedContext
from kiln.core._tensorboard import TensorboardFiles
from schemas import events as ev
from schemas.checkpoint import CheckpointManifest
from schemas.trial import INVALID_HP_EXIT_CODE, TENSORBOARD, checkpoint_prefix

log = logging.getLogger("kiln.core")

__all__ = [
    "CheckpointContext",
    "Context",
    "DistributedContext",
    "InvalidHP",
    "PreemptContext",
    "PreemptMode",
    "SearcherContext",
    "TensorboardMode",
    "TrainContext",
    "init",
]


class InvalidHP(Exception):
    """Raise from training code to say these hyperparameters cannot work; the searcher replaces the trial."""


class PreemptMode(enum.Enum):
    """How ranks learn of a stop request (Determined's names).

    ``WorkersAskChief``: every rank calls ``should_preempt()`` at the same points and gets the chief's answer
    (a collective). ``ChiefOnly``: only the chief asks (no collective); the other ranks always hear False.
    """

    WorkersAskChief = "WORKERS_ASK_CHIEF"
    ChiefOnly = "CHIEF_ONLY"


class TensorboardMode(enum.Enum):
    """Determined's TensorBoard modes (``kiln.core._tensorboard``).

    ``AUTO``: Kiln writes the reported metrics as scalars and uploads the TensorBoard directory at each
    validation, checkpoint and close. ``MANUAL``: Kiln writes nothing and uploads only on
    ``upload_tensorboard_files()``.
    """

    AUTO = "AUTO"
    MANUAL = "MANUAL"


def _json_metric(value: Any) -> ev.MetricValue:
    """Metrics as JSON-safe scalars: NaN/inf become strings, tensors and numpy scalars numbers."""
    kind = type(value)
    if kind is int or (kind is float and math.isfinite(value)):  # the common case, first
        return value  # type: ignore[no-any-return]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return value
    return str(value)


def _clean(metrics: dict[str, Any]) -> dict[str, ev.MetricValue]:
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of name -> value, got {type(metrics).__name__}")
    out: dict[str, ev.MetricValue] = {}
    for k, v in metrics.items():
        kind = type(v)
        # Finite floats and ints as they are, without a call (v - v is NaN for NaN and inf): once per
        # metric per step, this is the hot path of training code.
        out[k if type(k) is str else str(k)] = v if (kind is float and v - v == 0.0) or kind is int else _json_metric(v)
    return out


class _Reporter:
    """Where a context's reports go: the bus on a cluster, the log locally."""

    def publish(self, event: Any) -> None:
        log.info("%s", event)

    def add_point(self, point: ev.MetricPoint) -> None:
        log.info("training metrics at step %d: %s", point.steps_completed, point.metrics)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TrainContext:
    """``core_context.train``: report training and validation metrics and progress."""

    def __init__(self, reporter: Any, experiment_id: int, trial_id: int, is_chief: bool,
                 tensorboard: TensorboardFiles | None = None) -> None:
        self._reporter = reporter
        self._experiment_id = experiment_id
        self._trial_id = trial_id
        self._is_chief = is_chief
        self._tensorboard = tensorboard or TensorboardFiles(Path("tensorboard").resolve(), None, auto=True)

    def report_training_metrics(self, steps_completed: int, metrics: dict[str, Any],
                                batch_metrics: Any = None) -> None:
        """Report training metrics at ``steps_completed`` (batched; never blocks on the network)."""
        if not self._is_chief:
            return
        self._reporter.add_point(ev.MetricPoint(steps_completed=int(steps_completed), metrics=_clean(metrics),
                                                reported_at=time.time()))
        self._tensorboard.write_metrics("training", int(steps_completed), metrics)
        self._tensorboard.sync_if_due()

    def report_validation_metrics(self, steps_completed: int, metrics: dict[str, Any]) -> None:
        """Report validation metrics; the searcher decides on these."""
        if not self._is_chief:
            return
        self._reporter.flush()  # training points first, so the read side sees them in order
        self._reporter.publish(ev.ValidationReported(
            experiment_id=self._experiment_id, trial_id=self._trial_id, steps_completed=int(steps_completed),
            metrics=_clean(metrics), reported_at=time.time()))
        # Before returning: a validation the script saw reported is in the store's TensorBoard files too.
        self._tensorboard.write_metrics("validation", int(steps_completed), metrics)
        self._tensorboard.sync()

    def get_tensorboard_path(self) -> Path:
        """This process's TensorBoard directory: what training code writes there is uploaded with the trial
        (by the chief; in MANUAL mode on ``upload_tensorboard_files()``)."""
        return self._tensorboard.path

    def upload_tensorboard_files(self, selector: Callable[[Path], bool] = lambda _: True,
                                 mangler: Callable[[Path, int], Path] = lambda p, _: p) -> None:
        """MANUAL mode: upload the TensorBoard directory's new and grown files now (``selector(path)`` picks
        them, ``mangler(relative path, rank)`` names them in the store). Only the chief uploads."""
        if self._tensorboard.auto:
            raise RuntimeError("upload_tensorboard_files can only be used with tensorboard_mode=MANUAL "
                               "(in AUTO mode Kiln uploads the TensorBoard directory itself)")
        if not self._is_chief:
            log.debug("upload_tensorboard_files on a non-chief rank: only the chief uploads")
            return
        self._tensorboard.sync(selector, mangler)

    def report_metrics(self, group: str, steps_completed: int, metrics: dict[str, Any]) -> None:
        """Determined's generic form: ``group`` is ``training`` or ``validation``."""
        if group == "validation":
            self.report_validation_metrics(steps_completed, metrics)
        elif group == "training":
            self.report_training_metrics(steps_completed, metrics)
        else:
            raise ValueError(f"metric group {group!r} is not supported (training, validation)")

    def report_progress(self, progress: float) -> None:
        """Report how far (0..1) the trial is through its work."""
        if not self._is_chief:
            return
        if not 0.0 <= float(progress) <= 1.0:
            raise ValueError(f"progress must be within [0, 1], got {progress}")
        self._reporter.publish(ev.TrialProgressReported(experiment_id=self._experiment_id, trial_id=self._trial_id,
                                                        progress=float(progress)))

    def set_status(self, status: str) -> None:
        """Accepted for compatibility; Kiln shows status through the trial's state and logs."""
        log.info("status: %s", status)


class PreemptContext:
    """``core_context.preempt``: has the platform asked this trial to stop?

    Only the chief hears stop requests (from its worker); with several processes every rank calls
    ``should_preempt()`` at the same point and gets the chief's answer (Determined's "workers ask chief"),
    so all ranks stop together.
    """

    def __init__(self, distributed: DistributedContext | None = None,
                 mode: PreemptMode = PreemptMode.WorkersAskChief) -> None:
        self._flag = threading.Event()
        self._dist = distributed
        self.mode = mode
        self.reason = ""

    def _request(self, reason: str) -> None:
        self.reason = reason
        self._flag.set()

    def should_preempt(self, auto_ack: bool = True) -> bool:
        """True once the searcher stopped the trial or the platform wants its slots back."""
        if self._dist is not None and self._dist.size > 1:
            if self.mode is PreemptMode.ChiefOnly:
                return self._dist.rank == 0 and self._flag.is_set()
            return bool(self._dist.broadcast(self._flag.is_set()))
        return self._flag.is_set()

    def acknowledge_preemption_signal(self) -> None:
        """Accepted for compatibility; exiting after a checkpoint is the acknowledgement."""


class SearcherOperation:
    """One unit of searcher work: train until ``length``, then report."""

    def __init__(self, ctx: SearcherContext, length: int) -> None:
        self._ctx = ctx
        self.length = length

    def report_progress(self, length: float) -> None:
        """Report progress in the searcher's units."""
        if self.length:
            self._ctx._train.report_progress(min(1.0, float(length) / self.length))

    def report_completed(self, searcher_metric: Any) -> None:
        """Accepted for compatibility: validation metrics already carry the searcher metric."""


class SearcherContext:
    """``core_context.searcher``: the trial's target length (in the searcher's time metric)."""

    def __init__(self, train: TrainContext, max_length: int | None) -> None:
        self._train = train
        self.max_length = max_length

    def operations(self) -> Iterator[SearcherOperation]:
        """Determined's legacy loop: one operation, train to ``max_length``."""
        yield SearcherOperation(self, self.max_length or 0)


class Context:
    """What ``kiln.core.init()`` returns; use it as a context manager."""

    def __init__(self, *, train: TrainContext, checkpoint: CheckpointContext, preempt: PreemptContext,
                 distributed: DistributedContext, searcher: SearcherContext, info: ClusterInfo | None,
                 reporter: Any, tensorboard: TensorboardFiles | None = None) -> None:
        self.train = train
        self.checkpoint = checkpoint
        self.preempt = preempt
        self.distributed = distributed
        self.searcher = searcher
        self.info = info
        self._reporter = reporter
        self._tensorboard = tensorboard

    def __enter__(self) -> Context:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()
        if isinstance(exc, InvalidHP):
            log.error("invalid hyperparameters: %s", exc)
            os._exit(INVALID_HP_EXIT_CODE)

    def close(self) -> None:
        """Upload the TensorBoard files (AUTO), flush every buffered report and disconnect."""
        if self._tensorboard is not None:
            try:
                self._tensorboard.close()  # first: it uploads through the worker link the reporter holds
            except Exception as exc:  # noqa: BLE001 - the reports must still be flushed
                log.error("TensorBoard files not uploaded at close: %s", exc)
        self._reporter.close()
        self.distributed.close()


def _storage_for(config: dict[str, Any], wire: Any, presigner: Any) -> Storage:
    """The checkpoint storage the experiment config names, else the cluster's store (through the worker); a
    fine-tune's source checkpoints are read from the cluster's store either way."""
    from schemas import config as schema  # only on a cluster: the typed config every service reads

    linked = LinkedS3Storage(presigner, wire.s3_bucket, checkpoint_prefix(wire.trial.experiment_id),
                             wire.checkpoint_prefixes)
    own: Storage | None = None
    match schema.config_from_wire(config).checkpoint_storage:
        case schema.SharedFSStorage() as fs:
            own = SharedFSStorage(Path(fs.host_path) / (fs.storage_path or ""))
        case schema.S3Storage() as s3 if s3.access_key or s3.endpoint_url or s3.bucket != wire.s3_bucket:
            # The user's own bucket, with the key the config gives (the trial never gets the cluster's key).
            endpoint = (s3.endpoint_url or wire.s3_endpoint).removeprefix("http://").removeprefix("https://")
            own = S3Storage(endpoint, s3.access_key or "", s3.secret_key or "", s3.bucket, s3.prefix,
                            secure=(s3.endpoint_url or "").startswith("https://"))
        case schema.S3Storage() as s3 if s3.prefix:
            log.warning("checkpoint_storage.prefix %r is not used in the cluster's bucket: checkpoints go under %s/",
                        s3.prefix, checkpoint_prefix(wire.trial.experiment_id))
    if own is None:
        return linked
    return WithSources(own, linked) if wire.checkpoint_prefixes else own


def _storage_arg(arg: str | os.PathLike[str] | dict[str, Any]) -> Storage:
    """``init(checkpoint_storage=)``: a directory, or a storage config as in the experiment YAML."""
    if not isinstance(arg, dict):
        return SharedFSStorage(Path(arg).resolve())
    kind = arg.get("type")
    if kind == "shared_fs" and arg.get("host_path"):
        return SharedFSStorage((Path(arg["host_path"]) / (arg.get("storage_path") or "")).resolve())
    if kind == "s3" and arg.get("bucket"):
        endpoint = str(arg.get("endpoint_url") or "")
        return S3Storage(endpoint.removeprefix("http://").removeprefix("https://"), arg.get("access_key") or "",
                         arg.get("secret_key") or "", arg["bucket"], arg.get("prefix") or "",
                         secure=endpoint.startswith("https://"))
    raise ValueError(f"checkpoint_storage {arg!r}: expected a directory, {{type: shared_fs, host_path: ...}} or "
                     "{type: s3, bucket: ..., endpoint_url: ...}")


def _mode(value: Any, kind: type[enum.Enum], name: str) -> Any:
    """An enum member from a member, its value or its name (Determined's scripts pass either)."""
    if isinstance(value, kind):
        return value
    for member in kind:
        if value in (member.value, member.name):
            return member
    raise ValueError(f"{name}={value!r}: expected one of {', '.join(m.name for m in kind)}")


def init(*, distributed: DistributedContext | None = None,
         checkpoint_storage: str | os.PathLike[str] | dict[str, Any] | None = None,
         preempt_mode: PreemptMode | str = PreemptMode.WorkersAskChief,
         tensorboard_mode: TensorboardMode | str = TensorboardMode.AUTO) -> Context:
    """The Core API context: on a cluster it reports to Kiln, elsewhere it runs locally.

    Determined's arguments: ``distributed`` (default: the layout the launcher put in the environment),
    ``checkpoint_storage`` (a directory or a storage config; on a cluster it replaces the experiment's),
    ``preempt_mode`` and ``tensorboard_mode``. Any other argument is a TypeError.
    """
    dist = distributed or DistributedContext.from_env()
    mode: PreemptMode = _mode(preempt_mode, PreemptMode, "preempt_mode")
    auto = _mode(tensorboard_mode, TensorboardMode, "tensorboard_mode") is TensorboardMode.AUTO
    wire = wire_cluster_info()
    preempt = PreemptContext(dist, mode)
    if wire is None:
        reporter: Any = _Reporter()
        storage: Storage = _storage_arg(checkpoint_storage if checkpoint_storage is not None else "checkpoints")
        # Locally nothing is uploaded and Kiln writes no scalars (as Determined's local context); what the
        # script writes to get_tensorboard_path() stays in ./tensorboard.
        train = TrainContext(reporter, 0, 0, dist.rank == 0,
                             TensorboardFiles(Path("tensorboard").resolve(), None, auto=auto, rank=dist.rank))
        ckpt = CheckpointContext(storage, lambda *a: log.info("checkpoint stored: %s", a[0]), dist.rank == 0, dist)
        return Context(train=train, checkpoint=ckpt, preempt=preempt, distributed=dist,
                       searcher=SearcherContext(train, None), info=None, reporter=reporter)

    from kiln.core._bus import TrialBus  # only on a cluster

    trial = wire.trial
    # The chief reports through its worker's link (no bus credential in the trial); other ranks report
    # nothing and hear stop requests from the chief (PreemptContext).
    reporter = TrialBus(wire.link_path, trial.experiment_id, trial.trial_id,
                        wire.allocation_id) if dist.rank == 0 else _Reporter()
    links: list[Presigner] = [reporter] if dist.rank == 0 else []

    def presigner() -> Presigner:
        # Other ranks open their own link to the worker only if they restore a checkpoint.
        if not links:
            links.append(TrialBus(wire.link_path, trial.experiment_id, trial.trial_id, wire.allocation_id))
        return links[0]

    storage = _storage_for(trial.config, wire, presigner) if checkpoint_storage is None \
        else _storage_arg(checkpoint_storage)
    if dist.rank == 0:
        reporter.watch_stop(preempt._request)
    _stop_on_sigterm(preempt)

    tensorboard = _cluster_tensorboard(wire, presigner, dist.rank, auto)

    def stored(storage_id: str, steps: int, manifest: CheckpointManifest, metadata: dict[str, Any]) -> None:
        reporter.publish(ev.CheckpointStored(
            experiment_id=trial.experiment_id, trial_id=trial.trial_id, uuid=storage_id, steps_completed=steps,
            storage=storage.location(), resources={rel: f.size for rel, f in manifest.files.items()},
            metadata=metadata, reported_at=time.time(), files=manifest.files, framework=manifest.framework))
        if auto:
            tensorboard.sync()  # a checkpoint is a point to resume from: the board is uploaded up to it

    train = TrainContext(reporter, trial.experiment_id, trial.trial_id, dist.rank == 0, tensorboard)
    ckpt = CheckpointContext(storage, stored, dist.rank == 0, dist)
    return Context(train=train, checkpoint=ckpt, preempt=preempt, distributed=dist,
                   searcher=SearcherContext(train, trial.max_length), info=get_cluster_info(), reporter=reporter,
                   tensorboard=tensorboard)


def _cluster_tensorboard(wire: Any, presigner: Callable[[], Presigner], rank: int, auto: bool) -> TensorboardFiles:
    """This process's TensorBoard directory (private, removed at close); the chief uploads it to the cluster's
    store under its trial's prefix, whatever the checkpoint storage (``kiln tensorboard`` reads it there)."""
    trial = wire.trial
    path = Path(tempfile.mkdtemp(prefix=f"kiln-tensorboard-{wire.allocation_id}-{rank}-"))
    if rank != 0:
        return TensorboardFiles(path, None, auto=auto, rank=rank, owned=True)
    # tensorboard/<experiment>/<trial>/<rel>: the trial id is the "storage id" under the experiment's prefix.
    store = LinkedS3Storage(presigner, wire.s3_bucket, f"{TENSORBOARD}/{trial.experiment_id}")

    def upload(file: Path, rel: str, size: int) -> None:
        store.upload_file(file, str(trial.trial_id), rel, size, f"upload of TensorBoard file {rel}")

    return TensorboardFiles(path, upload, auto=auto, rank=rank, owned=True)


def _stop_on_sigterm(preempt: PreemptContext) -> None:
    """The worker's polite kill (SIGTERM) becomes a preemption request the script can act on."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        preempt._request("the platform asked the trial to stop")

    signal.signal(signal.SIGTERM, handler)
