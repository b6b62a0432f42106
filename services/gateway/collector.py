"""Checkpoint deletion: the objects of collected (and user-deleted) checkpoints leave the store.

The searcher decides what retention collects (``CheckpointGCRequested``) but holds no store credential; trials
hold none either. The gateway holds the cluster store's key already (code contexts, checkpoint downloads), so
it deletes: a durable consumer of the searcher's experiment facts (``run``), and ``DELETE
/api/v1/checkpoints/{uuid}`` for an explicit delete. Either way it then publishes ``CheckpointsDeleted`` (which
the tracker projects as ``checkpoints.state = DELETED`` and the searcher folds). Deleting is idempotent, so a
redelivered request deletes nothing more and republishes the same fact (same ``Nats-Msg-Id``, dropped).

A checkpoint registered as a model version is never deleted here. The searcher folds the registry and never asks
for one; but a version registered after the searcher decided and before the collector acts would otherwise lose
its files, so the collector asks the read model (``registered``) right before deleting and keeps those.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from minio.deleteobjects import DeleteObject

from schemas import events as ev
from schemas import subjects
from services.runtime import Bus, ConsumerSpec, Delivery

log = structlog.get_logger(__name__)

# Only what the searcher publishes about experiments: its retention decisions (and facts it ignores here).
CONSUMER = ConsumerSpec(durable="gateway-gc", stream=subjects.EVENTS,
                        filter_subjects=["kiln.events.*.experiment.searcher"])


def object_prefix(storage: str, bucket: str, uuid: str) -> str | None:
    """The key prefix of a checkpoint's objects in the cluster's bucket; None when it is stored elsewhere."""
    root = f"s3://{bucket}"
    if storage != root and not storage.startswith(root + "/"):
        return None
    key_prefix = storage[len(root):].strip("/")
    return "/".join(p for p in (key_prefix, subjects.check_token(uuid, "checkpoint uuid")) if p) + "/"


def delete_objects(minio: Any, bucket: str, prefix: str) -> int:
    """Delete every object under ``prefix``; return how many there were."""
    names = [str(o.object_name) for o in minio.list_objects(bucket, prefix=prefix, recursive=True)]
    if names:
        errors = list(minio.remove_objects(bucket, [DeleteObject(n) for n in names]))
        if errors:
            raise RuntimeError(f"could not delete {len(errors)} objects under {prefix}: {errors[0]}")
    return len(names)


def delete_checkpoints(minio: Any, bucket: str, refs: list[ev.CheckpointRef]) -> tuple[int, list[str]]:
    """Delete these checkpoints' objects: (objects removed, uuids stored outside the cluster's store)."""
    removed, elsewhere = 0, []
    for ref in refs:
        prefix = object_prefix(ref.storage, bucket, ref.uuid)
        if prefix is None:
            elsewhere.append(ref.uuid)
            continue
        removed += delete_objects(minio, bucket, prefix)
    return removed, elsewhere


Registered = Callable[[list[str]], Awaitable[set[str]]]  # which of these uuids a model version names


async def collect(bus: Bus, minio: Any, bucket: str, request: ev.CheckpointGCRequested,
                  registered: Registered | None = None) -> ev.CheckpointsDeleted | None:
    """Carry out one retention decision (less any checkpoint registered meanwhile) and publish that it was done."""
    refs = request.checkpoints
    keep = await registered([c.uuid for c in refs]) if registered is not None and refs else set()
    if keep:
        log.warning("checkpoints.kept_registered", experiment_id=request.experiment_id, checkpoints=sorted(keep))
        refs = [c for c in refs if c.uuid not in keep]
        if not refs:
            return None
    removed, elsewhere = await asyncio.to_thread(delete_checkpoints, minio, bucket, refs)
    done = ev.CheckpointsDeleted(experiment_id=request.experiment_id, uuids=[c.uuid for c in refs],
                                 reason=f"retention: {request.reason}" if request.reason else "retention",
                                 objects_removed=removed, not_in_store=elsewhere)
    await bus.publish(done)
    log.info("checkpoints.collected", experiment_id=request.experiment_id, checkpoints=len(done.uuids),
             objects=removed, not_in_store=len(elsewhere))
    return done


async def run(bus: Bus, minio: Any, bucket: str, stop: asyncio.Event, registered: Registered | None = None) -> None:
    """Consume the searcher's retention decisions until ``stop`` is set."""

    async def handle(batch: list[Delivery[Any]]) -> None:
        for d in batch:
            if isinstance(d.event, ev.CheckpointGCRequested):
                await collect(bus, minio, bucket, d.event, registered)

    await bus.consume(CONSUMER, msgspec.json.Decoder(ev.DomainEvent), handle, stop)
