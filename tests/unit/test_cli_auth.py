"""The CLI's token store (Determined ``det``-style auth.json, per master and user) and its 401 message."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from kiln import cli
from kiln import client as kc
from schemas import ports

MASTER = ports.MASTER_URL


@pytest.fixture(autouse=True)
def auth_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KILN_AUTH_DIR", str(tmp_path / "auth"))
    monkeypatch.delenv("KILN_TOKEN", raising=False)
    return tmp_path / "auth"


def test_tokens_are_kept_per_master_and_user_in_a_private_file(auth_dir: Path) -> None:
    assert kc.stored_token(MASTER) is None
    kc.store_token(MASTER + "/", "alice", "t-alice")
    kc.store_token(MASTER, "bob", "t-bob")
    kc.store_token("http://other:1", "alice", "t-other")
    assert kc.stored_token(MASTER) == ("bob", "t-bob")  # the last login is the active user
    assert stat.S_IMODE(os.stat(auth_dir / "auth.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(auth_dir).st_mode) == 0o700
    kc.forget_token(MASTER, "bob")
    assert kc.stored_token(MASTER) is None
    data = json.loads((auth_dir / "auth.json").read_text())
    assert data["masters"][MASTER]["tokens"] == {"alice": "t-alice"}
    assert kc.stored_token("http://other:1") == ("alice", "t-other")


def test_the_client_sends_kiln_token_over_the_stored_one(monkeypatch: pytest.MonkeyPatch) -> None:
    kc.store_token(MASTER, "alice", "t-alice")
    assert kc.Client(MASTER)._http.headers["authorization"] == "Bearer t-alice"
    monkeypatch.setenv("KILN_TOKEN", "t-env")
    assert kc.Client(MASTER)._http.headers["authorization"] == "Bearer t-env"
    assert "authorization" not in kc.Client(MASTER, token="")._http.headers


def test_a_401_tells_the_user_to_log_in_without_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def unauthorized(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"status_code": 401, "detail": "not signed in"})

    real = kc.Client.__init__

    def init(self: kc.Client, *args: object, **kwargs: object) -> None:
        real(self, *args, **kwargs)  # type: ignore[arg-type]
        self._http = httpx.Client(base_url=self.master, transport=httpx.MockTransport(unauthorized))

    monkeypatch.setattr(kc.Client, "__init__", init)
    result = CliRunner().invoke(cli.main, ["experiment", "list"])
    assert result.exit_code == 1
    assert "not logged in: run kiln user login" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
