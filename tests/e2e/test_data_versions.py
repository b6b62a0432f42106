"""Data versions and lineage on the whole stack: Delta tables on the stack's S3 store and on local disk.

An experiment pinned to version 0 reads version 0's rows only; one naming no version is pinned to the latest at
submission and keeps reading it after the table moved on; lineage (``kiln experiment describe``, the API) shows
config and code digests, the data version and the parent checkpoint; a missing table, version or checkpoint is a
400 saying what and where.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from deltalake import write_deltalake
from minio import Minio

from schemas import context
from schemas.data import s3_storage_options
from tests.e2e.conftest import REPO, Stack, wait_for

pytestmark = pytest.mark.e2e

MODEL = REPO / "tests" / "e2e" / "data_model"
BUCKET = "data-e2e"
_wait = functools.partial(wait_for, timeout=180.0, poll_s=0.3)


def _options(stack: Stack) -> dict[str, str]:
    return {**s3_storage_options(f"{stack.cfg.host}:{stack.cfg.s3_port}", stack.creds.s3_access_key,
                                 stack.creds.s3_secret_key, secure=False),
            "AWS_S3_ALLOW_UNSAFE_RENAME": "true"}  # a writer's setting: the store does no conditional puts


def _append(uri: str, xs: list[int], options: dict[str, str] | None) -> None:
    write_deltalake(uri, pa.table({"x": xs}), mode="append", storage_options=options)


@pytest.fixture
def local_dir() -> Iterator[Path]:
    """A directory trials (another OS user when the worker is root) can read: pytest's tmp_path is 0700."""
    path = Path(tempfile.mkdtemp(prefix="kiln-delta-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config(name: str, data: dict[str, Any], searcher: dict[str, Any] | None = None) -> str:
    return yaml.safe_dump({"name": name, "entrypoint": "python3 train.py", "max_restarts": 0, "data": data,
                           "searcher": {"name": "single", "metric": "rows", "smaller_is_better": False,
                                        "max_length": {"batches": 1}, **(searcher or {})}})


def _create(stack: Stack, tmp: Path, name: str, cfg: str, *flags: str) -> tuple[int, str]:
    path = tmp / f"{name}.yaml"
    path.write_text(cfg)
    out = stack.kiln("experiment", "create", str(path), str(MODEL), *flags)
    assert out.returncode == 0, out.stdout + out.stderr
    return int(out.stdout.split("Created experiment ", 1)[1].split()[0]), cfg


def _ended(stack: Stack, exp_id: int) -> dict[str, Any]:
    exp: dict[str, Any] = _wait(lambda: (e := stack.http.get(f"/api/v1/experiments/{exp_id}").json())["state"]
                                in ("COMPLETED", "ERROR", "CANCELED") and e, what=f"experiment {exp_id} to end")
    trial = stack.http.get(f"/api/v1/experiments/{exp_id}/trials").json()[0]
    logs = "\n".join(line["text"] for line in stack.http.get(f"/api/v1/trials/{trial['id']}/logs").json())
    assert exp["state"] == "COMPLETED", logs
    return {"exp": exp, "trial": trial, "logs": logs}


def _read(stack: Stack, trial_id: int) -> dict[str, Any]:
    """What the trial reported it read (its validation metrics)."""
    (point,) = stack.http.get(f"/api/v1/trials/{trial_id}/metrics", params={"kind": "validation"}).json()
    return point["metrics"]  # type: ignore[no-any-return]


def _lineage(stack: Stack, exp_id: int) -> dict[str, Any]:
    """An experiment's lineage, once the read model has it."""
    return wait_for(lambda: (r := stack.http.get(f"/api/v1/experiments/{exp_id}/lineage")).status_code == 200
                    and r.json(), what=f"the lineage of experiment {exp_id}")


def _describe(stack: Stack, exp_id: int) -> dict[str, Any]:
    out = stack.kiln("experiment", "describe", str(exp_id), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["experiment"]  # type: ignore[no-any-return]


def test_experiments_read_exactly_the_version_pinned_at_submission(kiln_stack: Stack, tmp_path: Path,
                                                                   local_dir: Path) -> None:
    stack = kiln_stack
    minio = Minio(f"{stack.cfg.host}:{stack.cfg.s3_port}", access_key=stack.creds.s3_access_key,
                  secret_key=stack.creds.s3_secret_key, secure=False)
    if not minio.bucket_exists(BUCKET):
        minio.make_bucket(BUCKET)
    s3_table = f"s3://{BUCKET}/{uuid.uuid4().hex}/rows"
    local_table = str(local_dir / "rows")
    for uri, options in ((s3_table, _options(stack)), (local_table, None)):
        _append(uri, [1, 2, 3], options)  # version 0: 3 rows
        _append(uri, [10, 20], options)  # version 1: 5 rows

    pinned, pinned_cfg = _create(stack, tmp_path, "pinned", _config("pinned", {"delta_table": s3_table, "version": 0,
                                                                                "batch_size": 2}))
    local, _ = _create(stack, tmp_path, "local", _config("local", {"delta_table": local_table, "version": 0}))
    # No version: pinned to the latest (1) at submission. Held paused while the table moves on to version 2.
    latest, _ = _create(stack, tmp_path, "latest", _config("latest", {"delta_table": s3_table}), "--paused")
    held = _lineage(stack, latest)
    assert held["data"]["version"] == 1 and held["data"]["latest"] is True
    _append(s3_table, [100, 200, 300, 400], _options(stack))  # version 2: 9 rows, after the submission
    assert stack.kiln("experiment", "activate", str(latest)).returncode == 0

    runs = {exp_id: _ended(stack, exp_id) for exp_id in (pinned, local, latest)}
    reads = {exp_id: _read(stack, run["trial"]["id"]) for exp_id, run in runs.items()}
    assert reads[pinned] == {"rows": 3, "x_sum": 6.0, "version": 0}
    assert reads[local] == {"rows": 3, "x_sum": 6.0, "version": 0}
    assert reads[latest] == {"rows": 5, "x_sum": 36.0, "version": 1}  # not version 2's 9 rows
    assert "version 1: 5 rows" in runs[latest]["logs"]

    # Lineage: config as submitted, code context, exact data version.
    described = _describe(stack, pinned)
    lineage = described["lineage"]
    assert lineage["config_digest"] == "sha256:" + hashlib.sha256(pinned_cfg.encode()).hexdigest()
    assert lineage["code_digest"] == described["context_digest"] == context.digest(context.pack(MODEL))
    assert lineage["data"]["table"] == s3_table and lineage["data"]["version"] == 0
    assert lineage["data"]["latest"] is False and lineage["data"]["table_id"] and lineage["recorded"] is True
    assert lineage["parent"] is None
    assert described["config"]["data"] == {"delta_table": s3_table, "version": 0, "batch_size": 2}
    latest_lineage = _describe(stack, latest)["lineage"]
    assert latest_lineage["data"]["version"] == 1 and latest_lineage["data"]["latest"] is True
    assert _describe(stack, latest)["config"]["data"] == {"delta_table": s3_table, "version": 1}  # as recorded
    human = stack.kiln("experiment", "describe", str(latest)).stdout
    assert f"data: {s3_table} version 1 (the latest at submission)" in human
    assert f"config: {latest_lineage['config_digest']}" in human

    # A later experiment starting from the pinned one's checkpoint records it as its parent (held paused: only
    # the record is under test here).
    checkpoint = runs[pinned]["trial"]["latest_checkpoint"]
    assert checkpoint
    child, _ = _create(stack, tmp_path, "child", _config("child", {"delta_table": local_table},
                                                         {"source_checkpoint_uuid": checkpoint}), "--paused")
    parent = _lineage(stack, child)
    assert {k: v for k, v in parent["parent"].items() if k != "storage"} == {
        "uuid": checkpoint, "experiment_id": pinned, "trial_id": runs[pinned]["trial"]["id"], "steps_completed": 1,
        "named_by": "source_checkpoint_uuid"}
    assert parent["parent"]["storage"].endswith(f"/checkpoints/{pinned}")
    assert parent["data"]["version"] == 1
    assert f"parent checkpoint: {checkpoint} (experiment {pinned}" in stack.kiln("experiment", "describe",
                                                                             str(child)).stdout
    by_trial, _ = _create(stack, tmp_path, "by-trial", _config("by-trial", {"delta_table": local_table},
                                                               {"source_trial_id": runs[pinned]["trial"]["id"]}),
                          "--paused")
    by_trial_parent = _lineage(stack, by_trial)["parent"]
    assert (by_trial_parent["uuid"], by_trial_parent["named_by"]) == (checkpoint, "source_trial_id")
    for exp_id in (child, by_trial):
        assert stack.kiln("experiment", "kill", str(exp_id)).returncode == 0


def _submit(stack: Stack, cfg: str) -> Any:
    return stack.http.post("/api/v1/experiments", data={"config": cfg},
                           files={"context": ("c.tar.gz", context.pack(MODEL), "application/gzip")})


def test_a_missing_table_version_or_checkpoint_is_a_400_saying_what_and_where(kiln_stack: Stack,
                                                                             local_dir: Path) -> None:
    table = str(local_dir / "t")
    _append(table, [1], None)
    cases = [
        ({"delta_table": table, "version": 4}, None, "data.version",
         f"version 4 of '{table}' does not exist: the table's latest version is 0"),
        ({"delta_table": str(local_dir / "missing")}, None, "data.delta_table", "no Delta table"),
        ({"delta_table": f"s3://{BUCKET}-none/t"}, None, "data.delta_table", "does not exist on the stack's S3"),
        ({"delta_table": "relative/t"}, None, "data.delta_table", "absolute path"),
        ({"delta_table": table}, {"source_checkpoint_uuid": str(uuid.uuid4())}, "searcher.source_checkpoint_uuid",
         "no checkpoint"),
        ({"delta_table": table}, {"source_trial_id": 2**40}, "searcher.source_trial_id", "no trial"),
    ]
    for data, searcher, path, words in cases:
        resp = _submit(kiln_stack, _config("bad", data, searcher))
        assert resp.status_code == 400, (data, resp.text)
        body = resp.json()
        assert path in json.dumps(body) and words in json.dumps(body), (data, body)
    # The CLI says the same, not a traceback.
    bad = Path(local_dir / "bad.yaml")
    bad.write_text(_config("bad", {"delta_table": table, "version": 4}))
    out = kiln_stack.kiln("experiment", "create", str(bad), str(MODEL))
    assert out.returncode != 0 and "data.version" in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr
