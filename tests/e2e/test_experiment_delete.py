"""`kiln experiment delete` on the whole stack: only an ended experiment, only by its owner; its checkpoints' objects
leave the real store and the experiment, its trials and metrics leave the read model."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import httpx
import pytest

from deploy import parts, stack
from schemas.trial import CHECKPOINTS, TENSORBOARD
from tests.e2e.conftest import Stack, wait_for

pytestmark = pytest.mark.e2e

TRAIN = textwrap.dedent("""\
    import kiln as det

    with det.core.init() as ctx:
        for step in range(1, 4):
            ctx.train.report_training_metrics(steps_completed=step, metrics={"loss": 1 / step})
            ctx.train.report_validation_metrics(steps_completed=step, metrics={"loss": 1 / step})
            with ctx.checkpoint.store_path({"steps_completed": step}) as (path, _):
                (path / "state.txt").write_text(str(step))
""")
CONFIG = textwrap.dedent("""\
    name: doomed
    entrypoint: python3 train.py
    searcher: {name: single, metric: loss, max_length: {batches: 3}}
    checkpoint_storage: {save_trial_latest: 3}
""")


def _objects(s: Stack, experiment_id: int, prefix: str = CHECKPOINTS) -> int:
    cfg = stack.parts_config(s.cfg, s.creds)
    return sum(1 for _ in parts.s3_client(cfg).list_objects(
        cfg.s3_buckets[0], prefix=f"{prefix}/{experiment_id}/", recursive=True))


def _create(s: Stack, tmp_path: Path, *extra: str) -> int:
    out = s.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path), "--json", *extra)
    assert out.returncode == 0, out.stdout + out.stderr
    return int(json.loads(out.stdout)["id"])


def test_delete_an_ended_experiment_with_its_checkpoints_metrics_and_logs(kiln_stack: Stack, tmp_path: Path) -> None:
    s = kiln_stack
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "cfg.yaml").write_text(CONFIG)

    # Not while it can still run: a paused experiment is refused with what to do.
    paused = _create(s, tmp_path, "--paused")
    wait_for(lambda: s.http.get(f"/api/v1/experiments/{paused}").status_code == 200, what="the paused experiment")
    refused = s.kiln("experiment", "delete", str(paused), "--yes")
    assert refused.returncode != 0 and "only an ended experiment can be deleted" in refused.stderr, refused.stderr
    assert s.kiln("experiment", "kill", str(paused)).returncode == 0

    exp_id = _create(s, tmp_path)
    assert s.kiln("experiment", "wait", str(exp_id), timeout=240.0).returncode == 0
    trial_id = s.http.get(f"/api/v1/experiments/{exp_id}/trials").json()[0]["id"]
    wait_for(lambda: len(s.http.get(f"/api/v1/trials/{trial_id}/checkpoints").json()) == 3,
             what="three checkpoints in the read model")
    stored = _objects(s, exp_id)
    assert stored >= 3  # each checkpoint's file, and what the store keeps beside it
    boards = _objects(s, exp_id, TENSORBOARD)
    assert boards >= 1  # the trial's metrics as TensorBoard scalars

    # Another user may not.
    assert s.http.post("/api/v1/users", json={"username": "mallory", "password": "mallory-pass-123"}).status_code \
        in (201, 409)
    other = {"Authorization": f"Bearer {s.login('mallory', 'mallory-pass-123')}"}
    resp = httpx.delete(f"{s.cfg.master_url}/api/v1/experiments/{exp_id}", headers=other, timeout=30.0)
    assert resp.status_code == 403, resp.text
    assert _objects(s, exp_id) == stored

    out = s.kiln("experiment", "delete", str(exp_id), "--yes", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout) == {"id": exp_id, "checkpoints_deleted": 3, "objects_removed": stored + boards}
    assert _objects(s, exp_id) == _objects(s, exp_id, TENSORBOARD) == 0  # the files left before the answer

    gone = wait_for(lambda: (r := s.http.get(f"/api/v1/experiments/{exp_id}")).status_code == 404 and r,
                    what="the deletion to be projected")
    assert f"experiment {exp_id} was deleted by admin" in gone.json()["detail"]
    assert s.http.get(f"/api/v1/trials/{trial_id}").status_code == 404
    series = s.http.get(f"/api/v1/trials/{trial_id}/series", params={"name": "loss"}).json()
    assert series["series"]["loss"] == []  # its metric points left the read model too
    listed = json.loads(s.kiln("experiment", "list", "--all", "--json").stdout)
    assert exp_id not in [r["id"] for r in listed]
    # A second delete says what happened, never a 5xx.
    again = s.kiln("experiment", "delete", str(exp_id), "--yes")
    assert again.returncode != 0 and "was deleted by admin" in again.stderr, again.stderr
