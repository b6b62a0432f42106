"""The model registry's projection against a real Postgres: models, versions, and ``checkpoints.protected``."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from deploy import parts as p
from schemas import events as ev
from schemas import readmodel
from services.tracker.projection import Item, project_batch

pytestmark = pytest.mark.integration

CONFIG = {"name": "t", "entrypoint": "python3 train.py",
          "searcher": {"name": "single", "metric": "loss", "max_length": {"batches": 10}}}
E, T = 1, 2


@pytest.fixture
async def conn(parts: p.RunningParts) -> AsyncIterator[Any]:
    """A connection to a freshly migrated schema of its own."""
    cfg = parts.cfg
    c = await asyncpg.connect(f"postgresql://{cfg.pg_user}:{cfg.pg_password}@{cfg.host}:{cfg.pg_port}/{cfg.pg_database}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    await readmodel.migrate(c, schema)
    try:
        yield c
    finally:
        await c.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await c.close()


class Stream:
    """Events projected one batch at a time, with stream positions counting on."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.seq = itertools.count(1)

    async def apply(self, *events: Any) -> None:
        items = [Item(seq=next(self.seq), ts=2000.0, event=e) for e in events]
        assert await project_batch(self.conn, "tracker-events", items) == len(items)

    async def protected(self) -> dict[str, bool]:
        return {r["uuid"]: r["protected"] for r in await self.conn.fetch("SELECT uuid, protected FROM checkpoints")}

    async def versions(self) -> list[tuple[int, int, str]]:
        return [tuple(r) for r in await self.conn.fetch(
            "SELECT model_id, version, checkpoint_uuid FROM model_versions ORDER BY 1, 2")]


def stored(uuid_: str, step: int) -> ev.CheckpointStored:
    return ev.CheckpointStored(experiment_id=E, trial_id=T, uuid=uuid_, steps_completed=step, storage="s3://k/c")


def registered(model: int, version: int, uuid_: str) -> ev.ModelVersionRegistered:
    return ev.ModelVersionRegistered(model_id=model, version=version, checkpoint_uuid=uuid_, experiment_id=E,
                                     trial_id=T, registered_by="ann")


async def test_versions_protect_their_checkpoints_until_the_last_one_naming_it_goes(conn: Any) -> None:
    s = Stream(conn)
    await s.apply(ev.ExperimentSubmitted(experiment_id=E, config=CONFIG, config_yaml="", context_digest="d",
                                         context_size=1, seed=1),
                  ev.TrialCreated(experiment_id=E, trial_id=T, request_id=0, hparams={}, seed=0),
                  stored("a", 1), stored("b", 2))
    await s.apply(ev.ModelCreated(model_id=1, name="digits", labels=["x"], metadata={"k": 1}, created_by="ann"),
                  registered(1, 1, "a"))
    await s.apply(registered(1, 2, "b"))
    assert await s.protected() == {"a": True, "b": True}
    row = await conn.fetchrow("SELECT name, owner, labels::text, metadata::text, last_version FROM models")
    assert tuple(row) == ("digits", "ann", '["x"]', '{"k": 1}', 2)

    await s.apply(ev.ModelVersionDeleted(model_id=1, version=1, checkpoint_uuid="a", experiment_id=E))
    assert await s.protected() == {"a": False, "b": True}
    await s.apply(ev.ModelCreated(model_id=2, name="other"), registered(2, 1, "b"))
    await s.apply(ev.ModelDeleted(model_id=1))  # takes its version 2 along; "b" is still model 2's version 1
    assert await s.versions() == [(2, 1, "b")]
    assert await s.protected() == {"a": False, "b": True}
    # Deleted, and its name taken again in the same batch (the old row leaves before the new one comes).
    await s.apply(ev.ModelDeleted(model_id=2), ev.ModelCreated(model_id=3, name="other"), registered(3, 1, "a"))
    assert await s.versions() == [(3, 1, "a")]
    assert await s.protected() == {"a": True, "b": False}
    assert [tuple(r) for r in await conn.fetch("SELECT id, name, last_version FROM models ORDER BY id")] == \
        [(3, "other", 1)]


async def test_a_checkpoint_projected_after_its_registration_is_still_protected(conn: Any) -> None:
    """Whether a checkpoint shows protected never depends on the batch its registration came in."""
    s = Stream(conn)
    await s.apply(ev.ExperimentSubmitted(experiment_id=E, config=CONFIG, config_yaml="", context_digest="d",
                                         context_size=1, seed=1),
                  ev.TrialCreated(experiment_id=E, trial_id=T, request_id=0, hparams={}, seed=0),
                  ev.ModelCreated(model_id=1, name="m"), registered(1, 1, "late"))
    await s.apply(stored("late", 1), stored("other", 2))
    assert await s.protected() == {"late": True, "other": False}
