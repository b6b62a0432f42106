"""Users, tokens and the rights rule (no I/O): hashing, token digests, owner-or-admin, and the one middleware
that authenticates every route (with the read-model queries replaced by fakes). The real thing, against the
whole stack, is tests/e2e/test_auth.py."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from litestar.testing import TestClient

from schemas import api
from services.gateway import auth, queries
from services.gateway.app import GatewayDeps, create_app

ALICE = auth.Principal(user_id=2, username="alice", admin=False, token_id=10)
BOB = auth.Principal(user_id=3, username="bob", admin=False, token_id=11)
ADMIN = auth.Principal(user_id=1, username="admin", admin=True, token_id=12)


def test_a_password_is_stored_as_a_salted_argon2id_hash_and_verified() -> None:
    stored = auth.hash_password("correct horse")
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert stored != auth.hash_password("correct horse")  # salted
    assert auth.verify_password(stored, "correct horse")
    assert not auth.verify_password(stored, "correct horsE")
    assert not auth.verify_password("not a hash", "correct horse")


def test_an_unknown_user_never_verifies() -> None:
    assert not auth.verify_password(None, "")
    assert not auth.verify_password(None, "anything")


def test_tokens_are_random_and_stored_only_as_their_sha256() -> None:
    a, b = auth.new_token(), auth.new_token()
    assert a != b and len(a) >= 43  # 32 bytes, URL-safe base64
    assert auth.token_digest(a) == hashlib.sha256(a.encode()).hexdigest()
    assert a not in auth.token_digest(a)


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"), ("bearer abc ", "abc"), ("Basic abc", None), ("Bearer", None), ("Bearer  ", None),
    ("", None), (None, None),
])
def test_bearer_header(header: str | None, token: str | None) -> None:
    assert auth.bearer_token(header) == token


@pytest.mark.parametrize(("principal", "owner", "allowed"), [
    (ALICE, "alice", True),   # the owner
    (BOB, "alice", False),    # another user
    (ADMIN, "alice", True),   # an admin
    (ALICE, "Alice", False),  # names are exact
])
def test_only_the_owner_or_an_admin_may_change_an_experiment(principal: auth.Principal, owner: str,
                                                              allowed: bool) -> None:
    assert auth.may_change(principal, owner) is allowed


def test_a_token_may_be_revoked_by_its_user_or_an_admin() -> None:
    assert auth.may_revoke(ALICE, ALICE.user_id) and auth.may_revoke(ADMIN, ALICE.user_id)
    assert not auth.may_revoke(BOB, ALICE.user_id)


def test_usernames_and_passwords_are_checked() -> None:
    assert auth.check_username("alice") is None and auth.check_username("a.b-c_d@x") is None
    assert auth.check_username("") and auth.check_username("-x") and auth.check_username("a b")
    assert auth.check_username("alice\n") and auth.check_username("a" * 65)
    assert auth.check_password("short") and auth.check_password("long enough") is None


# -- the middleware and the rights check in the app ---------------------------------------------------------

TOKENS = {auth.token_digest(f"token-{p.username}"): p for p in (ALICE, BOB, ADMIN)}


class _Conn:
    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> int:
        return 1  # /health's SELECT 1


class _Pool:
    def acquire(self, timeout: float | None = None) -> Any:
        @contextlib.asynccontextmanager
        async def one() -> AsyncIterator[_Conn]:
            yield _Conn()

        return one()


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient[Any], list[Any]]]:
    published: list[Any] = []

    async def principal_for_token(conn: Any, digest: str) -> dict[str, Any] | None:
        p = TOKENS.get(digest)
        return {"user_id": p.user_id, "username": p.username, "admin": p.admin, "token_id": p.token_id} if p else None

    async def get_experiment(conn: Any, experiment_id: int) -> api.Experiment | None:
        return api.Experiment(
            id=experiment_id, name="e", description="", labels=[], state="ACTIVE", searcher_name="single",
            searcher_metric="loss", smaller_is_better=True, submitted_by="alice", submitted_at=datetime.now(UTC),
            ended_at=None, end_reason="", progress=0.0, context_digest="d", priority=42, weight=1.0, max_slots=None,
            config={}, config_yaml="", seed=1, trial_states={}, best_trial=None)

    async def list_experiments(conn: Any, *args: Any) -> list[dict[str, Any]]:
        return []

    monkeypatch.setattr(queries, "principal_for_token", principal_for_token)
    monkeypatch.setattr(queries, "get_experiment", get_experiment)
    monkeypatch.setattr(queries, "list_experiments", list_experiments)

    async def publish(event: Any) -> int:
        published.append(event)
        return len(published)

    @contextlib.asynccontextmanager
    async def deps() -> AsyncIterator[GatewayDeps]:
        bus = SimpleNamespace(is_connected=True, publish=publish)
        yield GatewayDeps(pool=_Pool(), bus=bus, minio=None, bucket="kiln",  # type: ignore[arg-type]
                          max_context_bytes=1024)

    with TestClient(create_app(deps, max_body_bytes=1 << 20)) as http:
        yield http, published


def _as(p: auth.Principal) -> dict[str, str]:
    return {"Authorization": f"Bearer token-{p.username}"}


def test_no_token_or_a_bad_one_is_401_with_a_clear_message(app: tuple[TestClient[Any], list[Any]]) -> None:
    http, published = app
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic YWRtaW46eA=="}):
        resp = http.post("/api/v1/experiments/37/kill", headers=headers)
        assert resp.status_code == 401, resp.text
        assert "kiln user login" in resp.json()["detail"]
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert resp.headers["x-request-id"]
    assert http.get("/api/v1/experiments").status_code == 401
    assert published == []


def test_health_and_the_schema_need_no_token_and_the_schema_declares_the_bearer_scheme(
        app: tuple[TestClient[Any], list[Any]]) -> None:
    http, _ = app
    assert http.get("/health").status_code == 200
    schema = http.get("/schema/openapi.json")
    assert schema.status_code == 200
    spec = schema.json()
    assert spec["components"]["securitySchemes"][auth.SCHEME] == {
        "type": "http", "scheme": "bearer",
        "description": spec["components"]["securitySchemes"][auth.SCHEME]["description"]}
    assert spec["security"] == [{auth.SCHEME: []}]
    assert all(op.get("operationId") for path in spec["paths"].values() for op in path.values())


def test_another_user_may_not_change_an_experiment_its_owner_and_an_admin_may(
        app: tuple[TestClient[Any], list[Any]]) -> None:
    http, published = app
    for path, body in (("kill", None), ("pause", None), ("activate", None), ("resources", {"priority": 5}),
                       ("metadata", {"name": "mine"})):
        resp = http.post(f"/api/v1/experiments/37/{path}", json=body, headers=_as(BOB))
        assert resp.status_code == 403, resp.text
        assert "alice" in resp.json()["detail"]
    assert published == []  # nothing was asked of anyone
    assert http.post("/api/v1/experiments/37/kill", headers=_as(ALICE)).status_code == 202
    assert http.post("/api/v1/experiments/37/pause", headers=_as(ADMIN)).status_code == 202
    assert [type(e).__name__ for e in published] == ["ExperimentKillRequested", "ExperimentPauseRequested"]
    assert http.get("/api/v1/experiments", headers=_as(BOB)).status_code == 200  # anyone signed in may read
    me = http.get("/api/v1/me", headers=_as(BOB)).json()
    assert me == {"id": 3, "username": "bob", "admin": False, "token_id": 11}


def test_only_an_admin_creates_users(app: tuple[TestClient[Any], list[Any]]) -> None:
    http, _ = app
    resp = http.post("/api/v1/users", json={"username": "carol", "password": "long enough"}, headers=_as(ALICE))
    assert resp.status_code == 403


def test_login_gives_a_token_only_for_the_right_password_and_stores_only_its_digest(
        app: tuple[TestClient[Any], list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    http, _ = app
    stored = auth.hash_password("alice-password")
    looked_up: list[str] = []
    digests: list[str] = []

    async def user_credentials(conn: Any, username: str) -> dict[str, Any] | None:
        looked_up.append(username)
        return {"id": 2, "username": "alice", "admin": False, "password_hash": stored} if username == "alice" else None

    async def create_token(conn: Any, user_id: int, digest: str, name: str, kind: str, ttl_s: float | None) -> Any:
        digests.append(digest)
        return {"id": 5, "name": name, "kind": kind, "created_at": datetime.now(UTC), "expires_at": None}

    monkeypatch.setattr(queries, "user_credentials", user_credentials)
    monkeypatch.setattr(queries, "create_token", create_token)
    for username, password in (("alice", "wrong"), ("nobody", "alice-password")):
        resp = http.post("/api/v1/auth/login", json={"username": username, "password": password})
        assert resp.status_code == 401 and resp.json()["detail"] == "wrong username or password"
    resp = http.post("/api/v1/auth/login", json={"username": "a\x00b", "password": "x"})
    assert resp.status_code in (400, 401)  # refused as bad text, or as no such user
    assert "a\x00b" not in looked_up  # never sent to Postgres
    resp = http.post("/api/v1/auth/login", json={"username": "alice", "password": "alice-password"})
    assert resp.status_code == 200, resp.text
    token = resp.json()["token"]
    assert digests == [auth.token_digest(token)] and token not in digests


def test_metadata_changes_are_one_event_and_the_answer_shows_the_result(app: tuple[TestClient[Any], list[Any]],
                                                                        ) -> None:
    http, published = app
    resp = http.post("/api/v1/experiments/37/metadata", headers=_as(ALICE),
                     json={"description": "why", "add_labels": ["a", "b", "a"], "remove_labels": ["b"]})
    assert resp.status_code == 202, resp.text
    assert resp.json() == {"id": 37, "name": "e", "description": "why", "labels": ["a"], "archived": False}
    (event,) = published
    assert (event.name, event.description, event.labels_added, event.labels_removed, event.requested_by) == \
        (None, "why", ["a", "b", "a"], ["b"], "alice")
    assert http.post("/api/v1/experiments/37/metadata", headers=_as(ALICE), json={}).status_code == 400
    # Only an ended experiment is archived (this one is ACTIVE); unarchiving one is always fine.
    refused = http.post("/api/v1/experiments/37/metadata", headers=_as(ALICE), json={"archived": True})
    assert refused.status_code == 409 and "only an ended experiment" in refused.json()["detail"]
    assert http.post("/api/v1/experiments/37/metadata", headers=_as(ALICE), json={"archived": False}).status_code == 202
