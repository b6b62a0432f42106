"""``kiln.experimental.client`` in Determined's SDK shape, against a fake gateway (httpx.MockTransport)."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln.client import Client
from kiln.experimental import client
from kiln.experimental.client import CheckpointSortBy, ExperimentState, OrderBy, TrialState
from schemas.checkpoint import CorruptCheckpoint


def _checkpoint(uuid: str, trial_id: int, steps: int, metric: float | None, state: str = "COMPLETED") -> dict[str, Any]:
    return {"uuid": uuid, "trial_id": trial_id, "experiment_id": 7, "steps_completed": steps, "storage": "s3://kiln/x",
            "resources": {"model.pt": 3}, "metadata": {"steps_completed": steps}, "reported_at": "2025-01-01T00:00:00Z",
            "state": state, "searcher_metric": "loss", "metric": metric}


CHECKPOINTS = [_checkpoint("a", 1, 10, 0.5), _checkpoint("b", 1, 20, 0.2), _checkpoint("c", 2, 10, None),
               _checkpoint("d", 2, 20, 0.1, state="DELETED")]
VALIDATIONS = {1: [{"kind": "validation", "steps_completed": 10, "metrics": {"loss": 0.5, "acc": 0.9}},
                   {"kind": "validation", "steps_completed": 20, "metrics": {"loss": 0.2, "acc": 0.7}}],
               2: [{"kind": "validation", "steps_completed": 10, "metrics": {"acc": 0.95}}]}


class FakeGateway:
    """The few routes the SDK uses; the experiment ends after ``polls_to_end`` reads."""

    def __init__(self, polls_to_end: int = 2) -> None:
        self.polls_to_end = polls_to_end
        self.state = "ACTIVE"
        self.requests: list[httpx.Request] = []
        self.submitted: dict[str, Any] = {}
        self.served = b"abc"  # model.pt's bytes in the checkpoint's tar

    def experiment(self) -> dict[str, Any]:
        return {"id": 7, "name": "digits", "description": "", "labels": [], "state": self.state,
                "searcher_metric": "loss", "smaller_is_better": True, "config": {"name": "digits"}, "progress": 0.5,
                "end_reason": ""}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, method, params = request.url.path, request.method, request.url.params
        if method == "POST" and path == "/api/v1/experiments":
            body = request.read()
            self.submitted = {"body": body}
            return httpx.Response(201, json={"id": 7, "warnings": ["bind_mounts: ignored"], "context_digest": "x"})
        if method == "POST" and path == "/api/v1/auth/login":
            creds = json.loads(request.read())
            if creds["password"] != "pw":
                return httpx.Response(401, json={"status_code": 401, "detail": "no"})
            return httpx.Response(201, json={"token": "T0K", "token_id": 1, "expires_at": None,
                                             "username": creds["username"], "admin": False})
        if path == "/api/v1/experiments/7":
            if self.polls_to_end == 0:
                self.state = "COMPLETED"
            self.polls_to_end -= 1
            return httpx.Response(200, json=self.experiment())
        if method == "POST" and path.startswith("/api/v1/experiments/7/"):
            action = path.rsplit("/", 1)[1]
            self.state = {"kill": "STOPPING_CANCELED", "pause": "PAUSED", "activate": "ACTIVE"}[action]
            self.polls_to_end = 10**6
            return httpx.Response(200, json={"id": 7, "state": self.state})
        if path == "/api/v1/experiments/7/trials":
            return httpx.Response(200, json=[self.trial(2), self.trial(1)])
        if path == "/api/v1/experiments/7/checkpoints":
            found = [c for c in CHECKPOINTS if params.get("state") in (None, c["state"])]
            if params.get("sort_by") == "metric":
                found.sort(key=lambda c: (c["metric"] is None, c["metric"] or 0.0))
            return httpx.Response(200, json=found[: int(params.get("limit", 1000))])
        if path.startswith("/api/v1/trials/"):
            parts = path.split("/")
            trial_id = int(parts[4])
            if len(parts) == 5:
                return httpx.Response(200, json=self.trial(trial_id))
            if parts[5] == "checkpoints":
                return httpx.Response(200, json=[c for c in CHECKPOINTS if c["trial_id"] == trial_id])
            if parts[5] == "metrics":
                return httpx.Response(200, json=VALIDATIONS[trial_id])
            if parts[5] == "logs":
                lines = [{"allocation_id": "x", "line_no": i, "stream": "stdout", "ts": "2025-01-01T00:00:00Z",
                          "text": f"line {i}"} for i in range(5)]
                limit, offset = int(params["limit"]), int(params.get("offset", 0))
                picked = lines[-limit:] if params.get("tail") == "true" else lines[offset:offset + limit]
                return httpx.Response(200, json=picked)
        if path == "/api/v1/checkpoints/b":
            return httpx.Response(200, json=CHECKPOINTS[1])
        if path == "/api/v1/checkpoints/b/download":
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:") as tar:
                info = tarfile.TarInfo("model.pt")
                info.size = 3
                tar.addfile(info, io.BytesIO(self.served))
            return httpx.Response(200, content=buf.getvalue())
        if path == "/api/v1/checkpoints/b/files":
            return httpx.Response(200, json={"uuid": "b", "steps_completed": 20, "framework": "", "hashed": True,
                                             "files": {"model.pt": {"size": 3, "sha256": hashlib.sha256(b"abc")
                                                                    .hexdigest(), "mtime": 1_600_000_000.25}}})
        return httpx.Response(404, json={"status_code": 404, "detail": f"no route {method} {path}"})

    def trial(self, trial_id: int) -> dict[str, Any]:
        return {"id": trial_id, "experiment_id": 7, "hparams": {"lr": 0.1 * trial_id}, "state": "COMPLETED",
                "steps_completed": 20, "restarts": 0, "best_metric": 0.2, "latest_validation": None}


def _fake_session(gateway: Any, token: str | None = None) -> Client:
    session = Client("http://gateway.test", token="")
    session._http = httpx.Client(base_url="http://gateway.test", transport=httpx.MockTransport(gateway),
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    return session


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> FakeGateway:
    fake = FakeGateway()
    monkeypatch.setattr(client, "_session", None)
    client._use(_fake_session(fake))
    monkeypatch.setattr(client.time, "sleep", lambda _s: None)
    return fake


def test_create_wait_and_download_the_top_checkpoint(gateway: FakeGateway, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "train.py").write_text("print('hi')\n")
    exp = client.create_experiment({"name": "digits", "entrypoint": "python3 train.py"}, model)
    assert exp.id == 7 and exp.state is ExperimentState.ACTIVE
    assert b"entrypoint: python3 train.py" in gateway.submitted["body"]
    assert exp.wait(interval=0) is ExperimentState.COMPLETED
    best = exp.top_checkpoint()
    assert best.uuid == "b" and best.steps_completed == 20 and best.metadata == {"steps_completed": 20}
    path = best.download(tmp_path / "out")
    assert Path(path, "model.pt").read_bytes() == b"abc"
    assert Path(path, "model.pt").stat().st_mtime == 1_600_000_000.25  # the recorded time, to the fraction


def test_a_download_that_does_not_match_the_recorded_hash_is_an_error_not_a_file(gateway: FakeGateway,
                                                                                 tmp_path: Path) -> None:
    gateway.served = b"abd"
    with pytest.raises(CorruptCheckpoint, match="checkpoint b arrived corrupted: model.pt: sha256"):
        client.get_checkpoint("b").download(tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()


def test_create_waits_for_the_read_model_to_show_the_experiment(gateway: FakeGateway, tmp_path: Path) -> None:
    unseen = [2]
    handler = gateway.__call__

    def lagging(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/experiments/7" and unseen[0] > 0:
            unseen[0] -= 1
            return httpx.Response(404, json={"status_code": 404, "detail": "experiment 7 not found"})
        return handler(request)

    client._use(_fake_session(lagging))
    assert client.create_experiment("name: x\nentrypoint: y\n", tmp_path).id == 7
    assert unseen == [0]


def test_config_from_a_path_or_yaml_text(gateway: FakeGateway, tmp_path: Path) -> None:
    cfg = tmp_path / "const.yaml"
    cfg.write_text("name: from-file\n")
    client.create_experiment(str(cfg), tmp_path)
    assert b"name: from-file" in gateway.submitted["body"]
    session = client._client()
    submit = session.create_experiment
    packed: list[list[str]] = []

    def spy(config_yaml: str, context_dir: Path) -> dict[str, Any]:
        packed.append(sorted(p.name for p in context_dir.iterdir()))
        return submit(config_yaml, context_dir)

    session.create_experiment = spy  # type: ignore[method-assign]
    client.create_experiment("name: inline\nentrypoint: x\n", None, includes=[cfg])
    assert b"name: inline" in gateway.submitted["body"] and packed == [["const.yaml"]]
    with pytest.raises(FileNotFoundError):
        client.create_experiment(str(tmp_path / "missing.yaml"), tmp_path)


def test_controls_and_a_paused_wait(gateway: FakeGateway) -> None:
    exp = client.get_experiment(7)
    exp.pause()
    assert exp.state is ExperimentState.PAUSED
    with pytest.raises(ValueError, match="paused"):
        exp.wait(interval=0)
    exp.activate()
    assert exp.state is ExperimentState.ACTIVE
    exp.kill()
    assert exp.state is ExperimentState.STOPPING_CANCELED


def test_trials_in_id_order_with_their_checkpoints_and_logs(gateway: FakeGateway) -> None:
    exp = client.get_experiment(7)
    trials = exp.list_trials()
    assert [t.id for t in trials] == [1, 2] == [t.id for t in exp.get_trials()]
    assert trials[0].state is TrialState.COMPLETED and trials[0].hparams == {"lr": 0.1}
    trial = client.get_trial(1)
    assert [c.uuid for c in trial.list_checkpoints()] == ["b", "a"]
    assert trial.top_checkpoint().uuid == "b"
    assert trial.top_checkpoint(sort_by="acc", smaller_is_better=False).uuid == "a"
    assert list(trial.logs()) == [f"line {i}" for i in range(5)]
    assert list(trial.logs(head=2)) == ["line 0", "line 1"]
    assert list(trial.logs(tail=2)) == ["line 3", "line 4"]


def test_checkpoint_sorting(gateway: FakeGateway) -> None:
    exp = client.get_experiment(7)
    assert [c.uuid for c in exp.list_checkpoints()] == ["d", "b", "a", "c"]  # the gateway's ranking
    by_steps = exp.list_checkpoints(sort_by=CheckpointSortBy.BATCH_NUMBER, order_by=OrderBy.DESC, max_results=2)
    assert [c.steps_completed for c in by_steps] == [20, 20]
    assert [c.uuid for c in exp.list_checkpoints(sort_by="acc", order_by=OrderBy.DESC)] == ["c", "a", "b", "d"]
    # Another metric, or the other direction: only checkpoints with files, ranked here.
    assert exp.top_checkpoint(sort_by="acc", smaller_is_better=False).uuid == "c"
    assert exp.top_checkpoint(smaller_is_better=False).uuid == "a"
    with pytest.raises(ValueError, match="both"):
        exp.list_checkpoints(sort_by="acc")


def test_get_checkpoint(gateway: FakeGateway) -> None:
    ckpt = client.get_checkpoint("b")
    assert (ckpt.uuid, ckpt.trial_id, ckpt.experiment_id, ckpt.searcher_metric_value) == ("b", 1, 7, 0.2)
    assert ckpt.report_time is not None and ckpt.report_time.year == 2025


def test_login_with_a_password_sends_the_new_token(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGateway()
    sessions: list[Client] = []

    def fake_client(master: str, token: str | None = None) -> Client:
        sessions.append(_fake_session(fake, token))
        return sessions[-1]

    monkeypatch.setattr(client, "_session", None)
    monkeypatch.setattr(client, "Client", fake_client)
    client.login(master="http://gateway.test", user="ann", password="pw")
    client.get_experiment(7)
    assert fake.requests[-1].headers["authorization"] == "Bearer T0K"
    with pytest.raises(ValueError, match="user"):
        client.login(password="pw")


def test_login_without_password_wants_a_stored_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_AUTH_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="kiln user login bob"):
        client.login(master="http://gateway.test", user="bob")


def test_unknown_states_read_as_unspecified() -> None:
    assert ExperimentState("SOMETHING_NEW") is ExperimentState.UNSPECIFIED
    assert TrialState("SOMETHING_NEW") is TrialState.UNSPECIFIED


def test_determined_import_path_is_kiln_sdk() -> None:
    from determined.experimental import client as det_client

    assert det_client is sys.modules["kiln.experimental.client"]
