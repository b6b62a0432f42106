"""Gateway: the HTTP API users and the CLI talk to."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import AsyncIterator

import asyncpg
import certifi
import msgspec
import structlog
import urllib3
import uvicorn
from litestar import Litestar
from minio import Minio

from schemas import context as code_context
from schemas import ports, readmodel
from schemas.config import DEFAULT_MAX_CONFIG_BYTES
from schemas.data import s3_storage_options
from services.gateway import auth, collector, queries
from services.gateway.app import GatewayDeps, create_app
from services.gateway.queries import init_connection
from services.runtime import (
    BusSettings,
    S3Settings,
    Transient,
    configure_logging,
    connect_bus,
    postgres_unavailable,
    read_settings,
)

log = structlog.get_logger(__name__)


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the gateway (``KILN_*`` environment variables)."""

    pg_dsn: str = ports.PG_DSN
    http_host: str = ports.HOST
    http_port: int = ports.HTTP_PORT
    max_context_bytes: int = code_context.DEFAULT_MAX_BYTES
    # Hostile input (README "Security"): configs bigger than this are refused unparsed; contexts that unpack
    # to more bytes or members are refused while streamed (the workers hold the same limits).
    max_config_bytes: int = DEFAULT_MAX_CONFIG_BYTES
    max_context_unpacked_bytes: int = code_context.DEFAULT_MAX_UNPACKED_BYTES
    max_context_files: int = code_context.DEFAULT_MAX_FILES
    pg_connect_timeout_s: float = 5.0
    pg_command_timeout_s: float = 60.0
    log_level: str = "INFO"
    # The first admin's password, used once: when the users table is empty (else one is generated and printed).
    admin_password: str = ""


def minio_client(s3: S3Settings) -> Minio:
    """The object-store client: an unreachable store fails a request in seconds (503), not minutes."""
    retries = urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504])
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5.0, read=60.0), maxsize=10, retries=retries,
                               cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where())
    return Minio(s3.s3_endpoint, access_key=s3.s3_access_key, secret_key=s3.s3_secret_key, secure=s3.s3_secure,
                 http_client=http)


async def _migrate(settings: GatewaySettings) -> None:
    # On a connection of its own: no command timeout may cut a long migration short.
    conn = await asyncpg.connect(settings.pg_dsn, timeout=settings.pg_connect_timeout_s)
    try:
        await readmodel.migrate(conn)
        await _bootstrap_admin(conn, settings.admin_password)
    finally:
        await conn.close()


async def _bootstrap_admin(conn: asyncpg.Connection, password: str) -> None:
    """On the first start (no user at all) create ``admin``: with ``KILN_ADMIN_PASSWORD``, else a generated
    password printed once on stderr (never logged: the structured log is for many readers)."""
    generated = not password
    password = password or secrets.token_urlsafe(15)
    if await queries.create_first_admin(conn, await asyncio.to_thread(auth.hash_password, password)):
        log.info("gateway.admin_created", username="admin", password_from="generated" if generated
                 else "KILN_ADMIN_PASSWORD")
        if generated:
            print(f"kiln gateway: created user 'admin' with password {password} (shown only now)", file=sys.stderr,
                  flush=True)


async def _migrate_when_back(settings: GatewaySettings, migrated: asyncio.Event) -> None:
    """Retry the migration until Postgres answers; the gateway serves 503 for the read model meanwhile."""
    delay = 0.5
    while True:
        await asyncio.sleep(delay)
        try:
            await _migrate(settings)
        except Exception as exc:  # noqa: BLE001 - an outage is waited out, anything else is shouted about
            (log.warning if postgres_unavailable(exc) else log.error)("gateway.migrate_failed", retry_in=delay,
                                                                 error=repr(exc))
            delay = min(delay * 2, 5.0)
            continue
        migrated.set()
        log.info("gateway.migrated", after="postgres came back")
        return


@contextlib.asynccontextmanager
async def open_deps(settings: GatewaySettings, bus_settings: BusSettings, s3: S3Settings) -> AsyncIterator[GatewayDeps]:
    """Open what the routes need (migrating the read model first); closed on the way out.

    A Postgres that is down at start does not stop the gateway: it starts degraded (503 for what needs the
    read model) and migrates once Postgres answers. A Postgres that refuses it (bad password, no such
    database) does stop it: that is a mistake to fix, not an outage to wait out.
    """
    migrated = asyncio.Event()
    waiting: asyncio.Task[None] | None = None
    try:
        await _migrate(settings)
        migrated.set()
    except Exception as exc:
        if not postgres_unavailable(exc):
            raise
        log.warning("gateway.postgres_unavailable_at_start", error=repr(exc))
        waiting = asyncio.create_task(_migrate_when_back(settings, migrated))
    # Bounded waits: a Postgres that is down or hung answers a request with 503 within seconds
    # (app.GatewayDeps.db), and the pool replaces broken connections by itself once it is back. No
    # connection is opened up front (min_size=0): Postgres may be down now.
    try:
        async with (
            asyncpg.create_pool(settings.pg_dsn, min_size=0, max_size=8, init=init_connection,
                                timeout=settings.pg_connect_timeout_s,
                                command_timeout=settings.pg_command_timeout_s) as pool,
            connect_bus(bus_settings, "gateway", ensure=False) as bus,
        ):
            minio = minio_client(s3)
            # Retention: the searcher decides, the gateway (holding the store key) deletes the objects.
            stop_collector = asyncio.Event()

            async def registered(uuids: list[str]) -> set[str]:
                """Which of these checkpoints the registry names (the collector keeps them)."""
                if not migrated.is_set():
                    raise Transient("the read model is not migrated yet")
                try:
                    async with pool.acquire(timeout=settings.pg_connect_timeout_s) as conn:
                        return await queries.registered_checkpoints(conn, uuids)
                except Exception as exc:
                    if postgres_unavailable(exc):  # waited out by the consumer: nothing is deleted meanwhile
                        raise Transient(f"postgres unavailable: {exc!r}") from exc
                    raise

            collecting = asyncio.create_task(collector.run(bus, minio, s3.s3_bucket, stop_collector, registered))
            try:
                yield GatewayDeps(pool=pool, bus=bus, minio=minio, bucket=s3.s3_bucket,
                                  max_context_bytes=settings.max_context_bytes, migrated=migrated,
                                  max_config_bytes=settings.max_config_bytes,
                                  max_context_unpacked_bytes=settings.max_context_unpacked_bytes,
                                  max_context_files=settings.max_context_files,
                                  s3_options=s3_storage_options(s3.s3_endpoint, s3.s3_access_key,
                                                                s3.s3_secret_key, secure=s3.s3_secure))
            finally:
                stop_collector.set()
                try:
                    await asyncio.wait_for(collecting, timeout=10.0)
                except Exception as exc:  # noqa: BLE001 - shutting down either way (a timeout included)
                    collecting.cancel()
                    log.warning("gateway.collector_stopped", error=repr(exc))
    finally:
        if waiting is not None:
            waiting.cancel()


def build_app(settings: GatewaySettings, bus_settings: BusSettings, s3: S3Settings) -> Litestar:
    """The gateway app over these settings; connections open in its lifespan."""
    # Room for the multipart envelope and the config around the context itself.
    return create_app(lambda: open_deps(settings, bus_settings, s3),
                      max_body_bytes=settings.max_context_bytes + 4 * 1024 * 1024)


def main() -> None:
    """Composition root: settings once; connections open in the app's lifespan."""
    settings = read_settings(GatewaySettings)
    configure_logging("gateway", settings.log_level)
    app = build_app(settings, read_settings(BusSettings), read_settings(S3Settings))
    config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="warning",
                            lifespan="on")
    asyncio.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
