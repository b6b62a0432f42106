"""``kiln.core.init`` and ``DistributedContext`` take Determined's arguments and refuse any other."""

from __future__ import annotations

from pathlib import Path

import pytest

import kiln as det
from kiln.core import DistributedContext, PreemptMode, TensorboardMode


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KILN_CLUSTER_INFO", "WORLD_SIZE", "RANK", "HOROVOD_SIZE", "MASTER_ADDR", "DET_CHIEF_IP"):
        monkeypatch.delenv(name, raising=False)


def test_an_unknown_argument_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="bogus"):
        det.core.init(bogus=1)  # type: ignore[call-arg]


def test_determineds_arguments_are_accepted(tmp_path: Path) -> None:
    with det.core.init(distributed=DistributedContext(), checkpoint_storage=str(tmp_path),
                       preempt_mode=PreemptMode.ChiefOnly, tensorboard_mode=TensorboardMode.MANUAL) as ctx:
        assert ctx.preempt.mode is PreemptMode.ChiefOnly and not ctx.preempt.should_preempt()
        with ctx.checkpoint.store_path({"steps_completed": 1}) as (path, storage_id):
            (path / "w").write_text("x")
    assert (tmp_path / storage_id / "w").read_text() == "x"
    with det.core.init(checkpoint_storage={"type": "shared_fs", "host_path": str(tmp_path), "storage_path": "s"},
                       preempt_mode="WORKERS_ASK_CHIEF", tensorboard_mode="AUTO") as ctx:
        sid = ctx.checkpoint.upload(tmp_path / storage_id, {"steps_completed": 2})
    assert (tmp_path / "s" / sid / "w").exists()


def test_a_bad_mode_or_storage_says_what_it_expected() -> None:
    with pytest.raises(ValueError, match="preempt_mode='sometimes'.*WorkersAskChief"):
        det.core.init(preempt_mode="sometimes")
    with pytest.raises(ValueError, match="checkpoint_storage"):
        det.core.init(checkpoint_storage={"type": "gcs"})


def test_the_distributed_context_takes_determineds_layout_arguments() -> None:
    d = DistributedContext(rank=1, size=4, local_rank=1, local_size=2, cross_rank=0, cross_size=2,
                           chief_ip="10.0.0.1", pub_port=12360, pull_port=12365, port_offset=5)
    assert (d.get_rank(), d.get_size(), d.get_local_rank(), d.get_num_agents()) == (1, 4, 1, 2)
    assert (d.chief_ip, d.pub_port, d.pull_port) == ("10.0.0.1", 12365, 12370)
    one = DistributedContext()
    assert (one.rank, one.size, one.allgather(3), one.gather(3), one.broadcast(3), one.gather_local(3)) == \
        (0, 1, [3], [3], 3, [3])


def test_a_partial_or_inconsistent_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="must all be given"):
        DistributedContext(rank=0, size=2)
    with pytest.raises(ValueError, match="inconsistent layout"):
        DistributedContext(rank=2, size=2, local_rank=0, local_size=2, cross_rank=0, cross_size=1)
    with pytest.raises(ValueError, match="chief_ip is required"):
        DistributedContext(rank=0, size=2, local_rank=0, local_size=1, cross_rank=0, cross_size=2)


def test_constructors_read_their_launchers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                 "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "10.1.1.1"}.items():
        monkeypatch.setenv(k, v)
    d = DistributedContext.from_torch_distributed()
    assert (d.rank, d.size, d.local_rank, d.local_size, d.cross_rank, d.cross_size, d.chief_ip) == \
        (3, 4, 1, 2, 1, 2, "10.1.1.1")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setenv("CROSS_RANK", "1")
    monkeypatch.setenv("CROSS_SIZE", "2")
    assert DistributedContext.from_deepspeed(chief_ip="10.2.2.2").chief_ip == "10.2.2.2"
    monkeypatch.delenv("RANK")
    with pytest.raises(RuntimeError, match="RANK"):
        DistributedContext.from_deepspeed()


def test_from_horovod_reads_the_module_it_is_given_and_says_when_horovod_is_missing() -> None:
    class FakeHvd:
        def rank(self) -> int: return 1
        def size(self) -> int: return 2
        def local_rank(self) -> int: return 1
        def local_size(self) -> int: return 2
        def cross_rank(self) -> int: return 0
        def cross_size(self) -> int: return 1

    d = DistributedContext.from_horovod(FakeHvd())
    assert (d.rank, d.size, d.chief_ip) == (1, 2, "127.0.0.1")
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs Horovod, which is not installed"):
            DistributedContext.from_horovod()
