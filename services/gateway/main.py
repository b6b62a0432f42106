"""Gateway: the HTTP API users and the CLI talk to."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import uvicorn
from minio import Minio

from kiln import context as code_context
from schemas import readmodel
from services.gateway.app import GatewayDeps, create_app
from services.gateway.queries import init_connection
from services.runtime import BusSettings, S3Settings, configure_logging, connect_bus, read_settings


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the gateway (``KILN_*`` environment variables)."""

    pg_dsn: str = "postgresql://kiln@127.0.0.1:15432/kiln"
    http_host: str = "127.0.0.1"
    http_port: int = 18080
    max_context_bytes: int = code_context.DEFAULT_MAX_BYTES
    log_level: str = "INFO"


def main() -> None:
    """Composition root: settings once; connections open in the app's lifespan."""
    settings = read_settings(GatewaySettings)
    configure_logging("gateway", settings.log_level)
    bus_settings = read_settings(BusSettings)
    s3 = read_settings(S3Settings)

    @contextlib.asynccontextmanager
    async def deps() -> AsyncIterator[GatewayDeps]:
        async with asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=8, init=init_connection) as pool:
            async with pool.acquire() as conn:
                await readmodel.migrate(conn)
            async with connect_bus(bus_settings, "gateway") as bus:
                minio = Minio(s3.s3_endpoint, access_key=s3.s3_access_key, secret_key=s3.s3_secret_key,
                              secure=s3.s3_secure)
                yield GatewayDeps(pool=pool, bus=bus, minio=minio, bucket=s3.s3_bucket,
                                  max_context_bytes=settings.max_context_bytes)

    # Room for the multipart envelope and the config around the context itself.
    app = create_app(deps, max_body_bytes=settings.max_context_bytes + 4 * 1024 * 1024)
    config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="warning",
                            lifespan="on")
    asyncio.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
