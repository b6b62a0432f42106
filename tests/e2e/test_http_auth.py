"""Users, tokens and owners on the whole stack: no token is 401, another user is 403 and changes nothing, the
owner and an admin may; a revoked token is 401; token values appear in no log and no table."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from schemas import context
from tests.e2e.conftest import REPO, Stack, wait_for

pytestmark = pytest.mark.e2e

TRAIN = textwrap.dedent("""\
    import sys, time
    import kiln as det

    with det.core.init() as ctx:
        for step in range(1, 601):
            time.sleep(0.2)
            ctx.train.report_training_metrics(steps_completed=step, metrics={"loss": 1.0 / step})
            if ctx.preempt.should_preempt():
                sys.exit(0)
""")
CONFIG = textwrap.dedent("""\
    name: owned
    entrypoint: python3 train.py
    searcher: {name: single, metric: loss, max_length: {batches: 600}}
""")
CHANGES = ("ExperimentKillRequested", "TrialKillRequested", "ExperimentPauseRequested", "ExperimentActivateRequested",
           "ExperimentResourcesChanged")


_wait = functools.partial(wait_for, timeout=90.0)


def _cli(s: Stack, auth_dir: Path, *args: str, stdin: str | None = None,
         token: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user of its own: its auth file in ``auth_dir``, no KILN_TOKEN unless given."""
    env = {k: v for k, v in s.env.items() if k != "KILN_TOKEN"}
    env["KILN_AUTH_DIR"] = str(auth_dir)
    if token is not None:
        env["KILN_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], cwd=REPO, env=env, text=True, input=stdin,
                          capture_output=True, timeout=120)


def _ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _stored(auth_dir: Path, master: str) -> tuple[str, str]:
    entry = json.loads((auth_dir / "auth.json").read_text())["masters"][master]
    return entry["active_user"], entry["tokens"][entry["active_user"]]


def test_users_tokens_and_owners(kiln_stack: Stack, tmp_path: Path) -> None:
    s, api, master = kiln_stack, kiln_stack.cfg.master_url, kiln_stack.cfg.master_url
    tokens = [s.token]

    # Without a token: 401 for every route but /health and the schema, which declares the bearer scheme.
    assert httpx.get(f"{api}/health").status_code == 200
    spec = httpx.get(f"{api}/schema/openapi.json").json()
    assert spec["components"]["securitySchemes"]["BearerToken"]["scheme"] == "bearer"
    for method, path in (("GET", "/api/v1/experiments"), ("POST", "/api/v1/experiments/1/kill"),
                         ("GET", "/api/v1/me"), ("GET", "/api/v1/users"), ("POST", "/api/v1/trials/1/kill")):
        resp = httpx.request(method, f"{api}{path}")
        assert resp.status_code == 401, (path, resp.text)
        assert "kiln user login" in resp.json()["detail"]
    bad = httpx.post(f"{api}/api/v1/experiments", data={"config": CONFIG},
                     files={"context": ("c.tar.gz", b"x", "application/gzip")})
    assert bad.status_code == 401
    assert httpx.post(f"{api}/api/v1/auth/login", json={"username": "admin", "password": "wrong"}).status_code == 401

    # The admin (the stack's, signed in by the test stack) creates two users; a non-admin may not.
    admin_dir, alice_dir, bob_dir = tmp_path / "admin", tmp_path / "alice", tmp_path / "bob"
    _ok(_cli(s, admin_dir, "user", "login", "admin", "--password-stdin", stdin=s.creds.admin_password + "\n"))
    assert "'admin' (admin)" in _ok(_cli(s, admin_dir, "user", "whoami"))
    _ok(_cli(s, admin_dir, "user", "create", "alice", "--password-stdin", stdin="alice-password\n"))
    _ok(_cli(s, admin_dir, "user", "create", "bob", "--password-stdin", stdin="bob-password\n"))
    users = json.loads(_ok(_cli(s, admin_dir, "user", "list", "--json")))
    listed = {u["username"]: u["admin"] for u in users}  # other tests on this stack add users of their own
    mine = {name: listed.get(name) for name in ("admin", "alice", "bob")}
    assert mine == {"admin": True, "alice": False, "bob": False}
    tokens.append(_stored(admin_dir, master)[1])

    # alice and bob sign in through the CLI; the token is stored per master and user, mode 0600.
    _ok(_cli(s, alice_dir, "user", "login", "alice", "--password-stdin", stdin="alice-password\n"))
    _ok(_cli(s, bob_dir, "user", "login", "bob", "--password-stdin", stdin="bob-password\n"))
    assert stat.S_IMODE(os.stat(alice_dir / "auth.json").st_mode) == 0o600
    user, alice_token = _stored(alice_dir, master)
    assert user == "alice"
    bob_token = _stored(bob_dir, master)[1]
    tokens += [alice_token, bob_token]
    assert "'alice'" in _ok(_cli(s, alice_dir, "user", "whoami"))
    denied = _cli(s, bob_dir, "user", "create", "mallory", "--password-stdin", stdin="mallory-password\n")
    assert denied.returncode == 1 and "admin" in denied.stderr

    # alice submits; she is the owner whatever the form says.
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    exp_ids = []
    for _ in range(2):
        out = _ok(_cli(s, alice_dir, "experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path)))
        exp_ids.append(int(out.split("Created experiment ", 1)[1].split()[0]))
    claimed = httpx.post(f"{api}/api/v1/experiments", headers=_as(bob_token),
                         data={"config": CONFIG, "submitted_by": "alice"},
                         files={"context": ("c.tar.gz", context.pack(tmp_path), "application/gzip")})
    assert claimed.status_code == 201, claimed.text
    bobs = claimed.json()["id"]
    first, second = exp_ids
    owners = {e: _wait(lambda e=e: s.http.get(f"/api/v1/experiments/{e}").json().get("submitted_by"),
                       what="experiment projected") for e in (first, second, bobs)}
    assert owners == {first: "alice", second: "alice", bobs: "bob"}
    assert s.http.post(f"/api/v1/experiments/{bobs}/kill").status_code == 202  # (the admin's)
    trial = _wait(lambda: next((t for t in s.http.get(f"/api/v1/experiments/{first}/trials").json()
                                if t["state"] == "RUNNING"), None), what="alice's trial running")

    # bob may read alice's experiment but change nothing about it: 403, and nothing reaches the bus.
    with httpx.Client(base_url=api, headers=_as(bob_token), timeout=30) as bob:
        assert bob.get(f"/api/v1/experiments/{first}").status_code == 200
        assert bob.get(f"/api/v1/trials/{trial['id']}/metrics").status_code == 200
        for path, body in (("kill", None), ("pause", None), ("activate", None), ("resources", {"priority": 1})):
            resp = bob.post(f"/api/v1/experiments/{first}/{path}", json=body)
            assert resp.status_code == 403, (path, resp.text)
            assert "alice" in resp.json()["detail"]
        assert bob.post(f"/api/v1/trials/{trial['id']}/kill").status_code == 403
    killed_by_bob = _cli(s, bob_dir, "experiment", "kill", str(first))
    assert killed_by_bob.returncode == 1 and "403" in killed_by_bob.stderr and "Traceback" not in killed_by_bob.stderr
    time.sleep(1.0)
    trail = s.http.get(f"/api/v1/experiments/{first}/events").json()
    assert not [e["type"] for e in trail if e["type"] in CHANGES]
    assert s.http.get(f"/api/v1/trials/{trial['id']}").json()["state"] == "RUNNING"
    assert s.http.get(f"/api/v1/experiments/{first}").json()["state"] == "ACTIVE"

    # The owner may (priority, then kill her first experiment); the admin may kill her second.
    _ok(_cli(s, alice_dir, "experiment", "set", "priority", str(first), "20"))
    _ok(_cli(s, alice_dir, "experiment", "kill", str(first)))
    assert s.http.post(f"/api/v1/experiments/{second}/kill").status_code == 202
    for e in (first, second):
        _wait(lambda e=e: s.http.get(f"/api/v1/experiments/{e}").json()["state"] == "CANCELED", what=f"{e} canceled")
    trail = s.http.get(f"/api/v1/experiments/{first}/events").json()
    assert [e["type"] for e in trail if e["type"] in CHANGES] == ["ExperimentResourcesChanged",
                                                                  "ExperimentKillRequested"]
    assert json.dumps(trail).count('"submitted_by": "alice"') == 1

    # Named tokens: created once (value shown then only), listed without values, revoked -> 401.
    made = _ok(_cli(s, alice_dir, "token", "create", "ci"))
    token_id, named = int(made.split()[1]), made.strip().rsplit(" ", 1)[1]
    tokens.append(named)
    assert httpx.get(f"{api}/api/v1/me", headers=_as(named)).json()["username"] == "alice"
    listed = _ok(_cli(s, alice_dir, "token", "list", "--json"))
    assert named not in listed and {t["name"] for t in json.loads(listed)} == {"login", "ci"}
    assert _cli(s, bob_dir, "token", "revoke", str(token_id)).returncode == 1  # not bob's
    _ok(_cli(s, alice_dir, "token", "revoke", str(token_id)))
    assert httpx.get(f"{api}/api/v1/me", headers=_as(named)).status_code == 401
    via_env = _cli(s, tmp_path / "nobody", "experiment", "list", token=named)
    assert via_env.returncode == 1 and "not logged in: run kiln user login" in via_env.stderr
    assert "Traceback" not in via_env.stderr

    # Logout revokes the stored token; the CLI then says to log in, without a traceback.
    _ok(_cli(s, bob_dir, "user", "logout"))
    assert httpx.get(f"{api}/api/v1/me", headers=_as(bob_token)).status_code == 401
    after = _cli(s, bob_dir, "user", "whoami")
    assert after.returncode == 1 and "not logged in: run kiln user login" in after.stderr
    assert "Traceback" not in after.stderr

    # `kiln up` on the running stack signs a CLI with no login in as the stack's admin (the quickstart).
    up_dir = tmp_path / "fresh"
    up = _cli(s, up_dir, "up", "--state-dir", str(s.cfg.state_dir))
    assert "logged in as admin" in _ok(up)
    assert _stored(up_dir, master)[0] == "admin"
    tokens.append(_stored(up_dir, master)[1])
    _ok(_cli(s, up_dir, "experiment", "list"))
    assert "logged in as admin" in _ok(_cli(s, up_dir, "up", "--state-dir", str(s.cfg.state_dir)))  # kept

    # No token value in any log of the stack, nor in any table of the read model.
    logs = list((s.cfg.state_dir / "logs").glob("*.log"))
    assert "gateway.log" in {f.name for f in logs}
    assert '"auth.login"' in (s.cfg.state_dir / "logs/gateway.log").read_text()
    for log_file in logs:
        text = log_file.read_text(errors="replace")
        assert not [t for t in tokens if t in text], f"a token is in {log_file.name}"
    dumped = asyncio.run(_dump_tables(s.pg_dsn))
    assert "api_tokens" in dumped and "users" in dumped
    for table, text in dumped.items():
        assert not [t for t in tokens if t in text], f"a token is in table {table}"
    assert "alice-password" not in dumped["users"] and "$argon2id$" in dumped["users"]


async def _dump_tables(dsn: str) -> dict[str, str]:
    """Every row of every table of the live schema, as text."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = [r["tablename"] for r in rows]
        out: dict[str, Any] = {}
        for table in tables:
            rows = await conn.fetch(f'SELECT t::text AS row FROM public."{table}" t')
            out[table] = "\n".join(r["row"] for r in rows)
        return out
    finally:
        await conn.close()
