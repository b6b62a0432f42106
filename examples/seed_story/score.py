"""Batch inference: score a version of the digits table with a registered model, in Spark, and write the
predictions to a Delta table, every row tagged with the model version that made it.

The model is loaded inside the executors (``kiln.spark``: fetched once per host, built once per Python
worker), not on the driver, and not per row::

    python score.py s3://kiln-seed/story/digits --version 1 --model seed-digits --model-version 1 \\
        --output s3://kiln-seed/story/predictions
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "model"))
sys.path.insert(0, str(HERE))


def load_classifier(path: Path) -> Callable[[Any], Any]:
    """Runs in an executor: the network of a checkpoint of ``model/train.py``, as a batch -> labels function."""
    import torch
    from net import build_model, images_tensor

    torch.set_num_threads(1)
    width = int(json.loads((path / "state.json").read_text())["width"])
    net = build_model(width)
    net.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    net.eval()

    def classify(batch: Any) -> Any:
        with torch.no_grad():
            return net(images_tensor(batch["image"])).argmax(dim=1).numpy()

    return classify


def score(spark: Any, lake: Any, table: str, version: int, model: Any, output: str) -> dict[str, Any]:
    """Predict a label for every row of ``table`` at ``version``; append them to ``output`` (one commit)."""
    import kiln.spark

    # Executors import the loader (this module, by name) and net.py: addPyFile ships them to every node.
    spark.sparkContext.addPyFile(str(HERE / "model" / "net.py"))
    spark.sparkContext.addPyFile(str(HERE / "score.py"))
    rows = lake.read(table, version).select(["id", "image", "label", "split"])
    images = spark.createDataFrame(rows)
    images = images.repartition(4)  # several tasks, so the once-per-worker load is visible in the logs
    scored = kiln.spark.predict(images, model, load_classifier, columns=["image"], output_type="int")
    result = scored.drop("image").withColumns(_source(spark, table, version)).toArrow()
    out_version = lake.append(output, result)
    correct = sum(int(p == y) for p, y in zip(result.column("prediction").to_pylist(),
                                              result.column("label").to_pylist(), strict=True))
    return {"rows_in": rows.num_rows, "rows_scored": result.num_rows, "output_version": out_version,
            "accuracy": correct / max(result.num_rows, 1)}


def _source(spark: Any, table: str, version: int) -> dict[str, Any]:
    from pyspark.sql import functions as F

    return {"source_table": F.lit(table), "source_version": F.lit(version).cast("long")}


def main(argv: list[str] | None = None) -> int:
    """The command line above."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table")
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--model", help="a registered model's name")
    parser.add_argument("--model-version", default="latest")
    parser.add_argument("--experiment", type=int, help="instead of --model: this experiment's best checkpoint")
    parser.add_argument("--output", required=True, help="the predictions table")
    args = parser.parse_args(argv)
    from lake import Lake, spark_session

    import kiln.spark

    if (args.model is None) == (args.experiment is None):
        parser.error("name exactly one of --model and --experiment")
    model = (kiln.spark.model_version(args.model, args.model_version) if args.model
             else kiln.spark.best_checkpoint(args.experiment))
    spark = spark_session("seed-story-score")
    try:
        print(json.dumps(score(spark, Lake(), args.table, args.version, model, args.output)))
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
