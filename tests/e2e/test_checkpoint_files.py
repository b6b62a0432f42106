"""A trial's checkpoints on the real stack in each storage a config may name (the cluster's store, a second
bucket at its own endpoint with its own key, a shared path): the trial stores and restores one with its hashes and
modification times; the cluster's are described, downloaded with their mtimes, and a corrupted one is refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from deploy import parts, stack
from schemas.checkpoint import MANIFEST_FILE, CheckpointManifest
from schemas.trial import checkpoint_prefix
from tests.e2e.conftest import Stack, wait_for

pytestmark = pytest.mark.e2e

OLD = 1_600_000_000.0
WEIGHTS = bytes(range(256)) * 4096  # 1 MiB
TRAIN = textwrap.dedent(f"""\
    import os
    import kiln as det

    with det.core.init() as ctx:
        with ctx.checkpoint.store_path({{"steps_completed": 1, "framework": "custom-1"}}) as (path, sid):
            (path / "w.bin").write_bytes({WEIGHTS[:256]!r} * 4096)
            os.utime(path / "w.bin", ({OLD!r}, {OLD!r}))
        with ctx.checkpoint.restore_path(sid) as back:
            w = back / "w.bin"
            ok = w.read_bytes() == {WEIGHTS[:256]!r} * 4096 and w.stat().st_mtime == {OLD!r}
        ctx.train.report_validation_metrics(steps_completed=1, metrics={{"restored": 1.0 if ok else 0.0}})
""")


def _config(storage: dict[str, Any] | None) -> str:
    cfg: dict[str, Any] = {"name": "checkpoint-files", "entrypoint": "python3 train.py",
                           "searcher": {"name": "single", "metric": "restored", "smaller_is_better": False,
                                        "max_length": {"batches": 1}}}
    if storage is not None:
        cfg["checkpoint_storage"] = storage
    return json.dumps(cfg)  # JSON is YAML


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A path the trial's (unprivileged) user may write: pytest's tmp_path sits under a 0700 dir."""
    path = Path(tempfile.mkdtemp(prefix="kiln-shared-fs-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(s: Stack, tmp: Path, storage: dict[str, Any] | None) -> dict[str, Any]:
    """Run the trial to completion; its checkpoint's record (the metric is the trial's own restore check)."""
    model = tmp / f"model-{uuid.uuid4().hex[:6]}"
    model.mkdir()
    (model / "train.py").write_text(TRAIN)
    (model / "cfg.yaml").write_text(_config(storage))
    out = s.kiln("experiment", "create", str(model / "cfg.yaml"), str(model))
    assert out.returncode == 0, out.stderr
    experiment_id = int(out.stdout.split("Created experiment ", 1)[1].split()[0])
    wait_for(lambda: s.http.get(f"/api/v1/experiments/{experiment_id}").json()["state"] == "COMPLETED",
             timeout=180.0, what="the experiment to complete")
    rows = wait_for(lambda: (r := s.http.get(f"/api/v1/experiments/{experiment_id}/checkpoints").json())
                    and r[0]["metric"] is not None and r, timeout=60.0, what="the checkpoint and its metric")
    row: dict[str, Any] = rows[0]
    assert row["metric"] == 1.0, "the trial restored its checkpoint with the same bytes and mtime"
    assert row["resources"]["w.bin"] == len(WEIGHTS)
    return row


def _manifest(raw: bytes) -> CheckpointManifest:
    manifest = msgspec.json.decode(raw, type=CheckpointManifest)
    w = manifest.files["w.bin"]
    assert (w.size, w.sha256, w.mtime) == (len(WEIGHTS), hashlib.sha256(WEIGHTS).hexdigest(), OLD)
    assert manifest.steps_completed == 1 and manifest.framework == "custom-1"
    return manifest


def test_checkpoints_in_each_storage_keep_hashes_and_times(kiln_stack: Stack, tmp_path: Path,
                                                           shared_dir: Path) -> None:
    s = kiln_stack
    cfg = stack.parts_config(s.cfg, s.creds)
    minio = parts.s3_client(cfg)

    # The cluster's store, through the worker: described with hashes, downloaded with mtimes, checked.
    row = _run(s, tmp_path, None)
    ckpt = row["uuid"]
    files = s.http.get(f"/api/v1/checkpoints/{ckpt}/files")
    assert files.status_code == 200, files.text
    body = files.json()
    assert body["hashed"] and body["framework"] == "custom-1" and body["steps_completed"] == 1
    assert body["files"]["w.bin"] == {"size": len(WEIGHTS), "sha256": hashlib.sha256(WEIGHTS).hexdigest(),
                                      "mtime": OLD}
    described = s.kiln("checkpoint", "describe", ckpt)
    assert described.returncode == 0, described.stderr
    assert "framework: custom-1" in described.stdout and hashlib.sha256(WEIGHTS).hexdigest() in described.stdout
    out = tmp_path / "down"
    got = s.kiln("checkpoint", "download", ckpt, "--output", str(out))
    assert got.returncode == 0, got.stderr
    assert (out / "w.bin").read_bytes() == WEIGHTS and (out / "w.bin").stat().st_mtime == OLD
    assert not (out / MANIFEST_FILE).exists()
    key = f"{checkpoint_prefix(row['experiment_id'])}/{ckpt}/w.bin"
    minio.put_object(cfg.s3_buckets[0], key, io.BytesIO(b"\0" * len(WEIGHTS)), len(WEIGHTS))
    bad = s.kiln("checkpoint", "download", ckpt, "--output", str(tmp_path / "bad"))
    assert bad.returncode == 1 and "not what was uploaded" in bad.stderr and "w.bin: sha256" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad" / "w.bin").exists()
    assert s.http.get(f"/api/v1/checkpoints/{ckpt}/download").status_code == 410

    # A second bucket at an endpoint the config names, with the key the config gives.
    bucket = f"user-{uuid.uuid4().hex[:10]}"
    minio.make_bucket(bucket)
    row = _run(s, tmp_path, {"type": "s3", "bucket": bucket, "prefix": "team", "access_key": cfg.s3_access_key,
                             "secret_key": cfg.s3_secret_key,
                             "endpoint_url": f"http://{cfg.host}:{cfg.s3_port}"})
    assert row["storage"] == f"s3://{bucket}/team"
    stored = minio.get_object(bucket, f"team/{row['uuid']}/{MANIFEST_FILE}")
    _manifest(stored.read())
    stored.close()
    stored.release_conn()
    assert minio.get_object(bucket, f"team/{row['uuid']}/w.bin").read() == WEIGHTS

    # A shared path.
    row = _run(s, tmp_path, {"type": "shared_fs", "host_path": str(shared_dir), "storage_path": "ckpts"})
    assert row["storage"] == f"file://{shared_dir / 'ckpts'}"
    where = shared_dir / "ckpts" / row["uuid"]
    _manifest((where / MANIFEST_FILE).read_bytes())
    assert (where / "w.bin").stat().st_mtime == OLD and os.path.getsize(where / "w.bin") == len(WEIGHTS)
    assert s.http.get(f"/api/v1/checkpoints/{row['uuid']}/files").status_code == 409  # outside the cluster's store
