"""The lake the seed story's Spark jobs share: a local Spark session, and Delta tables on the stack's S3 store.

Spark does the compute; delta-rs (``deltalake``) reads and writes the Delta tables, handing Arrow to and from
Spark (``spark.createDataFrame(arrow_table)``, ``df.toArrow()``). On a cluster with delta-spark's jars the same
jobs would read ``spark.read.format("delta").option("versionAsOf", n).load(uri)`` and write
``df.write.format("delta").mode("append").save(uri)`` instead (README: "On a real cluster").
"""

from __future__ import annotations

import os
import sys
from typing import Any

from minio import Minio

from deploy.stack import Credentials, StackConfig
from schemas.data import locate, s3_storage_options


class Lake:
    """Delta tables in the local stack's S3 store (``KILN_STATE_DIR``, else ./.kiln), with its S3 key."""

    def __init__(self) -> None:
        cfg = StackConfig.load()
        creds = Credentials.load_or_create(cfg.state_dir)
        self.endpoint = f"{cfg.host}:{cfg.s3_port}"
        self._keys = (creds.s3_access_key, creds.s3_secret_key)
        # A writer's setting: the store does no conditional puts, so delta-rs must be told one writer is safe.
        self.options = {**s3_storage_options(self.endpoint, *self._keys, secure=False),
                        "AWS_S3_ALLOW_UNSAFE_RENAME": "true"}

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket a table URI names, if it is not there yet."""
        bucket = locate(uri).bucket
        minio = Minio(self.endpoint, access_key=self._keys[0], secret_key=self._keys[1], secure=False)
        if not minio.bucket_exists(bucket):
            minio.make_bucket(bucket)

    def read(self, uri: str, version: int | None = None) -> Any:
        """One version of a table (None: the latest) as a pyarrow Table."""
        from deltalake import DeltaTable

        return DeltaTable(uri, version=version, storage_options=self.options).to_pyarrow_table()

    def version(self, uri: str) -> int | None:
        """A table's latest version, or None when there is no table there yet."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return int(DeltaTable(uri, storage_options=self.options).version())
        except TableNotFoundError:
            return None

    def append(self, uri: str, table: Any) -> int:
        """Append an Arrow table as one commit; the new version."""
        from deltalake import write_deltalake

        self.ensure_bucket(uri)
        write_deltalake(uri, table, mode="append", storage_options=self.options)
        version = self.version(uri)
        assert version is not None
        return version


def spark_session(app: str) -> Any:
    """A local Spark session on loopback, its Python workers running this interpreter."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors need this venv's pyarrow, torch, kiln
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(os.environ.get("SPARK_MASTER", "local[2]")).appName(app)
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.shuffle.partitions", "4")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark
