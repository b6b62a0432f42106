"""The Core API, in Determined's shape: ``with kiln.core.init() as core_context: ...``.

On a cluster the context reports through its worker (a local socket, ``kiln.core._bus``) and stores
checkpoints in the configured storage. Outside one (no ``KILN_CLUSTER_INFO``), ``init()`` returns a local
context: metrics are logged, checkpoints go to ``./checkpoints``, ``should_preempt()`` is False, so the same
script runs on a laptop.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
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
from schemas import events as ev
from schemas.trial import INVALID_HP_EXIT_CODE, checkpoint_prefix

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
    """Determined's TensorBoard upload modes. Kiln has no TensorBoard upload yet: both are accepted."""

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

    def __init__(self, reporter: Any, experiment_id: int, trial_id: int, is_chief: bool) -> None:
        self._reporter = reporter
        self._experiment_id = experiment_id
        self._trial_id = trial_id
        self._is_chief = is_chief

    def report_training_metrics(self, steps_completed: int, metrics: dict[str, Any],
                                batch_metrics: Any = None) -> None:
        """Report training metrics at ``steps_completed`` (batched; never blocks on the network)."""
        if not self._is_chief:
            return
        self._reporter.add_point(ev.MetricPoint(steps_completed=int(steps_completed), metrics=_clean(metrics),
                                                reported_at=time.time()))

    def report_validation_metrics(self, steps_completed: int, metrics: dict[str, Any]) -> None:
        """Report validation metrics; the searcher decides on these."""
        if not self._is_chief:
            return
        self._reporter.flush()  # training points first, so the read side sees them in order
        self._reporter.publish(ev.ValidationReported(
            experiment_id=self._experiment_id, trial_id=self._trial_id, steps_completed=int(steps_completed),
            metrics=_clean(metrics), reported_at=time.time()))

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
                 reporter: Any) -> None:
        self.train = train
        self.checkpoint = checkpoint
        self.preempt = preempt
        self.distributed = distributed
        self.searcher = searcher
        self.info = info
        self._reporter = reporter

    def __enter__(self) -> Context:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()
        if isinstance(exc, InvalidHP):
            log.error("invalid hyperparameters: %s", exc)
            os._exit(INVALID_HP_EXIT_CODE)

    def close(self) -> None:
        """Flush every buffered report and disconnect."""
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
    if _mode(tensorboard_mode, TensorboardMode, "tensorboard_mode") is TensorboardMode.AUTO:
        log.debug("tensorboard_mode AUTO: Kiln does not upload TensorBoard files yet")
    wire = wire_cluster_info()
    preempt = PreemptContext(dist, mode)
    if wire is None:
        reporter: Any = _Reporter()
        storage: Storage = _storage_arg(checkpoint_storage if checkpoint_storage is not None else "checkpoints")
        train = TrainContext(reporter, 0, 0, dist.rank == 0)
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

    def stored(storage_id: str, steps: int, resources: dict[str, int], metadata: dict[str, Any]) -> None:
        reporter.publish(ev.CheckpointStored(
            experiment_id=trial.experiment_id, trial_id=trial.trial_id, uuid=storage_id, steps_completed=steps,
            storage=storage.location(), resources=resources, metadata=metadata, reported_at=time.time()))

    train = TrainContext(reporter, trial.experiment_id, trial.trial_id, dist.rank == 0)
    ckpt = CheckpointContext(storage, stored, dist.rank == 0, dist)
    return Context(train=train, checkpoint=ckpt, preempt=preempt, distributed=dist,
                   searcher=SearcherContext(train, trial.max_length), info=get_cluster_info(), reporter=reporter)


def _stop_on_sigterm(preempt: PreemptContext) -> None:
    """The worker's polite kill (SIGTERM) becomes a preemption request the script can act on."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        preempt._request("the platform asked the trial to stop")

    signal.signal(signal.SIGTERM, handler)
