"""The gateway degrades, never breaks: with Postgres or NATS down it answers 503 naming the part, stores and
publishes nothing, and works again by itself when they are back.

The gateway runs as its real process (``python -m services.gateway.main``) against a NATS and a Postgres of
the test's own, which the test stops and starts; S3 is the session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import pytest

from deploy import parts as p
from deploy.ports import free_port_block
from schemas import context
from services.gateway.app import GatewayDeps, Unavailable, _store_context
from services.gateway.main import minio_client
from services.runtime import S3Settings
from tests.integration.conftest import TEST_NATS_USERS, bootstrap_bus

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PG_DOWN = "the read model (PostgreSQL) is unavailable; retry shortly"
CONFIG = ("name: outage\nentrypoint: python3 train.py\nhyperparameters: {lr: 0.1}\n"
          "searcher: {name: single, metric: loss, max_length: {batches: 10}}\n")
NATS_USER = "kiln-test"
ADMIN_PASSWORD = "outage-admin-password"


class OwnParts:
    """A NATS and a Postgres this test may stop and start, with the session's S3 beside them."""

    def __init__(self, cfg: p.PartsConfig, s3: p.RunningParts) -> None:
        self.cfg = cfg
        self.s3 = s3
        self.nats = p.start_nats(cfg)
        bootstrap_bus(cfg)  # the gateway may not create streams (as in a stack: `kiln up` does, as admin)
        self.postgres = p.start_postgres(cfg)

    @property
    def dsn(self) -> str:
        """DSN with the password, for the services and direct checks."""
        c = self.cfg
        return f"postgresql://{c.pg_user}:{c.pg_password}@{c.host}:{c.pg_port}/{c.pg_database}"

    @property
    def nats_url(self) -> str:
        """Client URL of the NATS part."""
        return f"nats://{self.cfg.host}:{self.cfg.nats_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a service process pointed at these parts."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        s3 = self.s3.cfg
        env.update(KILN_NATS_URL=self.nats_url, KILN_NATS_USER=NATS_USER, KILN_NATS_PASSWORD=TEST_NATS_USERS[NATS_USER],
                   KILN_PG_DSN=self.dsn, KILN_S3_ENDPOINT=self.s3.s3_endpoint, KILN_S3_ACCESS_KEY=s3.s3_access_key,
                   KILN_S3_SECRET_KEY=s3.s3_secret_key, KILN_S3_BUCKET="kiln", PYTHONUNBUFFERED="1", **extra)
        return env

    async def stop(self, name: str) -> None:
        """Stop a part (off the event loop: the services' connections notice at once)."""
        await asyncio.to_thread(getattr(self, name).stop)

    async def start(self, name: str) -> None:
        """Start a stopped part again, on the same ports and data."""
        start = p.start_nats if name == "nats" else p.start_postgres
        setattr(self, name, await asyncio.to_thread(start, self.cfg))

    def close(self) -> None:
        """Stop both parts."""
        for part in (self.postgres, self.nats):
            if part.alive():
                part.stop()


@pytest.fixture
def own_parts(parts: p.RunningParts, parts_config_factory: Callable[[Path], p.PartsConfig]) -> Iterator[OwnParts]:
    """NATS and Postgres of this test alone, on free ports, removed afterwards."""
    state_dir = Path(tempfile.mkdtemp(prefix="kiln-own-"))
    state_dir.chmod(0o755)  # the unprivileged postgres user must reach its data dir inside
    cfg = parts_config_factory(state_dir)
    own = OwnParts(cfg, parts)
    try:
        yield own
    finally:
        own.close()
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(p.postgres_data_dir(cfg), ignore_errors=True)


class Service:
    """A Kiln service running as its own process, its JSON log lines in a file."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", module], cwd=REPO, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def logs(self) -> list[dict[str, Any]]:
        """Every JSON log line so far."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@contextlib.asynccontextmanager
async def gateway(own: OwnParts, log_dir: Path, ready: int = 200) -> AsyncIterator[tuple[httpx.AsyncClient, Service]]:
    """The gateway process on a free port, answering (its /health said ``ready``); a client for it."""
    port = free_port_block(1)
    svc = Service("services.gateway.main", own.env(KILN_HTTP_HOST="127.0.0.1", KILN_HTTP_PORT=str(port),
                                                   KILN_PG_CONNECT_TIMEOUT_S="2", KILN_ADMIN_PASSWORD=ADMIN_PASSWORD),
                  log_dir / "gateway.log")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            await until(lambda: _health_is(http, ready), 30, lambda: svc.log_path.read_text())
            if ready == 200:
                await sign_in(http)
            yield http, svc
    finally:
        svc.stop()


async def sign_in(http: httpx.AsyncClient) -> None:
    """Sign the client in as the gateway's first admin (needs Postgres)."""
    resp = await http.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
    assert resp.status_code == 200, resp.text
    http.headers["Authorization"] = f"Bearer {resp.json()['token']}"


async def _health_is(http: httpx.AsyncClient, status: int) -> bool:
    try:
        return (await http.get("/health")).status_code == status
    except httpx.TransportError:
        return False


async def until(check: Callable[[], Any], timeout: float, why: Callable[[], str] = lambda: "") -> None:
    """Poll an async check until it is true; fail with ``why()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not true within {timeout}s\n{why()[-4000:]}"
        await asyncio.sleep(0.1)


async def submit(http: httpx.AsyncClient) -> httpx.Response:
    """POST an experiment like the CLI does."""
    return await http.post("/api/v1/experiments", data={"config": CONFIG},
                           files={"context": ("c.tar.gz", context.pack(REPO / "examples/digits"), "application/gzip")})


async def events_last_seq(own: OwnParts) -> int:
    """The domain event stream's last sequence number."""
    nc = await nats.connect(own.nats_url, user=NATS_USER, password=TEST_NATS_USERS[NATS_USER])
    try:
        return int((await nc.jetstream().stream_info("KILN_EVENTS")).state.last_seq)
    finally:
        await nc.close()


def assert_unavailable(resp: httpx.Response, down: list[str], detail: str | None = None) -> None:
    """A 503 naming what is down, asking to come back, with a request id."""
    assert resp.status_code == 503, (resp.status_code, resp.text)
    body = resp.json()
    assert body["down"] == down and body["status"] == "degraded", body
    if detail is not None:
        assert body["detail"] == detail
    assert int(resp.headers["retry-after"]) > 0
    assert resp.headers["x-request-id"] == body["request_id"]


async def test_postgres_down_is_503_and_nothing_half_way_then_it_recovers_by_itself(own_parts: OwnParts,
                                                                                      tmp_path: Path) -> None:
    """/health, reads and submissions answer 503 while Postgres is down (nothing published); once Postgres is
    back the same gateway process answers 200 at once."""
    async with gateway(own_parts, tmp_path) as (http, svc):
        created = await submit(http)
        assert created.status_code == 201, created.text
        assert (await http.get("/api/v1/experiments")).status_code == 200
        seq = await events_last_seq(own_parts)

        await own_parts.stop("postgres")
        health = await http.get("/health")
        assert_unavailable(health, ["postgres"])
        for path in ("/api/v1/experiments", "/api/v1/experiments/1", "/api/v1/experiments/1/trials",
                     "/api/v1/trials/1", "/api/v1/trials/1/logs", "/api/v1/trials/1/series",
                     "/api/v1/checkpoints/x"):
            assert_unavailable(await http.get(path), ["postgres"], PG_DOWN)
        refused = await submit(http)
        assert_unavailable(refused, ["postgres"], PG_DOWN)
        assert (await http.post("/api/v1/experiments/1/kill")).status_code == 503
        await asyncio.sleep(0.5)
        assert await events_last_seq(own_parts) == seq, "a submission that answered 503 published an event"
        logged = {line.get("request_id") for line in svc.logs() if line.get("event") == "request.unavailable"}
        assert refused.headers["x-request-id"] in logged and health.headers["x-request-id"] in logged

        await own_parts.start("postgres")
        # No restart of the gateway, no waiting: the pool replaces its broken connections by itself.
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/api/v1/experiments")).status_code == 200
        again = await submit(http)
        assert again.status_code == 201, again.text
        assert again.json()["id"] > created.json()["id"]
        assert await events_last_seq(own_parts) == seq + 1

        # A connection that dies under the gateway (terminated backends) is replaced, never a 500.
        conn = await asyncpg.connect(own_parts.dsn)
        try:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                               " WHERE usename = current_user AND pid <> pg_backend_pid()")
        finally:
            await conn.close()
        statuses = [(await http.get("/api/v1/experiments")).status_code for _ in range(5)]
        assert 500 not in statuses and statuses[-1] == 200, statuses
        assert not [line for line in svc.logs() if line.get("event") == "request.failed"]


async def test_nats_down_is_503_naming_it_and_both_down_names_both(own_parts: OwnParts, tmp_path: Path) -> None:
    """Without NATS: /health names nats, a submission is 503 and takes no experiment id, reads still work;
    with Postgres down as well both are named; after both return everything works again."""
    async with gateway(own_parts, tmp_path) as (http, _svc):
        conn = await asyncpg.connect(own_parts.dsn)
        try:
            ids_before = await conn.fetchval("SELECT last_value FROM experiment_ids")
        finally:
            await conn.close()

        await own_parts.stop("nats")
        await until(lambda: _health_is(http, 503), 10)
        assert_unavailable(await http.get("/health"), ["nats"])
        assert_unavailable(await submit(http), ["nats"], "the event bus (NATS) is unavailable; retry shortly")
        assert_unavailable(await http.get("/api/v1/experiments/1/events"), ["nats"])
        assert (await http.get("/api/v1/experiments")).status_code == 200  # reads need Postgres only

        await own_parts.stop("postgres")
        both = await http.get("/health")
        assert_unavailable(both, ["postgres", "nats"])
        assert "PostgreSQL" in both.json()["detail"] and "NATS" in both.json()["detail"]

        await own_parts.start("postgres")
        await own_parts.start("nats")
        await until(lambda: _health_is(http, 200), 30)
        conn = await asyncpg.connect(own_parts.dsn)
        try:
            assert await conn.fetchval("SELECT last_value FROM experiment_ids") == ids_before
        finally:
            await conn.close()
        created = await submit(http)
        assert created.status_code == 201, created.text


async def test_a_gateway_started_while_postgres_is_down_answers_503_then_migrates_and_serves(
        own_parts: OwnParts, tmp_path: Path) -> None:
    """Postgres down when the gateway starts: it serves 503 instead of exiting, and once Postgres is there it
    migrates the read model and answers 200, in the same process."""
    await own_parts.stop("postgres")
    async with gateway(own_parts, tmp_path, ready=503) as (http, svc):
        http.headers["Authorization"] = "Bearer no-user-yet"  # checking any token needs Postgres: 503, not 401
        assert_unavailable(await http.get("/health"), ["postgres"])
        assert_unavailable(await http.get("/api/v1/experiments"), ["postgres"], PG_DOWN)
        assert_unavailable(await submit(http), ["postgres"], PG_DOWN)
        await own_parts.start("postgres")
        await until(lambda: _health_is(http, 200), 30, lambda: svc.log_path.read_text())
        await sign_in(http)  # the first admin exists now: made when the gateway migrated
        assert (await http.get("/api/v1/experiments")).json() == []
        created = await submit(http)
        assert created.status_code == 201, created.text
        assert svc.proc.poll() is None


async def test_an_unreachable_object_store_is_an_outage_of_s3() -> None:
    """A context that cannot be stored (S3 refuses connections) is a 503 naming s3, not a 500."""
    closed = free_port_block(1)
    minio = minio_client(S3Settings(s3_endpoint=f"127.0.0.1:{closed}", s3_access_key="k", s3_secret_key="s"))
    deps = GatewayDeps(pool=None, bus=None, bucket="kiln", max_context_bytes=1, minio=minio)  # type: ignore[arg-type]
    with pytest.raises(Unavailable) as refused:
        await deps.s3(_store_context, "sha256:x", b"x")
    assert refused.value.down == ["s3"]
