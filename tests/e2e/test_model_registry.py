"""The model registry on the real stack: a trained checkpoint registered as a model version survives a retention
policy that keeps nothing (objects counted in the real store), cannot be deleted, and ``kiln.models.load`` gives
its files, from which the digits network loads and predicts as it did when validated. Plus what is refused."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import textwrap
import uuid as uuid_module
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy import parts, stack
from schemas.trial import checkpoint_prefix
from tests.e2e.conftest import REPO, Stack, wait_for

pytestmark = pytest.mark.e2e

DIGITS = REPO / "examples" / "digits"
# Run as a user would: KILN_MASTER and KILN_TOKEN from the environment, the cache where KILN_CACHE_DIR says.
LOAD = textwrap.dedent("""\
    import json, sys
    import torch
    import kiln.models

    sys.path.insert(0, sys.argv[2])
    from model import build_model
    from train import load_data

    torch.set_num_threads(1)  # as the trial validated
    path = kiln.models.load(sys.argv[1])
    net = build_model(16)
    net.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    net.eval()
    _, _, x_val, y_val = load_data()
    with torch.no_grad():
        accuracy = (net(x_val).argmax(dim=1) == y_val).float().mean().item()
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    print(json.dumps({"path": str(path), "files": files, "accuracy": accuracy}))
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


def _checkpoints(s: Stack, experiment_id: int) -> dict[int, dict[str, Any]]:
    """The experiment's checkpoints by step."""
    resp = s.http.get(f"/api/v1/experiments/{experiment_id}/checkpoints")
    assert resp.status_code == 200, resp.text
    return {int(c["steps_completed"]): c for c in resp.json()}


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body: dict[str, Any] = resp.json()
    assert body["status_code"] == status and body["detail"]
    return body


def _other_user(s: Stack) -> httpx.Client:
    """A client signed in as ``registry-eve``, a user who is not an admin."""
    created = s.http.post("/api/v1/users", json={"username": "registry-eve", "password": "registry-eve-pw"})
    assert created.status_code in (201, 409), created.text  # 409: the other test of this module made her
    return httpx.Client(base_url=s.cfg.master_url, timeout=30.0,
                        headers={"Authorization": f"Bearer {s.login('registry-eve', 'registry-eve-pw')}"})


def test_a_registered_checkpoint_survives_retention_and_loads_as_a_model(kiln_stack: Stack, tmp_path: Path) -> None:
    s = kiln_stack
    # Three epochs, one checkpoint each, all three kept at first (save_trial_latest 3).
    out = s.kiln("experiment", "create", str(DIGITS / "const.yaml"), str(DIGITS), "--config",
                 "searcher.max_length.epochs=3", "--config", "checkpoint_storage.save_trial_latest=3")
    assert out.returncode == 0, out.stderr
    experiment_id = int(out.stdout.split("Created experiment ", 1)[1].split()[0])
    wait_for(lambda: s.http.get(f"/api/v1/experiments/{experiment_id}").json()["state"] == "COMPLETED",
             timeout=300.0, what="the digits experiment to complete")
    steps = wait_for(lambda: (c := _checkpoints(s, experiment_id)) and len(c) == 3 and c, timeout=60.0,
                     what="three checkpoints")
    assert all(c["state"] == "COMPLETED" for c in steps.values())
    first, chosen, last = (steps[k] for k in sorted(steps))
    uuid = str(chosen["uuid"])  # the middle one: neither the latest nor (by default) kept as the best
    files = len(chosen["resources"]) + 1  # and kiln's manifest
    assert _objects(s, experiment_id) == {str(c["uuid"]): files for c in steps.values()}

    # Create the model and register the checkpoint, with the CLI.
    name = f"digits-e2e-{experiment_id}"
    created = s.kiln("model", "create", name, "--description", "the digits CNN", "--label", "e2e-registry",
                     "--metadata", "framework=torch", "--json")
    assert created.returncode == 0, created.stderr
    model = json.loads(created.stdout)
    assert (model["name"], model["owner"], model["labels"], model["metadata"]) == \
        (name, "admin", ["e2e-registry"], {"framework": "torch"})
    registered = s.kiln("model", "register-version", name, uuid, "--comment", "epoch 2", "--json")
    assert registered.returncode == 0, registered.stderr
    version = json.loads(registered.stdout)
    assert (version["version"], version["checkpoint_uuid"], version["experiment_id"], version["comment"]) == \
        (1, uuid, experiment_id, "epoch 2")
    assert version["checkpoint"]["uuid"] == uuid  # the owner sees the checkpoint's record
    described = s.kiln("model", "describe", name)
    assert described.returncode == 0 and uuid in described.stdout and "epoch 2" in described.stdout
    listed = json.loads(s.kiln("model", "list", "--label", "e2e-registry", "--json").stdout)
    assert [m["name"] for m in listed if m["name"] == name] == [name]
    assert s.http.get(f"/api/v1/checkpoints/{uuid}").json()["protected"] is True

    # A registered checkpoint cannot be deleted: a clear 409, and its objects stay.
    deleted = s.kiln("checkpoint", "delete", uuid, "--yes")
    assert deleted.returncode == 1 and "registered as a model version" in deleted.stderr, deleted.stderr
    assert "HTTP 409" in deleted.stderr

    # A policy that keeps nothing collects the others at once; the registered one survives, in the store too.
    policy = s.kiln("experiment", "set", "gc-policy", str(experiment_id), "--save-experiment-best", "0",
                    "--save-trial-best", "0", "--save-trial-latest", "0")
    assert policy.returncode == 0, policy.stderr
    wait_for(lambda: _objects(s, experiment_id) == {uuid: files}, timeout=60.0, what="the others to be collected")
    now = wait_for(lambda: (c := _checkpoints(s, experiment_id)) and
                   [c[k]["state"] for k in sorted(c)] == ["DELETED", "COMPLETED", "DELETED"] and c,
                   timeout=30.0, what="the tracker to mark the others deleted")
    assert now[int(chosen["steps_completed"])]["protected"] is True

    # kiln.models.load gives the files; the digits network loads from them and predicts as it validated.
    env = {**s.env, "KILN_CACHE_DIR": str(tmp_path / "cache")}
    (tmp_path / "load.py").write_text(LOAD)
    loaded = subprocess.run([sys.executable, str(tmp_path / "load.py"), name, str(DIGITS)], env=env, text=True,
                            capture_output=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["path"] == str(tmp_path / "cache" / "checkpoints" / uuid)
    assert set(chosen["resources"]) <= set(result["files"]) and "model.pt" in result["files"]
    metrics = s.http.get(f"/api/v1/trials/{chosen['trial_id']}/metrics", params={"kind": "validation"}).json()
    reported = next(p["metrics"]["validation_accuracy"] for p in metrics
                    if p["steps_completed"] == chosen["steps_completed"])
    assert result["accuracy"] > 0.5
    assert result["accuracy"] == pytest.approx(reported, abs=1e-6)

    # Another user reads the registry but not the checkpoint's record or files, and registers none of it.
    eve = _other_user(s)
    try:
        theirs = eve.get(f"/api/v1/models/{name}/versions/latest")
        assert theirs.status_code == 200 and theirs.json()["checkpoint_uuid"] == uuid
        assert theirs.json()["checkpoint"] is None and theirs.json()["checkpoint_state"] == "COMPLETED"
        _error(eve.get(f"/api/v1/checkpoints/{uuid}/download"), 403)
        own = f"eves-{experiment_id}"
        assert eve.post("/api/v1/models", json={"name": own}).status_code == 201
        body = _error(eve.post(f"/api/v1/models/{own}/versions", json={"checkpoint_uuid": uuid}), 403)
        assert "only its owner or an admin may see" in body["detail"]
        _error(eve.post(f"/api/v1/models/{name}/versions", json={"checkpoint_uuid": uuid}), 403)
    finally:
        eve.close()

    # A deleted checkpoint cannot be registered (409), an unknown one is not found (404).
    _error(s.http.post(f"/api/v1/models/{name}/versions", json={"checkpoint_uuid": str(first["uuid"])}), 409)
    body = _error(s.http.post(f"/api/v1/models/{name}/versions", json={"checkpoint_uuid": "no-such-checkpoint"}),
                  404)
    assert "no-such-checkpoint" in body["detail"]

    # Unregistered, the checkpoint is collectable again: the next retention decision takes it.
    dropped = s.kiln("model", "delete-version", name, "1", "--yes")
    assert dropped.returncode == 0, dropped.stderr
    assert s.http.get(f"/api/v1/checkpoints/{uuid}").json()["protected"] is False
    again = s.kiln("experiment", "set", "gc-policy", str(experiment_id), "--save-trial-latest", "0")
    assert again.returncode == 0, again.stderr
    wait_for(lambda: _objects(s, experiment_id) == {}, timeout=60.0, what="the unregistered checkpoint to go")


def test_what_the_registry_refuses(kiln_stack: Stack) -> None:
    s = kiln_stack
    name = "registry-refusals"
    assert s.http.post("/api/v1/models", json={"name": name, "labels": ["x"]}).status_code == 201

    # Not signed in: 401.
    anonymous = httpx.post(f"{s.cfg.master_url}/api/v1/models", json={"name": "anon-model"}, timeout=30.0)
    _error(anonymous, 401)
    bogus = httpx.get(f"{s.cfg.master_url}/api/v1/models", headers={"Authorization": "Bearer not-a-token"},
                      timeout=30.0)
    _error(bogus, 401)

    # A taken name: 409, by the CLI too.
    _error(s.http.post("/api/v1/models", json={"name": name}), 409)
    dup = s.kiln("model", "create", name)
    assert dup.returncode == 1 and f"a model named {name!r} exists already" in dup.stderr, dup.stderr

    # Creates of one name at once: the stream's order settles it, exactly one is created and the others are 409.
    raced = f"raced-{uuid_module.uuid4().hex[:8]}"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = sorted(pool.map(lambda _: httpx.post(f"{s.cfg.master_url}/api/v1/models", json={"name": raced},
                                                     headers=s.headers, timeout=60.0).status_code, range(4)))
    assert codes == [201, 409, 409, 409]
    assert [m["name"] for m in s.http.get("/api/v1/models", params={"name": raced}).json()] == [raced]

    # Bad names and metadata: 400 naming the field and saying what was wrong.
    for bad in ("has space", "123", "a/b", "-dash", "x" * 129):
        body = _error(s.http.post("/api/v1/models", json={"name": bad}), 400)
        assert body["extra"][0]["key"] == "name" and "letters, digits" in body["detail"], body
    body = _error(s.http.post("/api/v1/models", json={"name": "meta-bad", "metadata": {"k": "a\u0000b"}}), 400)
    assert body["extra"][0]["key"] == "metadata" and "NUL" in body["detail"]
    _error(s.http.post("/api/v1/models", json={"name": "meta-bad", "unknown": 1}), 400)
    _error(s.http.get(f"/api/v1/models/{name}/versions/first"), 400)
    _error(s.http.get(f"/api/v1/models/{name}/versions/latest"), 404)  # no versions yet
    _error(s.http.get("/api/v1/models/no-such-model"), 404)
    _error(s.http.post(f"/api/v1/models/{name}/metadata", json={}), 400)  # nothing to change

    # Another user may read the model but not change, register into or delete it.
    eve = _other_user(s)
    try:
        assert eve.get(f"/api/v1/models/{name}").status_code == 200
        assert name in [m["name"] for m in eve.get("/api/v1/models", params={"label": "x"}).json()]
        for method, url, payload in [
            ("POST", f"/api/v1/models/{name}/metadata", {"add_labels": ["mine"]}),
            ("POST", f"/api/v1/models/{name}/versions", {"checkpoint_uuid": "whatever"}),
            ("DELETE", f"/api/v1/models/{name}", None),
        ]:
            body = _error(eve.request(method, url, json=payload), 403)
            assert "only its owner or an admin" in body["detail"] and "'registry-eve'" in body["detail"]
        assert s.http.get(f"/api/v1/models/{name}").json()["labels"] == ["x"]  # unchanged
    finally:
        eve.close()

    # The owner deletes the model; its name is free again.
    gone = s.kiln("model", "delete", name, "--yes", "--json")
    assert gone.returncode == 0 and json.loads(gone.stdout)["model_deleted"] is True, gone.stderr
    _error(s.http.get(f"/api/v1/models/{name}"), 404)
    assert s.http.post("/api/v1/models", json={"name": name}).status_code == 201
