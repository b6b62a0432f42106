"""The gateway's HTTP contract as a user relies on it (no I/O): the OpenAPI schema documents every answer of
every route, every error comes in the one shape (``schemas.api.ErrorBody``), a missing thing is a 404 naming it,
and the CLI prints any error the gateway (or something in front of it) answers with, never a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import msgspec
import pytest
from click.testing import CliRunner
from litestar.testing import TestClient

from kiln import cli
from kiln import client as kc
from schemas import api
from services.gateway import app as gateway
from services.gateway import queries

AUTH = {"Authorization": "Bearer t"}
ERROR_REF = "#/components/schemas/ErrorBody"


def _schema() -> dict[str, Any]:
    return gateway.create_app(None, max_body_bytes=1 << 20).openapi_schema.to_schema()


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, op in item.items():
            yield f"{method.upper()} {path}", op


def test_every_route_documents_its_success_answer_with_a_schema() -> None:
    schema = _schema()
    ops = dict(_operations(schema))
    assert len(ops) == len(gateway.ROUTES)
    for name, op in ops.items():
        ok = [code for code in op["responses"] if code.startswith("2")]
        assert len(ok) == 1, name
        content = op["responses"][ok[0]]["content"]
        for media_type, body in content.items():
            assert body["schema"], f"{name}: {media_type} answer has no schema"
            if media_type == "application/json":
                # A named Struct, or a list of them: never an untyped object.
                target = body["schema"].get("items", body["schema"])
                assert "$ref" in target, f"{name}: answers {body['schema']}"


def test_every_route_documents_its_errors_in_the_one_shape() -> None:
    for name, op in _operations(_schema()):
        errors = {code: r for code, r in op["responses"].items() if int(code) >= 400}
        assert {"400", "500", "503"} <= set(errors), name
        # A route needing a token answers 401 without one (login does for a bad password).
        if op.get("security") != [{}]:
            assert "401" in errors, name
        for code, response in errors.items():
            assert response["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}, f"{name} {code}"


def test_a_metric_value_that_is_an_integer_matches_the_schema_once() -> None:
    """``oneOf`` with both ``number`` and ``integer`` would refuse ``1`` (it matches both)."""
    text = msgspec.json.encode(_schema()).decode()
    assert '{"type":"integer"},{"type":"number"}' not in text and '{"type":"number"},{"type":"integer"}' not in text


# -- 404s, in the one shape -------------------------------------------------------------------------------------


class _Conn:
    pass


class _Pool:
    def acquire(self, timeout: float | None = None) -> Any:
        @contextlib.asynccontextmanager
        async def one() -> AsyncIterator[_Conn]:
            yield _Conn()

        return one()


@pytest.fixture
def http(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient[Any]]:
    """A gateway whose read model holds nothing but the caller (an admin) and whose bus holds no event."""

    async def principal_for_token(conn: Any, digest: str) -> dict[str, Any]:
        return {"user_id": 1, "username": "admin", "admin": True, "token_id": 1}

    async def nothing(*args: Any) -> None:
        return None

    for name in ("get_experiment", "deleted_experiment", "get_trial", "get_checkpoint", "get_token"):
        monkeypatch.setattr(queries, name, nothing)
    monkeypatch.setattr(queries, "principal_for_token", principal_for_token)

    async def read(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        return
        yield

    async def publish(event: Any) -> int:
        raise AssertionError("nothing may be published about a thing that is not there")

    @contextlib.asynccontextmanager
    async def deps() -> AsyncIterator[gateway.GatewayDeps]:
        bus = SimpleNamespace(is_connected=True, read=read, publish=publish, publish_ack=publish)
        yield gateway.GatewayDeps(pool=_Pool(), bus=bus, minio=None, bucket="kiln",  # type: ignore[arg-type]
                                  max_context_bytes=1024)

    with TestClient(gateway.create_app(deps, max_body_bytes=1 << 20)) as client:
        yield client


@pytest.mark.parametrize(("method", "path", "what"), [
    ("GET", "/api/v1/experiments/7", "experiment 7"),
    ("GET", "/api/v1/experiments/7/trials", "experiment 7"),
    ("GET", "/api/v1/experiments/7/events", "experiment 7"),
    ("GET", "/api/v1/experiments/7/metrics/stream", "experiment 7"),
    ("POST", "/api/v1/experiments/7/kill", "experiment 7"),
    ("POST", "/api/v1/experiments/7/pause", "experiment 7"),
    ("POST", "/api/v1/experiments/7/activate", "experiment 7"),
    ("DELETE", "/api/v1/experiments/7", "experiment 7"),
    ("GET", "/api/v1/trials/8", "trial 8"),
    ("POST", "/api/v1/trials/8/kill", "trial 8"),
    ("GET", "/api/v1/checkpoints/c9", "checkpoint c9"),
    ("GET", "/api/v1/checkpoints/c9/download", "checkpoint c9"),
    ("DELETE", "/api/v1/tokens/10", "token 10"),
])
def test_each_kind_of_missing_thing_is_a_404_in_the_one_error_shape(http: TestClient[Any], method: str, path: str,
                                                                    what: str) -> None:
    resp = http.request(method, path, headers={"X-Request-Id": "req-404", **AUTH})
    assert resp.status_code == 404, resp.text
    body = msgspec.json.decode(resp.content, type=api.ErrorBody)
    assert body == api.ErrorBody(status_code=404, detail=f"{what} not found", request_id="req-404")


def test_validation_errors_and_401s_come_in_the_one_shape(http: TestClient[Any]) -> None:
    bad = http.post("/api/v1/experiments/7/resources", json={"priority": 100}, headers=AUTH)
    assert bad.status_code == 400
    body = msgspec.json.decode(bad.content, type=api.ErrorBody)
    assert isinstance(body.extra, list) and [p.key for p in body.extra] == ["priority"] and body.request_id
    anonymous = http.get("/api/v1/experiments/7")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    assert msgspec.json.decode(anonymous.content, type=api.ErrorBody).status_code == 401


# -- the client and the CLI -------------------------------------------------------------------------------------


def _cli(monkeypatch: pytest.MonkeyPatch, answer: httpx.Response, *args: str) -> Any:
    real = kc.Client.__init__

    def init(self: kc.Client, *a: object, **kw: object) -> None:
        real(self, *a, **kw)  # type: ignore[arg-type]
        self._http = httpx.Client(base_url=self.master, transport=httpx.MockTransport(lambda request: answer))

    monkeypatch.setattr(kc.Client, "__init__", init)
    monkeypatch.setenv("KILN_TOKEN", "t")
    return CliRunner().invoke(cli.main, list(args))


@pytest.mark.parametrize(("answer", "printed"), [
    # Litestar's validation list, as the gateway documents it (`kiln experiment set priority 3 100` once crashed).
    (httpx.Response(400, json={"status_code": 400,
                               "detail": "Validation failed for POST /api/v1/experiments/3/resources",
                               "extra": [{"key": "priority", "message": "Input should be <= 99", "source": "body"}]}),
     "priority: Input should be <= 99"),
    (httpx.Response(404, json={"status_code": 404, "detail": "experiment 3 not found", "request_id": "r"}),
     "experiment 3 not found (HTTP 404)"),
    (httpx.Response(503, json={"status_code": 503, "detail": "the event bus (NATS) is unavailable; retry shortly",
                               "status": "degraded", "down": ["nats"], "request_id": "req-9"}),
     "(HTTP 503, request id req-9)"),
    # Not the gateway: a proxy's page, a JSON list, an empty body.
    (httpx.Response(502, text="<html><body><h1>502 Bad Gateway</h1></body></html>"), "502 Bad Gateway"),
    (httpx.Response(400, json=["odd"]), "(HTTP 400)"),
    (httpx.Response(500, content=b""), "Internal Server Error (HTTP 500)"),
])
def test_the_cli_prints_a_clean_error(monkeypatch: pytest.MonkeyPatch, answer: httpx.Response, printed: str) -> None:
    result = _cli(monkeypatch, answer, "experiment", "set", "priority", "3", "100")
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "error: " in result.output and printed in result.output, result.output
    assert "Traceback" not in result.output


def test_a_success_that_is_not_json_is_a_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _cli(monkeypatch, httpx.Response(200, text="<html>login portal</html>"), "experiment", "list")
    assert result.exit_code == 1 and "is not JSON" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
