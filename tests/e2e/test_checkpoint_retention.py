"""Checkpoint retention and the checkpoint commands on the real stack: objects counted in the real store."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import httpx
import pytest

from deploy import parts, stack
from schemas import context as code_context
from schemas.trial import checkpoint_prefix
from tests.e2e.conftest import Stack, wait_for

pytestmark = pytest.mark.e2e

# One trial, five steps: a validation ("loss") and a two-file checkpoint at each. Best loss at step 2.
LOSSES = [0.5, 0.2, 0.4, 0.3, 0.6]
TRAIN = textwrap.dedent(f"""\
    import kiln as det

    with det.core.init() as ctx:
        for step, loss in enumerate({LOSSES!r}, 1):
            ctx.train.report_validation_metrics(steps_completed=step, metrics={{"loss": loss}})
            with ctx.checkpoint.store_path({{"steps_completed": step}}) as (path, _):
                (path / "state.txt").write_text(str(step))
                (path / "weights" ).mkdir()
                (path / "weights" / "w.bin").write_bytes(bytes(range(256)) * step)
""")
CONFIG = textwrap.dedent("""\
    name: retention
    entrypoint: python3 train.py
    searcher: {name: single, metric: loss, max_length: {batches: 5}}
""")


def _objects(s: Stack, experiment_id: int) -> dict[str, int]:
    """Checkpoint uuid -> how many objects it has in the real store."""
    cfg = stack.parts_config(s.cfg, s.creds)
    out: dict[str, int] = {}
    for o in parts.s3_client(cfg).list_objects(cfg.s3_buckets[0], prefix=checkpoint_prefix(experiment_id) + "/",
                                               recursive=True):
        uuid = o.object_name.split("/")[2]
        out[uuid] = out.get(uuid, 0) + 1
    return out


def _checkpoints(s: Stack, experiment_id: int, headers: dict[str, str] | None = None) -> list[dict[str, object]]:
    resp = s.http.get(f"/api/v1/experiments/{experiment_id}/checkpoints", headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _by_step(rows: list[dict[str, object]]) -> dict[int, dict[str, object]]:
    return {int(r["steps_completed"]): r for r in rows}  # type: ignore[call-overload]


def test_retention_and_checkpoint_commands(kiln_stack: Stack, tmp_path: Path) -> None:
    s = kiln_stack
    model = tmp_path / "model"
    model.mkdir()
    (model / "train.py").write_text(TRAIN)
    (model / "notes.txt").write_text("submitted as is\n")
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    submitted_at = time.time()
    out = s.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(model))
    assert out.returncode == 0, out.stderr
    experiment_id = int(out.stdout.split("Created experiment ", 1)[1].split()[0])
    wait_for(lambda: s.http.get(f"/api/v1/experiments/{experiment_id}").json()["state"] == "COMPLETED",
             timeout=180.0, what="the experiment to complete")

    # Default retention (save_trial_best 1, save_trial_latest 1): the best (step 2) and the latest (step 5) stay.
    rows = wait_for(lambda: (r := _checkpoints(s, experiment_id)) and
                    sum(c["state"] == "DELETED" for c in r) == 3 and r, timeout=60.0, what="retention")
    steps = _by_step(rows)
    assert {st for st, c in steps.items() if c["state"] == "COMPLETED"} == {2, 5}
    assert steps[2]["metric"] == 0.2 and steps[2]["searcher_metric"] == "loss"
    # objects per checkpoint: the two written, kiln's metadata and kiln's manifest (not among the resources)
    files = len(steps[5]["resources"]) + 1  # type: ignore[arg-type]
    assert files >= 3
    kept = {str(steps[2]["uuid"]), str(steps[5]["uuid"])}
    assert _objects(s, experiment_id) == {u: files for u in kept}  # the others' objects really left the store

    # CLI: list, describe (JSON), the best checkpoint by the searcher metric.
    listed = s.kiln("checkpoint", "list", str(experiment_id))
    assert listed.returncode == 0 and listed.stdout.count("DELETED") == 3, listed.stdout + listed.stderr
    described = s.kiln("checkpoint", "describe", str(steps[2]["uuid"]), "--json")
    assert described.returncode == 0 and '"state": "COMPLETED"' in described.stdout
    best_dir = tmp_path / "best"
    top = s.kiln("experiment", "download", str(experiment_id), "--top-n", "1", "--output", str(best_dir))
    assert top.returncode == 0, top.stderr
    assert [p.name for p in best_dir.iterdir()] == [str(steps[2]["uuid"])]
    got = best_dir / str(steps[2]["uuid"])
    assert (got / "state.txt").read_text() == "2" and (got / "weights" / "w.bin").read_bytes() == bytes(range(256)) * 2
    for f in (got / "state.txt", got / "weights" / "w.bin"):  # dated when stored, not 1970
        assert submitted_at - 5 <= f.stat().st_mtime <= time.time() + 5, f

    # A deleted checkpoint's download is 410.
    gone = s.http.get(f"/api/v1/checkpoints/{steps[1]['uuid']}/download")
    assert gone.status_code == 410, gone.text

    # The code exactly as submitted: the same bytes as the context and the same files.
    context = s.http.get(f"/api/v1/experiments/{experiment_id}/context")
    assert context.status_code == 200
    assert context.content == code_context.pack(model)
    code_dir = tmp_path / "code"
    assert s.kiln("experiment", "download-code", str(experiment_id), str(code_dir)).returncode == 0
    assert sorted(p.name for p in code_dir.iterdir()) == ["notes.txt", "train.py"]
    assert (code_dir / "train.py").read_text() == TRAIN and (code_dir / "notes.txt").read_text() == "submitted as is\n"

    # Another user sees none of it and deletes nothing.
    assert s.http.post("/api/v1/users", json={"username": "mallory", "password": "mallory-pass-123"}).status_code \
        in (201, 409)
    other = {"Authorization": f"Bearer {s.login('mallory', 'mallory-pass-123')}"}
    uuid = str(steps[5]["uuid"])
    trial_id = steps[5]["trial_id"]
    for method, url in [("GET", f"/api/v1/experiments/{experiment_id}/checkpoints"),
                        ("GET", f"/api/v1/trials/{trial_id}/checkpoints"),
                        ("GET", f"/api/v1/checkpoints/{uuid}"), ("GET", f"/api/v1/checkpoints/{uuid}/download"),
                        ("DELETE", f"/api/v1/checkpoints/{uuid}"),
                        ("GET", f"/api/v1/experiments/{experiment_id}/context"),
                        ("POST", f"/api/v1/experiments/{experiment_id}/gc-policy")]:
        resp = httpx.request(method, s.cfg.master_url + url, headers=other, timeout=30.0,
                             json={"save_trial_best": 0} if method == "POST" else None)
        assert resp.status_code == 403, (method, url, resp.status_code, resp.text)
    assert _objects(s, experiment_id) == {u: files for u in kept}

    # Changing the policy collects at once: keep only the latest.
    changed = s.kiln("experiment", "set", "gc-policy", str(experiment_id), "--save-trial-best", "0")
    assert changed.returncode == 0, changed.stderr
    wait_for(lambda: _objects(s, experiment_id) == {uuid: files}, timeout=60.0, what="the policy change to collect")
    wait_for(lambda: _by_step(_checkpoints(s, experiment_id))[2]["state"] == "DELETED", timeout=30.0,
             what="the tracker to mark it deleted")

    # An explicit delete (the owner here is the admin): the objects leave, a later download is 410.
    deleted = s.kiln("checkpoint", "delete", uuid, "--yes")
    assert deleted.returncode == 0 and f"{files} objects removed" in deleted.stdout, deleted.stdout + deleted.stderr
    assert _objects(s, experiment_id) == {}
    assert s.http.get(f"/api/v1/checkpoints/{uuid}/download").status_code == 410
    wait_for(lambda: s.http.get(f"/api/v1/checkpoints/{uuid}").json()["state"] == "DELETED", timeout=30.0,
             what="the explicit delete to be projected")

