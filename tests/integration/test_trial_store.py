"""A trial's checkpoints through its worker: presigned URLs on a real S3 store, nothing outside its prefix.

Also the OS side the worker prepares (services.worker.sandbox): work dirs pruned to the newest few, and a
work dir given to the trial user.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from deploy import parts as p
from kiln.core._bus import LinkError, TrialBus
from kiln.core._checkpoint import CheckpointContext, LinkedS3Storage
from schemas import events as ev
from schemas.trial import checkpoint_prefix
from services.worker import sandbox
from services.worker.link import Identity, MinioStore, TrialLink, descends_from, socket_path

pytestmark = pytest.mark.integration


@pytest.fixture
def passable_tmp() -> Iterator[Path]:
    """A temp dir other users may pass through (pytest's tmp_path sits under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="kiln-sandbox-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _no_stops(who: Identity, on_stop: Any) -> None:
    await asyncio.Event().wait()


async def _append(event: Any) -> int:
    return 1


async def test_a_trial_stores_and_restores_its_checkpoints_and_reaches_nothing_else(parts: p.RunningParts,
                                                                                  tmp_path: Path) -> None:
    minio = p.s3_client(parts.cfg)
    exp = 500_000 + uuid.uuid4().int % 100_000
    other = f"{checkpoint_prefix(exp + 1)}/{uuid.uuid4()}/model.pt"
    minio.put_object("kiln", other, io.BytesIO(b"someone else's weights"), 22)
    who = Identity(experiment_id=exp, trial_id=1, allocation_id="1.1")
    link = TrialLink(socket_path(tmp_path / "1.1"), who, _append, _no_stops, store=MinioStore(minio, "kiln"))
    await link.start()

    def trial() -> dict[str, Any]:
        bus = TrialBus(str(link.path), exp, 1, "1.1")
        storage = LinkedS3Storage(lambda: bus, "kiln", checkpoint_prefix(exp))
        stored: list[str] = []
        ckpt = CheckpointContext(storage, lambda sid, *a: stored.append(sid))
        big = os.urandom(3 * (1 << 20) + 17)  # several chunks, streamed
        with ckpt.store_path({"steps_completed": 5}) as (path, storage_id):
            (path / "model.pt").write_bytes(big)
            (path / "sub").mkdir()
            (path / "sub" / "opt.bin").write_bytes(b"opt")
        with ckpt.restore_path(storage_id) as restored:
            got = {"model": (restored / "model.pt").read_bytes() == big,
                   "sub": (restored / "sub" / "opt.bin").read_bytes(),
                   "meta": ckpt.get_metadata(storage_id)}
        refused = []
        for method, key in (("GET", other), ("PUT", other), ("GET", f"{checkpoint_prefix(exp)}/../{other}")):
            try:
                bus.presign(method, key)
            except LinkError as exc:
                refused.append(str(exc))
        for prefix in ("", "checkpoints/", f"{checkpoint_prefix(exp + 1)}/"):
            try:
                bus.list_keys(prefix)
            except LinkError as exc:
                refused.append(str(exc))
        # A URL for its own object does not open others: the signature covers the key and the method.
        url = bus.presign("GET", f"{checkpoint_prefix(exp)}/{storage_id}/model.pt")
        forged = httpx.get(url.replace(f"{checkpoint_prefix(exp)}/{storage_id}/model.pt", other))
        deleted = httpx.delete(url)
        bus.close()
        return {"stored": stored, "id": storage_id, "got": got, "refused": refused,
                "forged": forged.status_code, "deleted": deleted.status_code}

    out = await asyncio.to_thread(trial)
    await link.close()
    assert out["stored"] == [out["id"]]
    assert out["got"] == {"model": True, "sub": b"opt", "meta": {"steps_completed": 5}}
    assert len(out["refused"]) == 6 and all("outside" in r or "'..'" in r or "empty" in r for r in out["refused"])
    assert out["forged"] == 403 and out["deleted"] == 403
    assert link.refused == 6
    keys = {o.object_name for o in minio.list_objects("kiln", prefix=f"{checkpoint_prefix(exp)}/", recursive=True)}
    assert keys == {f"{checkpoint_prefix(exp)}/{out['id']}/{f}" for f in ("model.pt", "sub/opt.bin", "metadata.json",
                                                                            "kiln-manifest.json")}
    resp = minio.get_object("kiln", other)
    assert resp.read() == b"someone else's weights"
    resp.close()
    resp.release_conn()


def test_work_dirs_are_pruned_to_the_newest_few(tmp_path: Path) -> None:
    for i in range(8):
        d = tmp_path / f"{i}.1"
        d.mkdir()
        os.utime(d, (time.time() - 100 + i, time.time() - 100 + i))
    (tmp_path / "outbox.sqlite").write_bytes(b"")
    (tmp_path / ".keep").mkdir()
    removed = sandbox.prune_work_dirs(tmp_path, 3, running={"0.1"})
    assert sorted(removed) == ["1.1", "2.1", "3.1", "4.1"]
    assert sorted(x.name for x in tmp_path.iterdir()) == [".keep", "0.1", "5.1", "6.1", "7.1", "outbox.sqlite"]
    assert sorted(sandbox.prune_work_dirs(tmp_path, 0, running=set())) == ["0.1", "5.1", "6.1", "7.1"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_as_root_trials_run_as_an_unprivileged_user_with_a_python_it_can_reach(passable_tmp: Path) -> None:
    tmp_path = passable_tmp
    runtime = sandbox.prepare(sandbox.DEFAULT_TRIAL_USER, tmp_path)
    assert runtime.user is not None and runtime.user.uid != 0
    work = tmp_path / "w" / "1.1"
    (work / "code").mkdir(parents=True)
    (work / "code" / "train.py").write_text("print('hi')\n")
    sandbox.give_to(work, runtime.owner)
    st = work.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (runtime.user.uid, runtime.user.gid, 0o700)
    assert (work / "code" / "train.py").stat().st_uid == runtime.user.uid
    assert sandbox.blocked_dir(Path(runtime.python), runtime.user) is None


async def test_only_the_trials_own_processes_may_use_its_link(tmp_path: Path) -> None:
    """Trials of a host share one OS user: the link serves only the trial's process and its descendants."""
    events: list[Any] = []

    async def append(event: Any) -> int:
        events.append(event)
        return len(events)

    who = Identity(experiment_id=9, trial_id=1, allocation_id="1.1")
    progress = ev.TrialProgressReported(experiment_id=9, trial_id=1, progress=0.5)

    def report(path: Path) -> str:
        try:
            bus = TrialBus(str(path), 9, 1, "1.1")
            bus.publish(progress)
            bus.close()
            return "stored"
        except LinkError as exc:
            return str(exc)

    another_trial = subprocess.Popen(["sleep", "60"])
    try:
        other = TrialLink(socket_path(tmp_path / "other"), who, append, _no_stops, check_peer=True)
        await other.start()
        other.admit(another_trial.pid)  # this test process is no descendant of it
        refused = await asyncio.to_thread(report, other.path)
        assert "closed the link" in refused or "lost" in refused
        assert other.refused == 1 and events == []
        await other.close()
    finally:
        another_trial.kill()
        another_trial.wait()

    own = TrialLink(socket_path(tmp_path / "own"), who, append, _no_stops, check_peer=True)
    await own.start()
    own.admit(os.getppid())  # this process descends from its parent
    assert await asyncio.to_thread(report, own.path) == "stored"
    assert events == [msgspec.structs.replace(progress, allocation_id="1.1")]  # stamped with its run
    await own.close()


def test_descent_is_followed_through_parents() -> None:
    assert descends_from(os.getpid(), os.getpid())
    assert descends_from(os.getpid(), os.getppid())
    assert not descends_from(os.getppid(), os.getpid())
