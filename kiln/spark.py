"""``kiln.spark``: score Spark DataFrames with Kiln models, loaded inside the executors.

Name the model on the driver, by registry name and version or by experiment (its best checkpoint by the
searcher's metric); it is resolved there once, to one checkpoint, so every row of the job is scored by, and
tagged with, the same version even if ``latest`` moves while the job runs. Each executor's Python worker then
loads it the first time it needs it: the checkpoint's files come through the gateway into the host's checkpoint
cache (``kiln.models.fetch``: once per host, shared by its workers), your ``load`` function builds a predictor
from them once per worker process, and every later batch and task in that process reuses it. Nothing is loaded
per row, nor per batch.

Example (``examples/seed_story/score.py`` is the whole job)::

    from pyspark.sql import SparkSession
    import kiln.spark

    def load(path):                       # runs in an executor, once per Python worker: path holds the files
        import torch
        from net import build_model, images_tensor
        net = build_model(16)
        net.load_state_dict(torch.load(path / "model.pt", weights_only=True))
        net.eval()

        def predict(batch):               # a pandas DataFrame of the input columns -> one value per row
            with torch.no_grad():
                return net(images_tensor(batch["image"])).argmax(dim=1).numpy()
        return predict

    spark = SparkSession.builder.getOrCreate()
    model = kiln.spark.model_version("digits", 3)          # or kiln.spark.best_checkpoint(experiment_id=12)
    scored = kiln.spark.predict(spark.read.parquet("images/"), model, load, columns=["image"],
                                output_type="int")
    # scored: the input columns, then prediction, model_name, model_version, experiment_id, checkpoint_uuid

The executors reach the gateway with the driver's address and token (``KILN_MASTER``, ``KILN_TOKEN`` or what
``kiln user login`` stored), carried in the task closure: use a named token (``kiln token create``) that may read
the checkpoint, and revoke it when the job is done. ``pyspark`` (the ``spark`` extra) and pandas load on first use,
not with ``import kiln.spark``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.client import Client, master_url, stored_token
from schemas.registry import parse_version

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame
    from pyspark.sql.types import DataType

__all__ = ["TAG_COLUMNS", "ModelRef", "best_checkpoint", "checkpoint_dir", "model_version", "predict",
           "predictor"]

# The columns ``predict`` adds after the prediction: which model made it.
TAG_COLUMNS = ("model_name", "model_version", "experiment_id", "checkpoint_uuid")

# A predictor maps a batch (a pandas DataFrame of the input columns) to one value per row.
Predictor = Callable[["pd.DataFrame"], Sequence[Any]]
Loader = Callable[[Path], Predictor]


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """One checkpoint to score with, resolved on the driver, and how executors reach the gateway for it."""

    checkpoint_uuid: str
    master: str
    model_name: str | None = None
    model_version: int | None = None
    experiment_id: int | None = None
    trial_id: int | None = None
    token: str | None = dataclasses.field(default=None, repr=False)


def _token(master: str, token: str | None) -> str | None:
    if token is not None:
        return token
    stored = stored_token(master)
    return os.environ.get("KILN_TOKEN") or (stored[1] if stored else None)


def model_version(name: str, version: int | str | None = "latest", *, master: str | None = None,
                  token: str | None = None) -> ModelRef:
    """Model ``name``'s ``version`` (a number or ``latest``) from the registry, resolved now to its checkpoint."""
    selector = parse_version(version)
    address = (master or master_url()).rstrip("/")
    auth = _token(address, token)
    client = Client(address, token=auth)
    try:
        found = client.get_model_version(name, selector)
    finally:
        client.close()
    return ModelRef(checkpoint_uuid=str(found["checkpoint_uuid"]), master=address, token=auth, model_name=name,
                    model_version=int(found["version"]), experiment_id=int(found["experiment_id"]),
                    trial_id=int(found["trial_id"]))


def best_checkpoint(experiment_id: int, *, master: str | None = None, token: str | None = None) -> ModelRef:
    """Experiment ``experiment_id``'s best completed checkpoint by its searcher metric, resolved now."""
    address = (master or master_url()).rstrip("/")
    auth = _token(address, token)
    client = Client(address, token=auth)
    try:
        best = client.experiment_checkpoints(experiment_id, sort_by="metric", state="COMPLETED", limit=1)
    finally:
        client.close()
    if not best:
        raise LookupError(f"experiment {experiment_id} has no completed checkpoint to score with")
    return ModelRef(checkpoint_uuid=str(best[0]["uuid"]), master=address, token=auth, experiment_id=experiment_id,
                    trial_id=best[0].get("trial_id"))


def checkpoint_dir(model: ModelRef, cache: str | Path | None = None) -> Path:
    """The local directory holding ``model``'s checkpoint files (downloaded once per host, then cached)."""
    from kiln.models import fetch

    client = Client(model.master, token=model.token)
    try:
        return fetch(model.checkpoint_uuid, client=client, cache=cache)
    finally:
        client.close()


# The predictors this process built, by (checkpoint, loader): a Python worker serves many tasks in turn (Spark
# reuses workers), so it loads each model once. The lock makes a second thread wait for the first load.
_PREDICTORS: dict[tuple[str, str], Predictor] = {}
_LOCK = threading.Lock()


def predictor(model: ModelRef, load: Loader, cache: str | Path | None = None) -> Predictor:
    """``load(checkpoint_dir(model))``, built once per process and reused after that."""
    key = (model.checkpoint_uuid, f"{getattr(load, '__module__', '')}.{getattr(load, '__qualname__', repr(load))}")
    with _LOCK:
        found = _PREDICTORS.get(key)
        if found is None:
            found = load(checkpoint_dir(model, cache))
            _PREDICTORS[key] = found
        return found


@dataclasses.dataclass(frozen=True)
class _Scorer:
    """What each task runs over its partition (pickled to the executors): predictions plus the model's tags."""

    model: ModelRef
    load: Loader
    columns: tuple[str, ...] | None
    output: str
    cache: str | None

    def __call__(self, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        predict_batch: Predictor | None = None
        for batch in batches:
            if predict_batch is None:  # an empty partition loads nothing
                predict_batch = predictor(self.model, self.load, self.cache)
            values = list(predict_batch(batch[list(self.columns)] if self.columns else batch))
            if len(values) != len(batch):
                raise ValueError(f"the predictor returned {len(values)} values for a batch of {len(batch)} rows:"
                                 " it must return one per row")
            yield batch.assign(**{self.output: values, "model_name": self.model.model_name,
                                  "model_version": self.model.model_version,
                                  "experiment_id": self.model.experiment_id,
                                  "checkpoint_uuid": self.model.checkpoint_uuid})


def predict(df: DataFrame, model: ModelRef, load: Loader, *, columns: Sequence[str] | None = None,
            output: str = "prediction", output_type: str | DataType = "long",
            cache: str | Path | None = None) -> DataFrame:
    """``df`` with a prediction per row (column ``output`` of ``output_type``, a DDL type name or a Spark
    ``DataType``) and the columns of ``TAG_COLUMNS`` naming the model; lazy, as every DataFrame transformation.

    ``load(path)`` runs in the executors, once per Python worker process, and returns the predictor: a function
    from a pandas DataFrame (the ``columns`` of ``df``, all of them by default) to one value per row.
    """
    from pyspark.sql.types import DataType, LongType, StringType, StructField, StructType

    taken = {f.name for f in df.schema.fields} & {output, *TAG_COLUMNS}
    if taken:
        raise ValueError(f"the DataFrame already has column(s) {sorted(taken)}: drop or rename them, or pick"
                         " another output=")
    missing = [c for c in columns or () if c not in df.columns]
    if missing:
        raise ValueError(f"no column(s) {missing} in the DataFrame (it has {df.columns})")
    kind = DataType.fromDDL(output_type) if isinstance(output_type, str) else output_type
    schema = StructType([*df.schema.fields, StructField(output, kind),
                         StructField("model_name", StringType()), StructField("model_version", LongType()),
                         StructField("experiment_id", LongType()), StructField("checkpoint_uuid", StringType())])
    scorer = _Scorer(model, load, tuple(columns) if columns else None, output,
                     str(cache) if cache is not None else None)
    return df.mapInPandas(scorer, schema)
