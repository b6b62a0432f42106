"""How the gateway turns failures into answers (no I/O): an outage is a 503 naming the part, anything else a
500; both carry a request id. The real outages are in tests/integration/test_gateway_outage.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import asyncpg
import nats.errors
import nats.js.errors
import pytest
import structlog
from litestar.testing import TestClient

from schemas import context
from services.gateway.app import GatewayDeps, Unavailable, create_app, outage

# Any token: authenticating it needs the read model too, so with Postgres down it is the same 503.
AUTH = {"Authorization": "Bearer t"}


@pytest.mark.parametrize(("exc", "down"), [
    (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"), "postgres"),
    (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), "postgres"),
    (asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"), "postgres"),
    (asyncpg.exceptions.TooManyConnectionsError("too many clients"), "postgres"),
    (asyncpg.InterfaceError("connection is closed"), "postgres"),
    (nats.errors.TimeoutError(), "nats"),
    (nats.errors.NoRespondersError(), "nats"),
    (nats.errors.ConnectionClosedError(), "nats"),
    (Unavailable(["s3"]), "s3"),
    # Not outages: bugs and bad input stay 500 (or their own 4xx).
    (asyncpg.exceptions.UndefinedTableError("relation does not exist"), None),
    (asyncpg.DataError("invalid input for query argument"), None),
    (nats.js.errors.BadRequestError(), None),
    (ConnectionRefusedError(), None),  # a bare OSError names no part; GatewayDeps.db() attributes it
    (ValueError("a bug"), None),
])
def test_outage_names_the_part_that_is_down(exc: Exception, down: str | None) -> None:
    found = outage(exc)
    assert (found.down if found else None) == ([down] if down else None)


class _Pool:
    """A pool whose acquire fails with a given exception."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.expired = 0

    def acquire(self, timeout: float | None = None) -> Any:
        raise self.exc

    async def expire_connections(self) -> None:
        self.expired += 1


def _client(pool: _Pool, connected: bool = True) -> TestClient[Any]:
    @contextlib.asynccontextmanager
    async def deps() -> AsyncIterator[GatewayDeps]:
        bus = SimpleNamespace(is_connected=connected)
        yield GatewayDeps(pool=pool, bus=bus, minio=None, bucket="kiln",  # type: ignore[arg-type]
                          max_context_bytes=1024)

    return TestClient(create_app(deps, max_body_bytes=1 << 20))


def test_postgres_refusing_connections_is_a_503_with_retry_after_and_fresh_connections_after() -> None:
    pool = _Pool(ConnectionRefusedError(111, "Connect call failed"))
    with _client(pool) as http:
        resp = http.get("/api/v1/experiments", headers={"X-Request-Id": "req-123", **AUTH})
    assert resp.status_code == 503
    assert resp.json() == {"status_code": 503, "status": "degraded", "down": ["postgres"],
                           "detail": "the read model (PostgreSQL) is unavailable; retry shortly",
                           "request_id": "req-123"}
    assert resp.headers["retry-after"] == "5" and resp.headers["x-request-id"] == "req-123"
    assert pool.expired == 1


def test_health_names_every_part_that_is_down() -> None:
    with _client(_Pool(ConnectionRefusedError()), connected=False) as http:
        resp = http.get("/health")
    assert resp.status_code == 503
    body = resp.json()
    assert body["down"] == ["postgres", "nats"]
    assert body["detail"] == "the read model (PostgreSQL) and the event bus (NATS) are unavailable; retry shortly"


def test_a_bug_is_a_500_logged_with_its_request_id() -> None:
    with structlog.testing.capture_logs() as logs, _client(_Pool(RuntimeError("a bug"))) as http:
        resp = http.get("/api/v1/experiments", headers=AUTH)
    assert resp.status_code == 500
    request_id = resp.headers["x-request-id"]
    assert resp.json() == {"status_code": 500, "detail": "internal server error", "request_id": request_id}
    failed = [entry for entry in logs if entry["event"] == "request.failed"]
    assert failed and failed[0]["request_id"] == request_id and failed[0]["path"] == "/api/v1/experiments"


class _Conn:
    async def fetchval(self, query: str, *args: Any) -> int:
        return 7  # the next experiment id

    async def fetchrow(self, query: str, *args: Any) -> dict[str, Any]:
        return {"user_id": 1, "username": "admin", "admin": True, "token_id": 1}  # the token's user


class _OkPool(_Pool):
    def __init__(self) -> None:
        super().__init__(RuntimeError("unused"))

    def acquire(self, timeout: float | None = None) -> Any:
        @contextlib.asynccontextmanager
        async def one() -> AsyncIterator[_Conn]:
            yield _Conn()

        return one()


def test_a_publish_nats_did_not_confirm_is_a_503_that_names_the_experiment_id(tmp_path: Any) -> None:
    """Sent but not acknowledged: JetStream may have stored it, so the answer says which id to look for."""
    (tmp_path / "train.py").write_text("print('hi')\n")

    async def publish(event: Any) -> int:
        raise nats.errors.TimeoutError

    @contextlib.asynccontextmanager
    async def deps() -> AsyncIterator[GatewayDeps]:
        bus = SimpleNamespace(is_connected=True, publish=publish, publish_ack=publish)
        minio = SimpleNamespace(stat_object=lambda bucket, key: None)  # the context is stored already
        yield GatewayDeps(pool=_OkPool(), bus=bus, minio=minio, bucket="kiln",  # type: ignore[arg-type]
                          max_context_bytes=1 << 20)

    config = ("name: t\nentrypoint: python3 train.py\nhyperparameters: {lr: 0.1}\n"
              "searcher: {name: single, metric: loss, max_length: {batches: 10}}\n")
    with TestClient(create_app(deps, max_body_bytes=4 << 20)) as http:
        resp = http.post("/api/v1/experiments", data={"config": config}, headers=AUTH,
                         files={"context": ("c.tar.gz", context.pack(tmp_path), "application/gzip")})
    assert resp.status_code == 503, resp.text
    body = resp.json()
    assert body["down"] == ["nats"] and body["extra"] == {"experiment_id": 7}
    assert "experiment 7" in body["detail"]
