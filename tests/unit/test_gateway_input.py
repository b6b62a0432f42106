"""Hostile input gets a clear 4xx before any handler reaches Postgres, the bus or the store (no I/O): ids and
offsets beyond int64, NUL bytes, invalid Unicode, alias bombs, big configs, decompression bombs, checkpoints
whose files are gone. Each case is one the fuzzer or a reviewer turned into a 500."""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient
from minio.error import S3Error

from services.gateway.app import GatewayDeps, create_app
from tests.unit.test_context_limits import many_files, zip_bomb

AUTH = {"Authorization": "Bearer t"}
MiB = 1024 * 1024
CONFIG = ("name: t\nentrypoint: python3 train.py\nhyperparameters: {lr: 0.1}\n"
          "searcher: {name: single, metric: loss, max_length: {batches: 10}}\n")
CHECKPOINT = {"uuid": "c1", "trial_id": 1, "experiment_id": 1, "steps_completed": 5, "storage": "s3://kiln/ckpt",
              "resources": {"model.pt": 5}, "metadata": {}, "reported_at": datetime.now(UTC),
              "experiment_owner": "admin"}


class _Conn:
    """Authenticates any token; a checkpoint lookup finds ``CHECKPOINT``; anything else is a test failure."""

    async def fetchrow(self, query: str, *args: Any) -> dict[str, Any] | None:
        if "api_tokens" in query:
            return {"user_id": 1, "username": "admin", "admin": True, "token_id": 1}
        if "FROM checkpoints" in query:
            return CHECKPOINT
        raise AssertionError(f"the handler reached the read model with {args!r}: the input was not refused")

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        if query == "SELECT 1":  # /health
            return 1
        raise AssertionError(f"the handler reached the read model with {args!r}: the input was not refused")

    async def fetch(self, query: str, *args: Any) -> Any:
        raise AssertionError(f"the handler reached the read model with {args!r}: the input was not refused")


class _Pool:
    def acquire(self, timeout: float | None = None) -> Any:
        @contextlib.asynccontextmanager
        async def one() -> AsyncIterator[_Conn]:
            yield _Conn()

        return one()


def _app(minio: Any = None, **limits: int) -> Any:
    @contextlib.asynccontextmanager
    async def deps() -> AsyncIterator[GatewayDeps]:
        async def publish(event: Any) -> int:
            raise AssertionError("nothing may be published")

        bus = SimpleNamespace(is_connected=True, publish=publish, publish_ack=publish)
        yield GatewayDeps(pool=_Pool(), bus=bus, minio=minio, bucket="kiln",  # type: ignore[arg-type]
                          max_context_bytes=2 * MiB, **limits)

    return create_app(deps, max_body_bytes=8 * MiB)


@pytest.mark.parametrize(("method", "url", "key"), [
    ("GET", "/api/v1/experiments/9223372036854775808", "experiment_id"),
    ("GET", "/api/v1/experiments/-1", "experiment_id"),
    ("POST", "/api/v1/trials/99999999999999999999/kill", "trial_id"),
    ("GET", "/api/v1/trials/18446744073709551616/logs", "trial_id"),
    ("GET", "/api/v1/experiments/1/trials?offset=9223372036854775808", "offset"),
    ("GET", "/api/v1/experiments?offset=-1", "offset"),
    ("GET", "/api/v1/trials/1/metrics?offset=99999999999999999999", "offset"),
    ("GET", "/api/v1/experiments/1/events?after_seq=9223372036854775807", "after_seq"),
    ("DELETE", "/api/v1/tokens/9223372036854775808", "token_id"),
    ("GET", "/api/v1/trials/1/series?name=loss&name=a%00b", "name"),
    ("GET", "/api/v1/experiments?state=%00", "state"),
    ("GET", "/api/v1/checkpoints/abc%00def", "uuid"),
    ("GET", "/api/v1/checkpoints/abc%00def/download", "uuid"),
])
def test_out_of_range_ids_and_nul_bytes_are_a_400_naming_the_parameter(method: str, url: str, key: str) -> None:
    with TestClient(_app()) as http:
        resp = http.request(method, url, headers=AUTH)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert key in body["detail"] or [e["key"] for e in body.get("extra", [])] == [key], body


@pytest.mark.parametrize(("url", "body", "key"), [
    ("/api/v1/experiments/1/resources", {"max_slots": 2**40}, "max_slots"),
    ("/api/v1/experiments/1/metadata", {"name": "a\x00b"}, "name"),
    ("/api/v1/experiments/1/metadata", {"add_labels": ["ok", "a\x00b"]}, "add_labels[1]"),
    ("/api/v1/auth/login", {"username": "a\x00b", "password": "x"}, "username"),
    ("/api/v1/users", {"username": "a\x00b", "password": "x" * 20}, "username"),
    ("/api/v1/tokens", {"name": "a\x00b"}, "name"),
    ("/api/v1/tokens", {"name": "ci", "expires_in_days": 5.4e307}, "expires_in_days"),  # found by the fuzzer
])
def test_json_bodies_postgres_cannot_hold_are_a_400_naming_the_field(url: str, body: dict[str, Any],
                                                                       key: str) -> None:
    with TestClient(_app()) as http:
        resp = http.post(url, json=body, headers=AUTH)
    assert resp.status_code == 400, resp.text
    assert [e["key"] for e in resp.json()["extra"]] == [key]


def _submit(http: TestClient[Any], config: str, blob: bytes | None = None) -> Any:
    if blob is None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo("train.py")
            tar.addfile(info, io.BytesIO(b""))
        blob = buf.getvalue()
    return http.post("/api/v1/experiments", data={"config": config}, headers=AUTH,
                     files={"context": ("c.tar.gz", blob, "application/gzip")})


def billion_laughs(levels: int = 9) -> str:
    doc = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for prev, name in zip("abcdefghij", "bcdefghijk"[: levels - 1], strict=False):
        doc += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    return doc


@pytest.mark.parametrize(("config", "path", "message"), [
    (billion_laughs(), "<yaml>", "more than 100000 values once its aliases are expanded"),
    ("x: &a [*a]\n" + CONFIG, "<yaml>", "recursive"),
    ("x: " + "[" * 1000 + "]" * 1000 + "\n" + CONFIG, "<yaml>", "nested more than 64 levels"),
    ("a: 1\n" * 60_000, "<yaml>", "over the 262144-byte limit"),
    (CONFIG + 'description: "\\ud800"\n', "description", "lone surrogate"),
    (CONFIG + 'labels: ["ok", "a\\0b"]\n', "labels[1]", "NUL byte"),
    (CONFIG + "max_restarts: 99999999999999999999\n", "max_restarts", "does not fit in 64 bits"),
    (CONFIG + "resources: {max_slots: 3000000000}\n", "resources.max_slots", ""),
    ("KV\U000c0aa8\xbc o\xe6\x14|\x8f", "<yaml>", "unacceptable character #x0014"),  # found by the fuzzer
    ('{"z\\udb0f\\udcfa": 1}', "z\\udb0f\\udcfa", "key is not valid Unicode"),  # so was this: a 500 quoting the key
])
def test_hostile_configs_are_a_400_naming_what_was_wrong(config: str, path: str, message: str) -> None:
    with TestClient(_app()) as http:
        resp = _submit(http, config)
    assert resp.status_code == 400, resp.text
    errors = resp.json()["extra"]["errors"]
    assert any(e["path"] == path and message in e["message"] for e in errors), errors


def test_the_config_size_limit_is_a_setting() -> None:
    with TestClient(_app(max_config_bytes=100)) as http:
        resp = _submit(http, CONFIG)
    assert resp.status_code == 400 and "over the 100-byte limit" in resp.text


def test_a_zip_bomb_and_too_many_files_are_refused_at_upload() -> None:
    with TestClient(_app()) as http:
        bomb = _submit(http, CONFIG, zip_bomb(500 * MiB))
        crowd = _submit(http, CONFIG, many_files(30_000))
    assert bomb.status_code == 400 and "context unpacks to more than 256 MiB" in bomb.json()["detail"]
    assert crowd.status_code == 400 and "context has more than 10000 files" in crowd.json()["detail"]


async def test_a_big_config_does_not_hold_up_other_requests() -> None:
    """Parsing runs off the event loop: /health answers while a slow (240 KB flow-list) config parses.

    httpx's ASGITransport calls the app on this event loop (Litestar's test clients run it synchronously)."""
    slow = "x: [" + "1," * 120_000 + "]\n"
    health_done = asyncio.Event()
    app = _app()
    async with app.lifespan(), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                  base_url="http://gateway") as http:
        async def submit() -> Any:
            resp = await http.post("/api/v1/experiments", data={"config": slow}, headers=AUTH,
                                   files={"context": ("c.tar.gz", b"", "application/gzip")})
            return resp, health_done.is_set()

        task = asyncio.create_task(submit())
        await asyncio.sleep(0.3)  # the submission is parsing now
        resp = await http.get("/health")
        health_done.set()
        submitted, health_first = await task
    assert resp.status_code == 200
    assert submitted.status_code == 400 and "100000 values" in submitted.text
    assert health_first, "/health waited for the config to parse: the parse blocked the event loop"


def test_a_checkpoint_whose_files_are_gone_is_a_410_that_says_so() -> None:
    def get_object(bucket: str, key: str) -> Any:
        raise S3Error(None, "NoSuchKey", "The specified key does not exist.", key, "req", "host")  # type: ignore[arg-type]

    with TestClient(_app(minio=SimpleNamespace(get_object=get_object))) as http:
        resp = http.get("/api/v1/checkpoints/c1/download", headers=AUTH)
    assert resp.status_code == 410, resp.text
    assert "checkpoint c1 is recorded but its files are gone from the store" in resp.json()["detail"]
