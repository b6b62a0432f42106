"""The model registry's clients against a fake gateway (httpx.MockTransport): ``kiln.models.load`` (cached by
checkpoint uuid), Determined's ``Model``/``ModelVersion`` in ``kiln.experimental.client``, and ``kiln model``."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

import kiln.models
from kiln import cli
from kiln.client import APIError, Client
from kiln.experimental import client


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Registry:
    """The registry's routes as the gateway answers them, over two checkpoints."""

    def __init__(self) -> None:
        self.models: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.downloads: list[str] = []
        self.requests: list[tuple[str, str, Any]] = []
        self.files = {"ck-1": {"model.pt": b"one", "sub/state.json": b"{}"}, "ck-2": {"model.pt": b"two"}}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path
        body = json.loads(request.read()) if request.method == "POST" else None
        self.requests.append((method, path, body))
        parts = path.split("/")[3:]  # after /api/v1
        if parts[0] == "checkpoints" and parts[-1] == "download":
            self.downloads.append(parts[1])
            return httpx.Response(200, content=_tar(self.files[parts[1]]))
        if parts == ["models"] and method == "POST":
            m = {"id": len(self.models) + 1, "name": body["name"], "description": body["description"],
                 "labels": body["labels"], "metadata": body["metadata"], "owner": "ann",
                 "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z", "num_versions": 0,
                 "last_version": 0}
            if body["name"] in self.models:
                return httpx.Response(409, json={"status_code": 409, "detail": "exists already"})
            self.models[body["name"]] = m
            self.versions[body["name"]] = []
            return httpx.Response(201, json=m)
        if parts == ["models"]:
            wanted = request.url.params.get_list("label")
            return httpx.Response(200, json=[m for m in sorted(self.models.values(), key=lambda m: m["name"])
                                             if set(wanted) <= set(m["labels"])])
        name = next((n for n, m in self.models.items() if parts[1] in (n, str(m["id"]))), None)
        if name is None:
            return httpx.Response(404, json={"status_code": 404, "detail": f"model {parts[1]!r} not found"})
        m, versions = self.models[name], self.versions[name]
        if len(parts) == 2:
            return httpx.Response(200, json=m)
        if parts[2] == "metadata":
            m["labels"] = [la for la in [*m["labels"], *[a for a in body["add_labels"] if a not in m["labels"]]]
                           if la not in body["remove_labels"]]
            m["metadata"] = {k: v for k, v in {**m["metadata"], **body["set_metadata"]}.items()
                             if k not in body["remove_metadata"]}
            m["description"] = body.get("description", m["description"])
            return httpx.Response(202, json=m)
        if parts[2] == "versions" and len(parts) == 3 and method == "POST":
            m["last_version"] += 1
            m["num_versions"] += 1
            v = {"model_id": m["id"], "model_name": name, "version": m["last_version"],
                 "checkpoint_uuid": body["checkpoint_uuid"], "experiment_id": 3, "trial_id": 4,
                 "steps_completed": 10, "checkpoint_state": "COMPLETED", "name": body["name"],
                 "comment": body["comment"], "metadata": body["metadata"], "registered_by": "ann",
                 "registered_at": "2025-01-02T00:00:00Z",
                 "checkpoint": {"uuid": body["checkpoint_uuid"], "trial_id": 4, "experiment_id": 3,
                                "steps_completed": 10, "storage": "s3://kiln/x", "resources": {"model.pt": 3},
                                "metadata": {}, "reported_at": "2025-01-01T00:00:00Z"}}
            versions.append(v)
            return httpx.Response(201, json=v)
        if parts[2] == "versions" and len(parts) == 3:
            return httpx.Response(200, json=versions[::-1] if request.url.params.get("order") == "desc" else versions)
        if parts[2] == "versions":
            wanted = versions[-1:] if parts[3] == "latest" else [v for v in versions if str(v["version"]) == parts[3]]
            if not wanted:
                return httpx.Response(404, json={"status_code": 404, "detail": f"no version {parts[3]}"})
            return httpx.Response(200, json=wanted[0])
        return httpx.Response(404, json={"status_code": 404, "detail": f"no route {method} {path}"})


def _session(gateway: Registry) -> Client:
    session = Client("http://gateway.test", token="")
    session._http = httpx.Client(base_url="http://gateway.test", transport=httpx.MockTransport(gateway))
    return session


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Registry:
    fake = Registry()
    monkeypatch.setattr(client, "_session", None)
    client._use(_session(fake))
    monkeypatch.setattr(cli, "_client", lambda: _session(fake))
    return fake


def test_load_downloads_a_version_once_and_caches_it_by_checkpoint(gateway: Registry, tmp_path: Path) -> None:
    session = _session(gateway)
    session.create_model("digits")
    session.register_model_version("digits", "ck-1")
    path = kiln.models.load("digits", client=session, cache=tmp_path)
    assert path == tmp_path / "ck-1"
    assert (path / "model.pt").read_bytes() == b"one" and (path / "sub" / "state.json").read_bytes() == b"{}"
    session.register_model_version("digits", "ck-2")
    assert (kiln.models.load("digits", client=session, cache=tmp_path) / "model.pt").read_bytes() == b"two"
    assert kiln.models.load("digits", version=1, client=session, cache=tmp_path) == path
    assert kiln.models.load("digits", version="1", client=session, cache=tmp_path) == path
    assert gateway.downloads == ["ck-1", "ck-2"]  # the third and fourth load read the cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck-1", "ck-2"]  # no scratch directory left
    with pytest.raises(ValueError, match="a model version is a number"):
        kiln.models.load("digits", version="v2", client=session, cache=tmp_path)
    with pytest.raises(APIError) as missing:
        kiln.models.load("nope", client=session, cache=tmp_path)
    assert missing.value.status == 404


def test_an_interrupted_load_leaves_nothing_in_the_cache(gateway: Registry, tmp_path: Path) -> None:
    session = _session(gateway)
    session.create_model("digits")
    session.register_model_version("digits", "ck-1")
    gateway.files["ck-1"] = {}
    broken = session.download_checkpoint

    def fail(uuid: str, target: Path) -> list[str]:
        broken(uuid, target)
        raise OSError("connection lost")

    session.download_checkpoint = fail  # type: ignore[method-assign]
    with pytest.raises(OSError, match="connection lost"):
        kiln.models.load("digits", client=session, cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_load_uses_the_configured_cache(gateway: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    assert kiln.models.cache_dir() == tmp_path / "cache" / "checkpoints"
    monkeypatch.delenv("KILN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kiln.models.cache_dir() == tmp_path / "xdg" / "kiln" / "checkpoints"


def test_determined_model_shape(gateway: Registry, tmp_path: Path) -> None:
    model = client.create_model("digits", description="cnn", labels=["a", "b"], metadata={"k": 1})
    assert (model.name, model.description, model.labels, model.metadata, model.username) == \
        ("digits", "cnn", ["a", "b"], {"k": 1}, "ann")
    assert model.get_version() is None  # no versions yet: None, as in Determined
    first = model.register_version("ck-1")
    assert (first.model_version, first.version, first.model_name, first.checkpoint.uuid) == (1, 1, "digits", "ck-1")
    model.register_version("ck-2")
    latest = client.get_model("digits").get_version()
    assert latest is not None and latest.version == 2 and latest.checkpoint.uuid == "ck-2"
    assert client.get_model("digits").get_version(-1).version == 2  # type: ignore[union-attr]
    assert client.get_model(1).get_version(1).checkpoint.uuid == "ck-1"  # type: ignore[union-attr]
    assert [v.version for v in model.get_versions()] == [2, 1]
    path = client.get_model("digits").get_version(1).checkpoint.download(tmp_path / "v1")  # type: ignore[union-attr]
    assert (Path(path) / "model.pt").read_bytes() == b"one"

    model.set_labels(["b", "c"])
    assert model.labels == ["b", "c"]
    model.add_metadata({"k": 2, "new": [1]})
    model.remove_metadata(["new"])
    assert model.metadata == {"k": 2}
    model.set_description("better")
    assert model.description == "better"
    with pytest.raises(ValueError, match="list of strings"):
        model.remove_metadata("k")  # type: ignore[arg-type]
    client.create_model("alpha", labels=["b"])
    assert [m.name for m in client.list_models()] == ["alpha", "digits"]
    assert [m.name for m in client.list_models(labels=["c"])] == ["digits"]
    assert [m.name for m in client.list_models(order_by=client.OrderBy.DESC)] == ["digits", "alpha"]
    with pytest.raises(APIError) as taken:
        client.create_model("digits")
    assert taken.value.status == 409


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


def test_the_model_commands(gateway: Registry, tmp_path: Path) -> None:
    out = _run("model", "create", "digits", "--description", "cnn", "--label", "prod", "--metadata", "acc=0.97",
               "--metadata", "framework=torch")
    assert out.exit_code == 0 and "Created model digits (id 1)" in out.output
    assert gateway.requests[-1][2] == {"name": "digits", "description": "cnn", "labels": ["prod"],
                                       "metadata": {"acc": 0.97, "framework": "torch"}}
    out = _run("model", "register-version", "digits", "ck-1", "--comment", "first")
    assert out.exit_code == 0 and "Registered checkpoint ck-1 as version 1 of model digits" in out.output
    listed = _run("model", "list")
    assert listed.output.splitlines()[0].split()[:3] == ["NAME", "VERSIONS", "OWNER"]
    assert listed.output.splitlines()[1].split()[:3] == ["digits", "1", "ann"]
    assert json.loads(_run("model", "list", "--label", "none", "--json").output) == []
    described = _run("model", "describe", "digits")
    assert "labels: prod" in described.output and "ck-1" in described.output and "first" in described.output
    assert json.loads(_run("model", "describe", "digits", "--json").output)["versions"][0]["version"] == 1
    versions = json.loads(_run("model", "list-versions", "digits", "--json").output)
    assert [v["checkpoint_uuid"] for v in versions] == ["ck-1"]
    labelled = json.loads(_run("model", "label", "add", "digits", "new", "--json").output)
    assert labelled["labels"] == ["prod", "new"]
    assert "labels = new" in _run("model", "label", "remove", "digits", "prod").output
    assert json.loads(_run("model", "metadata", "set", "digits", "layers=[1, 2]", "--json").output)["metadata"] == \
        {"acc": 0.97, "framework": "torch", "layers": [1, 2]}
    assert '"framework": "torch"' not in _run("model", "metadata", "remove", "digits", "framework").output
    assert "description = 'better'" in _run("model", "set", "description", "digits", "better").output
    got = json.loads(_run("model", "download", "digits", "--output", str(tmp_path / "d"), "--json").output)
    assert got["version"] == 1 and got["files"] == ["model.pt", "sub/state.json"]
    assert (tmp_path / "d" / "model.pt").read_bytes() == b"one"
    # Mistakes are said plainly, with exit code 1 or 2.
    bad = _run("model", "metadata", "set", "digits", "novalue")
    assert bad.exit_code == 1 and "entry 'novalue' is not KEY=VALUE" in bad.output
    assert _run("model", "download", "digits", "--version", "v1").exit_code == 1
    missing = _run("model", "describe", "nope")
    assert missing.exit_code == 1 and "model 'nope' not found" in missing.output
