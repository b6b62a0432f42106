"""ETL: raw digit images and labels -> the ``digits`` Delta table (id, image, label, split, source).

The raw data arrives in drops, as a labelling team would deliver it: a directory of PGM images and a
``labels.csv`` (id, label, split). ``raw`` writes the two drops of the story from scikit-learn's bundled digits:
drop 1 holds every image except most training images of one class (only ``--keep`` of them: the class the first
model will be weak at); drop 2 holds those, collected later.

``ingest`` is the Spark job: it reads a drop (images as binary files, labels as CSV), joins them, keeps only ids
the table does not hold yet (so rerunning a drop appends nothing), and appends the rest as one Delta commit::

    python etl.py raw /tmp/digits-raw --weak-class 8 --keep 3
    python etl.py ingest /tmp/digits-raw/drop-1 s3://kiln-seed/story/digits    # -> version 0
    python etl.py ingest /tmp/digits-raw/drop-2 s3://kiln-seed/story/digits    # -> version 1
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "model"))  # net.py: the image format
sys.path.insert(0, str(HERE))

VAL_EVERY = 5  # every 5th image of each class is a validation image: 20 %, the same for every class


def raw(target: Path, weak_class: int = 8, keep: int = 3) -> dict[str, int]:
    """Write the two raw drops under ``target``; rows per drop."""
    from net import encode_pgm
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen: dict[int, int] = {}
    kept_weak = 0
    rows: dict[str, list[tuple[str, int, str]]] = {"drop-1": [], "drop-2": []}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(label)
        nth = seen.get(label, 0)
        seen[label] = nth + 1
        split = "val" if nth % VAL_EVERY == 0 else "train"
        drop = "drop-1"
        if split == "train" and label == weak_class:
            kept_weak += 1
            drop = "drop-1" if kept_weak <= keep else "drop-2"
        image_id = f"digit-{i:04d}"
        images = target / drop / "images"
        images.mkdir(parents=True, exist_ok=True)
        (images / f"{image_id}.pgm").write_bytes(encode_pgm(pixels.astype("uint8")))
        rows[drop].append((image_id, label, split))
    for drop, entries in rows.items():
        with (target / drop / "labels.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "label", "split"])
            writer.writerows(entries)
    return {drop: len(entries) for drop, entries in rows.items()}


def ingest(spark: Any, lake: Any, drop: Path, uri: str) -> tuple[int | None, int]:
    """Append the drop's images the table lacks, as one commit: (the table's version after it, rows appended)."""
    from pyspark.sql import functions as F

    images = (spark.read.format("binaryFile").option("pathGlobFilter", "*.pgm").load(str(drop / "images"))
              .select(F.regexp_extract("path", r"([^/]+)\.pgm$", 1).alias("id"), F.col("content").alias("image")))
    labels = spark.read.option("header", True).schema("id string, label int, split string").csv(
        str(drop / "labels.csv"))
    rows = (images.join(labels, "id", "inner")
            .select("id", "image", "label", "split", F.lit(drop.name).alias("source")))
    lake.ensure_bucket(uri)
    current = lake.version(uri)
    if current is not None:  # only what the table does not hold yet: a drop ingested twice appends nothing
        have = spark.createDataFrame(lake.read(uri, current).select(["id"]))
        rows = rows.join(have, "id", "left_anti")
    batch = rows.orderBy("id").toArrow()
    if batch.num_rows == 0:
        return current, 0
    return lake.append(uri, batch), batch.num_rows


def class_counts(spark: Any, lake: Any, uri: str, version: int) -> list[dict[str, Any]]:
    """Rows per class and split in one version of the table, computed by Spark: what the model was trained on."""
    from pyspark.sql import functions as F

    df = spark.createDataFrame(lake.read(uri, version).select(["label", "split", "source"]))
    counts = (df.groupBy("label")
              .agg(F.sum(F.when(F.col("split") == "train", 1).otherwise(0)).alias("train"),
                   F.sum(F.when(F.col("split") == "val", 1).otherwise(0)).alias("val"))
              .withColumn("train_share", F.round(F.col("train") / F.sum("train").over(_whole()), 4))
              .orderBy("label"))
    return [row.asDict() for row in counts.collect()]


def _whole() -> Any:
    from pyspark.sql import Window

    return Window.partitionBy()


def main(argv: list[str] | None = None) -> int:
    """The command line above."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("raw", help="write the two raw drops")
    make.add_argument("target", type=Path)
    make.add_argument("--weak-class", type=int, default=8)
    make.add_argument("--keep", type=int, default=3)
    load = sub.add_parser("ingest", help="append a drop's new images to the Delta table")
    load.add_argument("drop", type=Path)
    load.add_argument("table")
    count = sub.add_parser("counts", help="rows per class and split of one table version")
    count.add_argument("table")
    count.add_argument("--version", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "raw":
        print(raw(args.target, args.weak_class, args.keep))
        return 0
    from lake import Lake, spark_session

    spark = spark_session(f"seed-story-{args.command}")
    try:
        if args.command == "ingest":
            version, appended = ingest(spark, Lake(), args.drop.resolve(), args.table)
            print(f"{args.table}: appended {appended} rows; version {version}")
        else:
            for row in class_counts(spark, Lake(), args.table, args.version):
                print(row)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
