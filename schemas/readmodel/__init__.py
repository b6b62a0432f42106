"""The read model's SQL schema: written by the tracker, read by the gateway.

Migrations are numbered SQL files beside this module, applied in order, each in its own transaction,
under an advisory lock so two processes starting at once do not race.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

_LOCK_KEY = 0x4B494C4E  # "KILN"
# The projection of the domain stream (the tracker's durable consumer; its row in ``projection_positions``): the
# gateway waits for it to pass an event it published before answering with what the read model shows.
DOMAIN_PROJECTION = "tracker-events"


def migrations() -> list[tuple[int, str]]:
    """Every migration as ``(version, sql)``, in order."""
    files = sorted(
        (f for f in resources.files(__package__).iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    return [(int(f.name.split("_", 1)[0]), f.read_text()) for f in files]


async def migrate(conn: Any, schema: str = "public") -> list[int]:
    """Bring ``schema`` up to date on an asyncpg connection; return the versions applied now."""
    applied_now: list[int] = []
    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    await conn.execute(f'SET search_path TO "{schema}"')
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
