"""Determined's Python SDK in its own shape, over Kiln's gateway: ``from kiln.experimental import client``.

Scripts written for ``determined.experimental.client`` keep working::

    from kiln.experimental import client

    client.login()  # or login(master=..., user=..., password=...)
    exp = client.create_experiment(config="const.yaml", model_dir=".")
    state = exp.wait()  # ExperimentState.COMPLETED
    path = exp.top_checkpoint().download()

Every call goes to the gateway's REST API through ``kiln.client.Client``; nothing here touches the bus or
the store. Without ``login()`` the first call signs in as the CLI does (``KILN_MASTER``, ``KILN_TOKEN``, else
the token ``kiln user login`` stored). Determined's reference: its ``experimental/client.py`` and the
``Experiment``, ``Trial``, ``Checkpoint``, ``Model`` and ``ModelVersion`` classes of ``common/experimental``.

The model registry::

    model = client.create_model("digits", description="the digits CNN", labels=["cnn"])
    model.register_version(exp.top_checkpoint().uuid)
    version = client.get_model("digits").get_version()  # the latest
    path = version.checkpoint.download()
"""

from __future__ import annotations

import enum
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from kiln.client import APIError, Client, master_url, stored_token

log = logging.getLogger(__name__)

__all__ = [
    "Checkpoint", "CheckpointSortBy", "CheckpointState", "Experiment", "ExperimentState", "Model", "ModelSortBy",
    "ModelVersion", "OrderBy", "Trial", "TrialState", "create_experiment", "create_model", "get_checkpoint",
    "get_experiment", "get_model", "get_trial", "list_models", "login",
]


class ExperimentState(enum.Enum):
    """An experiment's state, as Determined names them (Kiln uses those it needs)."""

    ACTIVE = "ACTIVE"
    PAUSED = "PAUSED"
    STOPPING_CANCELED = "STOPPING_CANCELED"
    STOPPING_COMPLETED = "STOPPING_COMPLETED"
    STOPPING_ERROR = "STOPPING_ERROR"
    STOPPING_KILLED = "STOPPING_KILLED"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"
    ERROR = "ERROR"
    DELETED = "DELETED"
    UNSPECIFIED = "UNSPECIFIED"

    @classmethod
    def _missing_(cls, value: object) -> ExperimentState:
        return cls.UNSPECIFIED  # a state a newer gateway added


class TrialState(enum.Enum):
    """A trial's state."""

    ACTIVE = "ACTIVE"
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    STOPPING = "STOPPING"
    STOPPING_CANCELED = "STOPPING_CANCELED"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"
    ERROR = "ERROR"
    UNSPECIFIED = "UNSPECIFIED"

    @classmethod
    def _missing_(cls, value: object) -> TrialState:
        return cls.UNSPECIFIED


class CheckpointState(enum.Enum):
    """A checkpoint's state: DELETED once retention or a user removed its files."""

    COMPLETED = "COMPLETED"
    DELETED = "DELETED"
    UNSPECIFIED = "UNSPECIFIED"

    @classmethod
    def _missing_(cls, value: object) -> CheckpointState:
        return cls.UNSPECIFIED


class CheckpointSortBy(enum.Enum):
    """What ``list_checkpoints`` sorts by (or pass a validation metric's name)."""

    UUID = "uuid"
    TRIAL_ID = "trial_id"
    BATCH_NUMBER = "steps_completed"
    END_TIME = "reported_at"
    STATE = "state"
    SEARCHER_METRIC = "searcher_metric"


class OrderBy(enum.Enum):
    """Sort direction."""

    ASC = "ASC"
    DESC = "DESC"
    ASCENDING = ASC  # Determined's aliases
    DESCENDING = DESC


_TERMINAL = (ExperimentState.COMPLETED, ExperimentState.CANCELED, ExperimentState.ERROR, ExperimentState.DELETED)
_TRIAL_TERMINAL = (TrialState.COMPLETED, TrialState.CANCELED, TrialState.ERROR)

# -- the session -----------------------------------------------------------------------------------------------

_session: Client | None = None


def login(master: str | None = None, user: str | None = None, password: str | None = None) -> None:
    """Sign in for the calls that follow (Determined's ``client.login``).

    With ``password``, signs ``user`` in (the token is kept in memory only); without it, uses ``KILN_TOKEN`` or
    the token ``kiln user login`` stored for ``master`` (``KILN_MASTER``, else the local stack).
    """
    master = (master or master_url()).rstrip("/")
    token: str | None = None
    if password is not None:
        if user is None:
            raise ValueError("login(password=...) needs user= too")
        anonymous = Client(master, token="")
        try:
            token = str(anonymous.login(user, password)["token"])
        finally:
            anonymous.close()
    elif user is not None:
        stored = stored_token(master)
        if stored is None or stored[0] != user:
            raise ValueError(f"no stored token for {user!r} at {master}: pass password=, or run"
                             f" `kiln user login {user}`")
        token = stored[1]
    _use(Client(master, token=token))


def _use(session: Client) -> None:
    """Make ``session`` the client every later call goes through (tests hand in one over a fake transport)."""
    global _session
    if _session is not None:
        _session.close()
    _session = session


def _client() -> Client:
    if _session is None:
        login()
    assert _session is not None
    return _session


def create_experiment(config: str | Path | dict[str, Any], model_dir: str | Path | None,
                      includes: list[str | Path] | None = None) -> Experiment:
    """Submit an experiment: ``config`` a dict, YAML text or a path to a YAML file; ``model_dir`` the code
    (packed as ``kiln experiment create`` packs it), with ``includes`` copied into its top level."""
    session = _client()
    text = _config_text(config)
    if model_dir is not None and not includes:
        answer = session.create_experiment(text, Path(model_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="kiln-context-") as scratch:
            context = Path(scratch) / "context"
            if model_dir is not None:
                shutil.copytree(model_dir, context, symlinks=True)
            else:
                context.mkdir()
            for item in includes or []:
                source = Path(item)
                if source.is_dir():
                    shutil.copytree(source, context / source.name, symlinks=True, dirs_exist_ok=True)
                else:
                    shutil.copy2(source, context / source.name)
            answer = session.create_experiment(text, context)
    for warning in answer.get("warnings", []):
        log.warning("experiment %s: %s", answer["id"], warning)
    # The read model shows a submission a moment after the gateway accepted it (the tracker folds the event):
    # wait for it rather than hand back an id that answers 404.
    deadline = time.monotonic() + 60.0
    while True:
        try:
            return Experiment(session, session.get_experiment(int(answer["id"])))
        except APIError as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _config_text(config: str | Path | dict[str, Any]) -> str:
    if isinstance(config, dict):
        import yaml  # only for a dict config

        return str(yaml.safe_dump(config, sort_keys=False))
    if isinstance(config, Path) or ("\n" not in config and Path(config).is_file()):
        return Path(config).read_text()
    if "\n" not in config and ":" not in config:
        raise FileNotFoundError(f"config file {config!r} not found")
    return config


def get_experiment(experiment_id: int) -> Experiment:
    """An experiment by id (its fields as the gateway has them now)."""
    session = _client()
    return Experiment(session, session.get_experiment(experiment_id))


def get_trial(trial_id: int) -> Trial:
    """A trial by id."""
    session = _client()
    return Trial(session, session.get_trial(trial_id))


def get_checkpoint(uuid: str) -> Checkpoint:
    """A checkpoint by its uuid (the storage id training code got from ``store_path``)."""
    session = _client()
    return Checkpoint(session, session.get_checkpoint(uuid))


# -- objects ---------------------------------------------------------------------------------------------------


class Checkpoint:
    """One checkpoint: its record, and ``download()`` for its files."""

    def __init__(self, session: Client, record: dict[str, Any]) -> None:
        self._session = session
        self._set(record)

    def _set(self, record: dict[str, Any]) -> None:
        self._record = record
        self.uuid: str = record["uuid"]
        self.trial_id: int = record["trial_id"]
        self.experiment_id: int = record["experiment_id"]
        self.steps_completed: int = record["steps_completed"]
        self.metadata: dict[str, Any] = record.get("metadata") or {}
        self.resources: dict[str, int] = record.get("resources") or {}
        self.state = CheckpointState(record.get("state", "COMPLETED"))
        self.storage: str = record.get("storage", "")
        self.searcher_metric: str = record.get("searcher_metric", "")
        self.searcher_metric_value: float | None = record.get("metric")
        self.report_time: datetime | None = _time(record.get("reported_at"))

    @property
    def task_id(self) -> str:
        """Determined's task of the checkpoint: here the trial's id as text."""
        return str(self.trial_id)

    def download(self, path: str | Path | None = None) -> str:
        """Download the files into ``path`` (default ``checkpoints/<uuid>``); return that directory."""
        target = Path(path) if path is not None else Path("checkpoints") / self.uuid
        self._session.download_checkpoint(self.uuid, target)
        return str(target)

    def reload(self) -> None:
        """Read the record again (its state changes when retention deletes the files)."""
        self._set(self._session.get_checkpoint(self.uuid))

    def delete(self) -> None:
        """Delete the checkpoint's files from the store."""
        self._session.delete_checkpoint(self.uuid)
        self.reload()

    def __repr__(self) -> str:
        return f"Checkpoint(uuid={self.uuid!r}, trial_id={self.trial_id}, steps_completed={self.steps_completed})"


class Trial:
    """One trial: its state and hyperparameters, its checkpoints and logs."""

    def __init__(self, session: Client, record: dict[str, Any]) -> None:
        self._session = session
        self._set(record)

    def _set(self, record: dict[str, Any]) -> None:
        self._record = record
        self.id: int = record["id"]
        self.experiment_id: int = record["experiment_id"]
        self.hparams: dict[str, Any] = record.get("hparams") or {}
        self.state = TrialState(record.get("state", "UNSPECIFIED"))
        self.steps_completed: int = record.get("steps_completed", 0)
        self.restarts: int = record.get("restarts", 0)
        self.best_metric: float | None = record.get("best_metric")
        self.latest_validation: dict[str, Any] | None = record.get("latest_validation")

    def reload(self) -> None:
        """Read the trial again."""
        self._set(self._session.get_trial(self.id))

    def kill(self) -> None:
        """Kill the trial."""
        self._session.kill_trial(self.id)

    def list_checkpoints(self, sort_by: str | CheckpointSortBy | None = None, order_by: OrderBy | None = None,
                         max_results: int | None = None) -> list[Checkpoint]:
        """The trial's checkpoints; by default best searcher metric first (as its experiment ranks them)."""
        experiment = self._session.get_experiment(self.experiment_id)
        records = self._session.trial_checkpoints(self.id)
        return _sorted(self._session, experiment, records, sort_by, order_by, max_results)

    def top_checkpoint(self, sort_by: str | None = None, smaller_is_better: bool | None = None) -> Checkpoint:
        """The trial's best checkpoint with files (by the searcher metric unless ``sort_by`` names another)."""
        experiment = self._session.get_experiment(self.experiment_id)
        records = [r for r in self._session.trial_checkpoints(self.id) if r.get("state", "COMPLETED") == "COMPLETED"]
        return _top(self._session, experiment, records, sort_by, smaller_is_better, f"trial {self.id}")

    def logs(self, follow: bool = False, head: int | None = None, tail: int | None = None,
             interval: float = 1.0) -> Iterator[str]:
        """The trial's log lines, oldest first; ``follow`` keeps reading until the trial ends."""
        if tail is not None:
            if tail > 0:
                yield from (str(line["text"]) for line in self._session.trial_logs(self.id, limit=tail, tail=True))
            return
        offset, page = 0, 1000
        while True:
            lines = self._session.trial_logs(self.id, limit=page, offset=offset)
            for line in lines:
                if head is not None and offset >= head:
                    return
                offset += 1
                yield str(line["text"])
            if len(lines) == page:
                continue
            if not follow:
                return
            if TrialState(self._session.get_trial(self.id).get("state")) in _TRIAL_TERMINAL:
                # One more read: lines shipped between the last page and the end.
                follow = False
                continue
            time.sleep(interval)

    def __repr__(self) -> str:
        return f"Trial(id={self.id}, experiment_id={self.experiment_id}, state={self.state.name})"


class Experiment:
    """One experiment: control it (kill, pause, activate), wait for it, read its trials and checkpoints."""

    def __init__(self, session: Client, record: dict[str, Any]) -> None:
        self._session = session
        self._set(record)

    def _set(self, record: dict[str, Any]) -> None:
        self._record = record
        self.id: int = record["id"]
        self.name: str = record.get("name", "")
        self.description: str = record.get("description", "")
        self.labels: list[str] = record.get("labels") or []
        self.state = ExperimentState(record.get("state", "UNSPECIFIED"))
        self.config: dict[str, Any] = record.get("config") or {}
        self.progress: float = record.get("progress", 0.0)
        self.searcher_metric: str = record.get("searcher_metric", "")
        self.smaller_is_better: bool = record.get("smaller_is_better", True)
        self.end_reason: str = record.get("end_reason", "")

    def reload(self) -> None:
        """Read the experiment again (state, progress, ...)."""
        self._set(self._session.get_experiment(self.id))

    def wait(self, interval: float = 5.0) -> ExperimentState:
        """Block until the experiment ends; return its final state (COMPLETED, CANCELED or ERROR).

        A paused experiment would never end on its own: ValueError, as in Determined.
        """
        while True:
            self.reload()
            if self.state in _TERMINAL:
                return self.state
            if self.state is ExperimentState.PAUSED:
                raise ValueError(f"experiment {self.id} is paused: activate it before waiting for it")
            time.sleep(interval)

    def kill(self) -> None:
        """Kill the experiment (its trials stop at once)."""
        self._session.kill_experiment(self.id)
        self.reload()

    def cancel(self) -> None:
        """Determined's graceful stop; Kiln stops an experiment one way, like ``kill``."""
        self.kill()

    def pause(self) -> None:
        """Pause the experiment: its trials checkpoint and give back their slots."""
        self._session.pause_experiment(self.id)
        self.reload()

    def activate(self) -> None:
        """Activate a paused experiment: its trials resume from their checkpoints."""
        self._session.activate_experiment(self.id)
        self.reload()

    def list_trials(self) -> list[Trial]:
        """The experiment's trials, in id order."""
        return [Trial(self._session, record) for record in sorted(self._session.list_trials(self.id),
                                                                   key=lambda r: int(r["id"]))]

    def get_trials(self) -> list[Trial]:
        """Determined's older name of ``list_trials``."""
        return self.list_trials()

    def list_checkpoints(self, sort_by: str | CheckpointSortBy | None = None, order_by: OrderBy | None = None,
                         max_results: int | None = None) -> list[Checkpoint]:
        """The experiment's checkpoints: by default best searcher metric first (the gateway ranks them);
        ``sort_by`` a ``CheckpointSortBy`` or a validation metric's name, with ``order_by`` (both or neither)."""
        if sort_by is None and order_by is None:
            records = self._session.experiment_checkpoints(self.id, sort_by="metric", limit=max_results or 1000)
            return [Checkpoint(self._session, r) for r in records]
        records = self._session.experiment_checkpoints(self.id, sort_by="trial")
        return _sorted(self._session, self._session.get_experiment(self.id), records, sort_by, order_by,
                       max_results)

    def top_checkpoint(self, sort_by: str | None = None, smaller_is_better: bool | None = None) -> Checkpoint:
        """The best checkpoint with files: by the searcher metric unless ``sort_by`` names another validation
        metric; ``smaller_is_better`` defaults to the searcher's."""
        experiment = self._session.get_experiment(self.id)
        metric = sort_by or experiment["searcher_metric"]
        smaller = experiment["smaller_is_better"] if smaller_is_better is None else smaller_is_better
        if metric == experiment["searcher_metric"] and smaller == experiment["smaller_is_better"]:
            best = self._session.experiment_checkpoints(self.id, sort_by="metric", state="COMPLETED", limit=1)
            if not best:
                raise LookupError(f"experiment {self.id} has no checkpoint with files")
            return Checkpoint(self._session, best[0])
        records = self._session.experiment_checkpoints(self.id, sort_by="trial", state="COMPLETED")
        return _top(self._session, experiment, records, sort_by, smaller_is_better, f"experiment {self.id}")

    def __repr__(self) -> str:
        return f"Experiment(id={self.id}, state={self.state.name})"


# -- sorting ---------------------------------------------------------------------------------------------------


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else None


def _metric_of(session: Client, experiment: dict[str, Any], metric: str) -> Callable[[dict[str, Any]], Any]:
    """Each checkpoint's value of validation ``metric`` at its step (None where none was reported there)."""
    if metric == experiment["searcher_metric"]:
        return _field("metric")
    by_trial: dict[int, dict[int, Any]] = {}  # trial -> step -> value, each trial's validations read once

    def value(record: dict[str, Any]) -> Any:
        trial_id = int(record["trial_id"])
        if trial_id not in by_trial:
            by_trial[trial_id] = {int(point["steps_completed"]): point["metrics"].get(metric)
                                  for point in session.trial_metrics(trial_id, kind="validation")}
        found = by_trial[trial_id].get(int(record["steps_completed"]))
        return found if isinstance(found, (int, float)) and not isinstance(found, bool) else None

    return value


def _field(name: str) -> Callable[[dict[str, Any]], Any]:
    def value(record: dict[str, Any]) -> Any:
        return record.get(name)

    return value


def _sorted(session: Client, experiment: dict[str, Any], records: list[dict[str, Any]],
            sort_by: str | CheckpointSortBy | None, order_by: OrderBy | None,
            max_results: int | None) -> list[Checkpoint]:
    """Checkpoints sorted as Determined's ``list_checkpoints`` sorts them; missing values last."""
    if (sort_by is None) != (order_by is None):
        raise ValueError("list_checkpoints: give both sort_by and order_by, or neither")
    if sort_by is None:  # best searcher metric first
        sort_by = CheckpointSortBy.SEARCHER_METRIC
        order_by = OrderBy.ASC if experiment["smaller_is_better"] else OrderBy.DESC
    key: Callable[[dict[str, Any]], Any]
    if isinstance(sort_by, CheckpointSortBy):
        field = "metric" if sort_by is CheckpointSortBy.SEARCHER_METRIC else sort_by.value
        key = _field(field)
    else:
        key = _metric_of(session, experiment, sort_by)
    present = [r for r in records if key(r) is not None]
    missing = [r for r in records if key(r) is None]
    present.sort(key=key, reverse=OrderBy(order_by) is OrderBy.DESC)
    ranked = present + missing
    return [Checkpoint(session, r) for r in ranked[:max_results]]


def _top(session: Client, experiment: dict[str, Any], records: list[dict[str, Any]], sort_by: str | None,
         smaller_is_better: bool | None, owner: str) -> Checkpoint:
    metric = sort_by or experiment["searcher_metric"]
    smaller = experiment["smaller_is_better"] if smaller_is_better is None else smaller_is_better
    ranked = _sorted(session, experiment, records, metric, OrderBy.ASC if smaller else OrderBy.DESC, 1)
    if not ranked:
        raise LookupError(f"{owner} has no checkpoint with files")
    return ranked[0]


# -- the model registry ----------------------------------------------------------------------------------------


class ModelSortBy(enum.Enum):
    """What ``list_models`` sorts by."""

    NAME = "name"
    DESCRIPTION = "description"
    CREATION_TIME = "created_at"
    LAST_UPDATED_TIME = "updated_at"
    NUM_VERSIONS = "num_versions"


def create_model(name: str, description: str | None = "", metadata: dict[str, Any] | None = None,
                 labels: list[str] | None = None) -> Model:
    """Add a model to the registry (Determined's ``create_model``); names are unique, the signed-in user owns it."""
    session = _client()
    return Model(session, session.create_model(name, description=description or "", labels=labels,
                                               metadata=metadata))


def get_model(identifier: str | int) -> Model:
    """A model by its name (or its id, a number)."""
    session = _client()
    return Model(session, session.get_model(identifier))


def list_models(sort_by: ModelSortBy = ModelSortBy.NAME, order_by: OrderBy = OrderBy.ASCENDING,
                name: str | None = None, description: str | None = None, model_id: int | None = None,
                labels: list[str] | None = None) -> list[Model]:
    """The registry's models, filtered (``name`` contained in the name, ``description`` in the description,
    ``labels`` all carried) and sorted as Determined's ``list_models``."""
    session = _client()
    records = session.list_models(labels=labels, name=name)
    if description is not None:
        records = [r for r in records if description.lower() in str(r.get("description", "")).lower()]
    if model_id is not None:
        records = [r for r in records if r["id"] == model_id]
    field = ModelSortBy(sort_by).value
    records.sort(key=lambda r: r[field], reverse=OrderBy(order_by) is OrderBy.DESC)
    return [Model(session, r) for r in records]


class ModelVersion:
    """One version of a model: ``checkpoint`` (a ``Checkpoint``, with ``download()``) and what was said of it."""

    def __init__(self, session: Client, record: dict[str, Any]) -> None:
        self._session = session
        self._record = record
        self.model_id: int = record["model_id"]
        self.model_name: str = record["model_name"]
        self.model_version: int = record["version"]
        self.name: str = record.get("name", "")
        self.comment: str = record.get("comment", "")
        self.notes: str = ""  # Determined's readme of a version; Kiln keeps ``comment`` and ``metadata``
        self.metadata: dict[str, Any] = record.get("metadata") or {}
        self.registered_by: str = record.get("registered_by", "")
        self.registration_time: datetime | None = _time(record.get("registered_at"))
        # The whole record when the caller may see the checkpoint's experiment; else what the version says of it
        # (a download then answers 403, as for the checkpoint itself).
        self.checkpoint = Checkpoint(session, record.get("checkpoint") or {
            "uuid": record["checkpoint_uuid"], "trial_id": record["trial_id"],
            "experiment_id": record["experiment_id"], "steps_completed": record.get("steps_completed") or 0,
            "state": record.get("checkpoint_state") or "UNSPECIFIED"})

    @property
    def version(self) -> int:
        """The version number (Determined's ``model_version``)."""
        return self.model_version

    def delete(self) -> None:
        """Delete this version from the registry (its checkpoint is collectable again once no version names it)."""
        self._session.delete_model_version(self.model_name, self.model_version)

    def __repr__(self) -> str:
        return (f"ModelVersion(model_name={self.model_name!r}, version={self.model_version},"
                f" checkpoint={self.checkpoint.uuid!r})")


class Model:
    """A model of the registry (Determined's ``Model``): its versions and what describes it."""

    def __init__(self, session: Client, record: dict[str, Any]) -> None:
        self._session = session
        self._set(record)

    def _set(self, record: dict[str, Any]) -> None:
        self._record = record
        self.model_id: int = record["id"]
        self.name: str = record["name"]
        self.description: str = record.get("description", "")
        self.labels: list[str] = list(record.get("labels") or [])
        self.metadata: dict[str, Any] = record.get("metadata") or {}
        self.username: str = record.get("owner", "")
        self.creation_time: datetime | None = _time(record.get("created_at"))
        self.last_updated_time: datetime | None = _time(record.get("updated_at"))
        self.num_versions: int = record.get("num_versions", 0)
        self.archived = False  # Kiln does not archive models

    def reload(self) -> None:
        """Read the model again."""
        self._set(self._session.get_model(self.model_id))

    def get_version(self, version: int | None = None) -> ModelVersion | None:
        """A version by number; without one (or -1, Determined's old default) the latest, or None when the model
        has no versions yet. A number that is not a version raises ``APIError`` (404)."""
        if version is None or version == -1:
            latest = self._session.model_versions(self.name, descending=True)
            return ModelVersion(self._session, latest[0]) if latest else None
        return ModelVersion(self._session, self._session.get_model_version(self.name, int(version)))

    def get_versions(self, order_by: OrderBy = OrderBy.DESC) -> list[ModelVersion]:
        """Every version, the latest first (``order_by=OrderBy.ASC``: the first first)."""
        records = self._session.model_versions(self.name, descending=OrderBy(order_by) is OrderBy.DESC)
        return [ModelVersion(self._session, r) for r in records]

    def list_versions(self, order_by: OrderBy = OrderBy.DESC) -> list[ModelVersion]:
        """Determined's newer name of ``get_versions``."""
        return self.get_versions(order_by)

    def register_version(self, checkpoint_uuid: str) -> ModelVersion:
        """Register a checkpoint as the next version; it is never collected while registered."""
        return ModelVersion(self._session, self._session.register_model_version(self.name, checkpoint_uuid))

    def add_metadata(self, metadata: dict[str, Any]) -> None:
        """Set these top-level metadata keys (replacing what they held)."""
        self._set(self._session.set_model_metadata(self.model_id, set_metadata=metadata))

    def remove_metadata(self, keys: list[str]) -> None:
        """Remove these top-level metadata keys."""
        if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"remove_metadata() takes a list of strings, got {keys!r}")
        self._set(self._session.set_model_metadata(self.model_id, remove_metadata=list(keys)))

    def set_labels(self, labels: list[str]) -> None:
        """Make these the model's labels (the ones not listed are removed)."""
        if isinstance(labels, str):
            raise ValueError(f"set_labels() takes a list of strings, got {labels!r}")
        wanted = list(labels)
        removed = [label for label in self.labels if label not in wanted]
        self._set(self._session.set_model_metadata(self.model_id, add_labels=wanted, remove_labels=removed))

    def set_description(self, description: str) -> None:
        """Replace the model's description."""
        self._set(self._session.set_model_metadata(self.model_id, description=description))

    def delete(self) -> None:
        """Delete the model and all its versions."""
        self._session.delete_model(self.model_id)

    def to_json(self) -> dict[str, Any]:
        """The model's fields as Determined's ``to_json`` gives them."""
        return {"name": self.name, "id": self.model_id, "description": self.description,
                "creation_time": self.creation_time, "last_updated_time": self.last_updated_time,
                "metadata": self.metadata, "labels": self.labels, "username": self.username}

    def __repr__(self) -> str:
        return f"Model(id={self.model_id}, name={self.name!r}, labels={self.labels})"
