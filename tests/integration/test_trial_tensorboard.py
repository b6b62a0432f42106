"""A trial's TensorBoard files through ``kiln.core`` and its worker's link into the real S3 store.

The Core API (AUTO mode) writes the reported metrics as scalars and uploads its TensorBoard directory, user
files included, under ``tensorboard/<experiment>/<trial>/``: by the time a validation report or a checkpoint
returns, and at exit. The link grants that prefix to this trial alone.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from deploy import parts as p
from kiln import core
from kiln.core._bus import LinkError
from schemas.trial import CLUSTER_INFO_ENV, ClusterInfo, TrialInfo, tensorboard_prefix
from services.worker.link import Identity, MinioStore, TrialLink, socket_path

pytestmark = pytest.mark.integration


async def _no_stops(who: Identity, on_stop: Any) -> None:
    await asyncio.Event().wait()


async def _append(event: Any) -> int:
    return 1


def _keys(minio: Any, prefix: str) -> set[str]:
    return {o.object_name[len(prefix):] for o in minio.list_objects("kiln", prefix=prefix, recursive=True)}


def _scalars(minio: Any, prefix: str, where: Path) -> dict[str, list[tuple[int, float]]]:
    for rel in _keys(minio, prefix):
        (where / rel).parent.mkdir(parents=True, exist_ok=True)
        minio.fget_object("kiln", prefix + rel, str(where / rel))
    acc = EventAccumulator(str(where), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


async def test_the_core_api_uploads_its_trials_tensorboard_files_and_no_other_trials(
        parts: p.RunningParts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    minio = p.s3_client(parts.cfg)
    exp = 600_000 + uuid.uuid4().int % 100_000
    who = Identity(experiment_id=exp, trial_id=5, allocation_id="5.1")
    link = TrialLink(socket_path(tmp_path / "5.1"), who, _append, _no_stops, store=MinioStore(minio, "kiln"))
    await link.start()
    wire = ClusterInfo(master_url="", cluster_id="c", allocation_id="5.1", worker_id="w", link_path=str(link.path),
                       s3_bucket="kiln", trial=TrialInfo(
                           trial_id=5, experiment_id=exp, hparams={}, trial_seed=0,
                           config={"entrypoint": "t:T", "searcher": {"name": "single", "metric": "accuracy"}}))
    monkeypatch.setenv(CLUSTER_INFO_ENV, msgspec.json.encode(wire).decode())
    prefix = tensorboard_prefix(exp, 5) + "/"

    def trial() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with core.init() as ctx:
            board = ctx.train.get_tensorboard_path()
            seen["board"] = board
            ctx.train.report_training_metrics(steps_completed=1, metrics={"loss": 0.5})
            ctx.train.report_validation_metrics(steps_completed=1, metrics={"accuracy": 0.9})
            seen["after_validation"] = _keys(minio, prefix)
            (board / "user").mkdir()
            (board / "user" / "notes.txt").write_text("written by the script")
            with ctx.checkpoint.store_path({"steps_completed": 1}) as (path, _):
                (path / "w.bin").write_bytes(b"w")
            seen["after_checkpoint"] = _keys(minio, prefix)
            ctx.train.report_training_metrics(steps_completed=2, metrics={"loss": 0.25})
            (board / "user" / "last.txt").write_text("just before the end")
            refused = []
            for key in (tensorboard_prefix(exp, 6) + "/events", tensorboard_prefix(exp + 1, 5) + "/events",
                        prefix + "../6/events"):
                try:
                    ctx._reporter.presign("PUT", key)
                except LinkError as exc:
                    refused.append(str(exc))
            seen["refused"] = refused
        return seen

    seen = await asyncio.to_thread(trial)
    await link.close()
    (event_file,) = [k for k in seen["after_validation"] if "tfevents" in k]
    assert seen["after_checkpoint"] >= {event_file, "user/notes.txt"}
    assert _keys(minio, prefix) == {event_file, "user/notes.txt", "user/last.txt"}
    scalars = _scalars(minio, prefix, tmp_path / "read")
    assert scalars["training/loss"] == [(1, 0.5), (2, 0.25)]  # the step-2 point went up at exit
    assert scalars["validation/accuracy"] == [(1, pytest.approx(0.9))]
    assert len(seen["refused"]) == 3 and all("outside" in r or "'..'" in r for r in seen["refused"])
    assert not seen["board"].exists()  # the process's directory is removed at exit
