"""Checkpoints move streamed, in parts when big, with a manifest of sizes, sha256 hashes and mtimes that every
download checks and restores: through the worker's presigned URLs, in a user's own S3 bucket, on a shared path.
All against the real S3 store."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from deploy import parts as p
from kiln.core import _storage_for
from kiln.core._bus import TrialBus
from kiln.core._checkpoint import CheckpointContext, LinkedS3Storage, Storage
from schemas.checkpoint import MANIFEST_FILE, CheckpointManifest, CorruptCheckpoint
from schemas.trial import ClusterInfo, TrialInfo, checkpoint_prefix
from services.worker.link import Identity, MinioStore, TrialLink, socket_path

pytestmark = pytest.mark.integration

MiB = 1 << 20
OLD = 1_600_000_000.5  # a modification time long past: a download must bring it back, not "now"


async def _no_stops(who: Identity, on_stop: Any) -> None:
    await asyncio.Event().wait()


async def _append(event: Any) -> int:
    return 1


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (OLD, OLD))
    return hashlib.sha256(data).hexdigest()


def _store_and_restore(storage: Storage, big: int, tmp: Path) -> tuple[str, CheckpointManifest, dict[str, str]]:
    """Store a checkpoint with one file bigger than a part and a small one; restore it into ``tmp/back``."""
    stored: list[CheckpointManifest] = []
    ckpt = CheckpointContext(storage, lambda sid, steps, manifest, meta: stored.append(manifest))
    want = {}
    with ckpt.store_path({"steps_completed": 7, "framework": "torch-test"}) as (path, storage_id):
        want["model.pt"] = _write(path / "model.pt", os.urandom(big))
        want["sub/opt.bin"] = _write(path / "sub" / "opt.bin", b"optimizer")
    ckpt.download(storage_id, tmp / "back")
    for rel, sha in want.items():
        restored = tmp / "back" / rel
        assert hashlib.sha256(restored.read_bytes()).hexdigest() == sha
        assert restored.stat().st_mtime == OLD
    return storage_id, stored[0], want


def _check_manifest(manifest: CheckpointManifest, want: dict[str, str], big: int) -> None:
    assert manifest.steps_completed == 7 and manifest.framework == "torch-test"
    assert {rel: manifest.files[rel].sha256 for rel in want} == want
    assert manifest.files["model.pt"].size == big and manifest.files["model.pt"].mtime == OLD
    assert set(manifest.files) == {"model.pt", "sub/opt.bin", "metadata.json"}


def _corrupt(minio: Any, bucket: str, key: str) -> None:
    """Replace an object by other bytes of the same size (a bit rot the size alone does not show)."""
    size = minio.stat_object(bucket, key).size
    minio.put_object(bucket, key, io.BytesIO(b"\0" * size), size)


async def test_a_big_file_goes_up_in_parts_through_the_worker_and_comes_back_checked(parts: p.RunningParts,
                                                                                    tmp_path: Path) -> None:
    minio = p.s3_client(parts.cfg)
    exp = 600_000 + uuid.uuid4().int % 100_000
    who = Identity(experiment_id=exp, trial_id=1, allocation_id="1.1")
    link = TrialLink(socket_path(tmp_path / "1.1"), who, _append, _no_stops, store=MinioStore(minio, "kiln"))
    await link.start()
    # SeaweedFS holds to S3's rule (every part but the last at least 5 MiB, else EntityTooSmall): two parts.
    big = 5 * MiB + 12_345

    def trial() -> tuple[str, CheckpointManifest, dict[str, str]]:
        bus = TrialBus(str(link.path), exp, 1, "1.1")
        try:
            return _store_and_restore(LinkedS3Storage(lambda: bus, "kiln", checkpoint_prefix(exp), part_bytes=5 * MiB),
                                      big, tmp_path)
        finally:
            bus.close()

    storage_id, manifest, want = await asyncio.to_thread(trial)
    _check_manifest(manifest, want, big)
    prefix = f"{checkpoint_prefix(exp)}/{storage_id}/"
    assert minio.stat_object("kiln", prefix + "model.pt").etag.endswith("-2")  # two parts: a multipart upload
    stored = minio.get_object("kiln", prefix + MANIFEST_FILE)
    assert msgspec.json.decode(stored.read(), type=CheckpointManifest) == manifest
    stored.close()
    stored.release_conn()

    _corrupt(minio, "kiln", prefix + "model.pt")

    def restore_corrupted() -> str:
        bus = TrialBus(str(link.path), exp, 1, "1.1")
        try:
            LinkedS3Storage(lambda: bus, "kiln", checkpoint_prefix(exp)).download(storage_id, tmp_path / "bad")
        except CorruptCheckpoint as exc:
            return str(exc)
        finally:
            bus.close()
        return "no error"

    error = await asyncio.to_thread(restore_corrupted)
    await link.close()
    assert f"checkpoint {storage_id} is corrupted" in error and "model.pt: sha256" in error
    assert not (tmp_path / "bad" / "model.pt").exists()  # no silent bad file left behind


def _wire(parts: p.RunningParts) -> ClusterInfo:
    return ClusterInfo(master_url="", cluster_id="c", allocation_id="1.1", worker_id="w",
                       s3_endpoint=f"{parts.cfg.host}:{parts.cfg.s3_port}", s3_bucket="kiln",
                       trial=TrialInfo(trial_id=1, experiment_id=3, hparams={}, trial_seed=0, config={}))


def _config(storage: dict[str, Any]) -> dict[str, Any]:
    return {"entrypoint": "t:T", "searcher": {"name": "single", "metric": "m"}, "checkpoint_storage": storage}


def _no_link() -> Any:
    raise AssertionError("a trial with storage of its own does not ask the worker")


def test_a_users_own_bucket_at_any_endpoint_with_its_own_key(parts: p.RunningParts, tmp_path: Path) -> None:
    minio = p.s3_client(parts.cfg)
    bucket = f"user-{uuid.uuid4().hex[:12]}"
    minio.make_bucket(bucket)
    config = _config({"type": "s3", "bucket": bucket, "prefix": "team/ckpts",
                      "endpoint_url": f"http://{parts.cfg.host}:{parts.cfg.s3_port}",
                      "access_key": parts.cfg.s3_access_key, "secret_key": parts.cfg.s3_secret_key})
    storage = _storage_for(config, _wire(parts), _no_link)
    storage.part_bytes = 5 * MiB  # type: ignore[union-attr]  # S3's (and the minio SDK's) smallest part
    big = 5 * MiB + 4321
    storage_id, manifest, want = _store_and_restore(storage, big, tmp_path)
    _check_manifest(manifest, want, big)
    assert storage.location() == f"s3://{bucket}/team/ckpts"
    key = f"team/ckpts/{storage_id}/model.pt"
    stat = minio.stat_object(bucket, key)
    assert stat.etag.endswith("-2") and float(stat.metadata["x-amz-meta-mtime"]) == OLD
    assert not list(minio.list_objects("kiln", prefix=f"{checkpoint_prefix(3)}/{storage_id}/"))

    _corrupt(minio, bucket, key)
    with pytest.raises(CorruptCheckpoint, match=f"checkpoint {storage_id} is corrupted.*model.pt: sha256"):
        storage.download(storage_id, tmp_path / "bad")
    minio.remove_object(bucket, f"team/ckpts/{storage_id}/sub/opt.bin")
    with pytest.raises(CorruptCheckpoint, match="incomplete in the store: missing sub/opt.bin"):
        storage.download(storage_id, tmp_path / "bad2")


def test_a_shared_path_keeps_hashes_and_times(parts: p.RunningParts, tmp_path: Path) -> None:
    config = _config({"type": "shared_fs", "host_path": str(tmp_path / "mnt"), "storage_path": "ckpts"})
    storage = _storage_for(config, _wire(parts), _no_link)
    storage_id, manifest, want = _store_and_restore(storage, 3 * MiB + 1, tmp_path)
    _check_manifest(manifest, want, 3 * MiB + 1)
    stored = tmp_path / "mnt" / "ckpts" / storage_id
    assert (stored / "model.pt").stat().st_mtime == OLD
    (stored / "sub" / "opt.bin").write_bytes(b"optimizeR")
    with pytest.raises(CorruptCheckpoint, match="sub/opt.bin: sha256"):
        storage.download(storage_id, tmp_path / "bad")
