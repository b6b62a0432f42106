"""kiln.core picks a trial's checkpoint storage from the experiment config it was given (no I/O)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.core import _storage_for
from kiln.core._checkpoint import LinkedS3Storage, S3Storage, SharedFSStorage
from schemas.trial import ClusterInfo, TrialInfo

WIRE = ClusterInfo(master_url="", cluster_id="c", allocation_id="1.1", worker_id="w", s3_endpoint="127.0.0.1:8333",
                   s3_bucket="kiln", trial=TrialInfo(trial_id=1, experiment_id=3, hparams={}, trial_seed=0, config={}))


def config(**overrides: Any) -> dict[str, Any]:
    return {"entrypoint": "t:T", "searcher": {"name": "single", "metric": "m"}} | overrides


def no_link() -> Any:
    raise AssertionError("not used to choose the storage")


def test_no_checkpoint_storage_means_the_clusters_store_through_the_worker() -> None:
    storage = _storage_for(config(), WIRE, no_link)
    assert isinstance(storage, LinkedS3Storage)
    assert (storage.bucket, storage.prefix) == ("kiln", "checkpoints/3")


def test_shared_fs_with_a_field_added_by_a_later_version() -> None:
    cs = {"type": "shared_fs", "host_path": "/mnt", "storage_path": "ck", "added_later": True}
    storage = _storage_for(config(checkpoint_storage=cs), WIRE, no_link)
    assert isinstance(storage, SharedFSStorage)
    assert storage.root == Path("/mnt/ck")


def test_the_users_own_bucket_is_spoken_to_directly_and_the_clusters_through_the_worker() -> None:
    own = _storage_for(config(checkpoint_storage={"type": "s3", "bucket": "mine", "prefix": "p"}), WIRE, no_link)
    assert isinstance(own, S3Storage)
    assert own.location().startswith("s3://mine")
    cluster = _storage_for(config(checkpoint_storage={"type": "s3", "bucket": "kiln", "prefix": "p"}), WIRE, no_link)
    assert isinstance(cluster, LinkedS3Storage)
