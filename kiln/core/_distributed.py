"""``core_context.distributed``: rank, size and object collectives across a trial's processes, in Determined's shape.

``DistributedContext(rank=, size=, local_rank=, local_size=, cross_rank=, cross_size=, chief_ip=, ...)`` takes
the arguments Determined's does, and ``from_torch_distributed()``, ``from_horovod(hvd)`` and
``from_deepspeed()`` read the rank layout the way its constructors do. The object collectives (``allgather``,
``gather``, ``broadcast`` and their ``_local`` forms) run over a gloo process group of their own, so they work
beside a training job's NCCL group and without one: under torchrun they join its rendezvous store; otherwise
(Horovod, a hand-built context) rank 0 listens on ``chief_ip:pub_port``.

Every collective must be called by every rank, in the same order. Nothing else in the Core API is one except
``preempt.should_preempt()`` (in the default ``WorkersAskChief`` mode) and ``checkpoint.store_path(shard=True)``.
"""

from __future__ import annotations

import importlib
import os
from datetime import timedelta
from typing import Any

# Determined's defaults for the chief's two ports (INTER_TRAIN_PROCESS_COMM_PORT_1/2). Kiln's collectives need
# one port: ``pub_port`` is where rank 0 listens when no launcher gave a rendezvous; ``pull_port`` is accepted.
DEFAULT_PUB_PORT = 12360
DEFAULT_PULL_PORT = 12365
# How long a collective waits for the slowest rank before it fails (instead of hanging for ever).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def _env_int(*names: str, default: int | None = None) -> int:
    """The first of ``names`` set in the environment, as an int; ``default`` when none is."""
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    if default is None:
        raise RuntimeError(f"none of {', '.join(names)} is set: was this process started by the launcher "
                           "this constructor is for?")
    return default


def _chief_ip(chief_ip: str | None) -> str | None:
    """An explicit chief address, else Determined's ``DET_CHIEF_IP``, Kiln's ``KILN_CHIEF_IP`` or torchrun's."""
    return chief_ip or os.environ.get("DET_CHIEF_IP") or os.environ.get("KILN_CHIEF_IP") \
        or os.environ.get("MASTER_ADDR") or None


class DistributedContext:
    """The layout of a trial's processes and object collectives across them.

    Give all six of rank, size, local_rank, local_size, cross_rank and cross_size, or none (one process:
    rank 0 of 1, whose collectives return their input). ``chief_ip`` is required when the ranks span hosts
    (``cross_size > 1``). ``port_offset`` shifts both ports (default: ``DET_UNIQUE_PORT_OFFSET``, which the
    worker sets per allocation).
    """

    def __init__(self, *, rank: int | None = None, size: int | None = None, local_rank: int | None = None,
                 local_size: int | None = None, cross_rank: int | None = None, cross_size: int | None = None,
                 chief_ip: str | None = None, pub_port: int = DEFAULT_PUB_PORT, pull_port: int = DEFAULT_PULL_PORT,
                 port_offset: int | None = None, force_tcp: bool = False) -> None:
        layout = (rank, size, local_rank, local_size, cross_rank, cross_size)
        if sum(x is not None for x in layout) not in (0, 6):
            raise ValueError("rank, size, local_rank, local_size, cross_rank and cross_size must all be given, "
                             "or none of them")
        self.rank = 0 if rank is None else int(rank)
        self.size = 1 if size is None else int(size)
        self.local_rank = 0 if local_rank is None else int(local_rank)
        self.local_size = 1 if local_size is None else int(local_size)
        self.cross_rank = 0 if cross_rank is None else int(cross_rank)
        self.cross_size = 1 if cross_size is None else int(cross_size)
        if not (0 <= self.rank < self.size and 0 <= self.local_rank < self.local_size <= self.size
                and 0 <= self.cross_rank < self.cross_size <= self.size):
            raise ValueError(f"inconsistent layout: rank {self.rank} of {self.size}, local rank {self.local_rank} "
                             f"of {self.local_size}, host {self.cross_rank} of {self.cross_size}")
        if self.cross_size > 1 and not chief_ip:
            raise ValueError("chief_ip is required when the ranks span hosts (cross_size > 1): pass it, or set "
                             "DET_CHIEF_IP")
        # On one host every rank reaches the chief on loopback, as in Determined.
        self.chief_ip = chief_ip if self.cross_size > 1 else (chief_ip or "127.0.0.1")
        # Trials share a host's network here (no containers), so the worker gives each allocation its own
        # offset (DET_UNIQUE_PORT_OFFSET, as Determined does) and a hand-built context uses it by default.
        if port_offset is None:
            port_offset = _env_int("DET_UNIQUE_PORT_OFFSET", default=0)
        self.pub_port = pub_port + port_offset
        self.pull_port = pull_port + port_offset
        self.force_tcp = force_tcp
        self._pg: Any = None  # the gloo group the collectives use, made at the first one
        self._owns_default = False

    # -- constructors ----------------------------------------------------------------------------------------

    @classmethod
    def from_env(cls) -> DistributedContext:
        """Whatever launcher started this process (torchrun, Horovod, DeepSpeed); rank 0 of 1 when none did."""
        env = os.environ
        if int(env.get("WORLD_SIZE") or 1) > 1:
            return cls.from_torch_distributed()
        if int(env.get("HOROVOD_SIZE") or env.get("OMPI_COMM_WORLD_SIZE") or 1) > 1:
            return cls._from_horovod_env()
        return cls()

    @classmethod
    def from_torch_distributed(cls, chief_ip: str | None = None) -> DistributedContext:
        """The layout torchrun (``torch.distributed.run``) gives its processes in their environment."""
        size = _env_int("WORLD_SIZE", default=1)
        rank = _env_int("RANK", default=0)
        local_size = _env_int("LOCAL_WORLD_SIZE", default=size)
        # torchrun names the host (GROUP_RANK); hosts may run different numbers of ranks, so it is not
        # always rank // local_size.
        cross_rank = _env_int("GROUP_RANK", default=rank // max(local_size, 1))
        cross_size = _env_int("GROUP_WORLD_SIZE", default=max(size // max(local_size, 1), 1))
        return cls(rank=rank, size=size, local_rank=_env_int("LOCAL_RANK", default=0), local_size=local_size,
                   cross_rank=cross_rank, cross_size=cross_size, chief_ip=_chief_ip(chief_ip))

    @classmethod
    def from_horovod(cls, hvd: Any = None, chief_ip: str | None = None) -> DistributedContext:
        """The layout from an initialised Horovod module (``import horovod.torch as hvd; hvd.init()``)."""
        if hvd is None:
            try:
                hvd = importlib.import_module("horovod.torch")
            except ImportError as exc:
                raise ImportError("DistributedContext.from_horovod() needs Horovod, which is not installed here; "
                                  "install it, or build the layout with DistributedContext(rank=..., ...)") from exc
            hvd.init()
        return cls(rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(), local_size=hvd.local_size(),
                   cross_rank=hvd.cross_rank(), cross_size=hvd.cross_size(), chief_ip=_chief_ip(chief_ip))

    @classmethod
    def _from_horovod_env(cls) -> DistributedContext:
        """The layout horovodrun (gloo or MPI) puts in its processes' environment, without importing Horovod."""
        size = _env_int("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE")
        local_size = _env_int("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", default=size)
        rank = _env_int("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK")
        return cls(rank=rank, size=size, local_rank=_env_int("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
                   local_size=local_size, cross_rank=_env_int("HOROVOD_CROSS_RANK", default=rank // local_size),
                   cross_size=_env_int("HOROVOD_CROSS_SIZE", default=max(size // local_size, 1)),
                   chief_ip=_chief_ip(None))

    @classmethod
    def from_deepspeed(cls, chief_ip: str | None = None) -> DistributedContext:
        """The layout the DeepSpeed launcher gives its processes (torchrun's names where its own are missing)."""
        size = _env_int("WORLD_SIZE")
        local_size = _env_int("LOCAL_SIZE", "LOCAL_WORLD_SIZE", default=size)
        rank = _env_int("RANK")
        return cls(rank=rank, size=size, local_rank=_env_int("LOCAL_RANK"), local_size=local_size,
                   cross_rank=_env_int("CROSS_RANK", "GROUP_RANK", default=rank // local_size),
                   cross_size=_env_int("CROSS_SIZE", "GROUP_WORLD_SIZE", default=max(size // local_size, 1)),
                   chief_ip=_chief_ip(chief_ip))

    # -- Determined's getters ----------------------------------------------------------------------------------

    def get_rank(self) -> int:
        """This process's rank in the trial."""
        return self.rank

    def get_local_rank(self) -> int:
        """This process's rank on its host."""
        return self.local_rank

    def get_size(self) -> int:
        """How many processes the trial runs."""
        return self.size

    def get_local_size(self) -> int:
        """How many of the trial's processes run on this host."""
        return self.local_size

    def get_cross_rank(self) -> int:
        """Which of the trial's hosts this is."""
        return self.cross_rank

    def get_num_agents(self) -> int:
        """How many hosts the trial runs on."""
        return self.cross_size

    # -- collectives -------------------------------------------------------------------------------------------

    def _group(self) -> tuple[Any, Any]:
        """``(torch.distributed, group)``: a gloo group for the object collectives, made on first use.

        A job that already has a gloo default group shares it; one with another backend (NCCL) gets a gloo
        group beside it. Otherwise the default group is created: from torchrun's rendezvous when a launcher
        set ``MASTER_ADDR``/``MASTER_PORT``, else with rank 0 listening on ``chief_ip:pub_port``.
        """
        import torch.distributed as dist

        if self._pg is None:
            if not dist.is_initialized():
                env = os.environ
                init = "env://" if env.get("MASTER_ADDR") and env.get("MASTER_PORT") \
                    else f"tcp://{self.chief_ip}:{self.pub_port}"
                dist.init_process_group(backend="gloo", init_method=init, rank=self.rank, world_size=self.size,
                                        timeout=COLLECTIVE_TIMEOUT)
                self._owns_default = True
            if dist.get_backend() == "gloo":
                self._pg = dist.group.WORLD
            else:
                self._pg = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
        return dist, self._pg

    def allgather(self, stuff: Any) -> list[Any]:
        """Every rank's ``stuff``, in rank order, on every rank."""
        if self.size < 2:
            return [stuff]
        dist, group = self._group()
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, stuff, group=group)
        return out

    def gather(self, stuff: Any) -> list[Any] | None:
        """Every rank's ``stuff`` on the chief, in rank order; None on the other ranks."""
        everything = self.allgather(stuff)
        return everything if self.rank == 0 else None

    def broadcast(self, stuff: Any) -> Any:
        """The chief's ``stuff`` on every rank (what the other ranks pass is ignored)."""
        if self.size < 2:
            return stuff
        dist, group = self._group()
        box = [stuff if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    def allgather_local(self, stuff: Any) -> list[Any]:
        """``stuff`` from the ranks on this host, in local-rank order, on each of them."""
        if self.local_size < 2 and self.size < 2:
            return [stuff]
        # One collective over every rank keeps all hosts in step (each host's ranks call it together).
        everything = self.allgather((self.cross_rank, stuff))
        return [item for host, item in everything if host == self.cross_rank]

    def gather_local(self, stuff: Any) -> list[Any] | None:
        """``stuff`` from this host's ranks on its local chief (local rank 0); None elsewhere."""
        local = self.allgather_local(stuff)
        return local if self.local_rank == 0 else None

    def broadcast_local(self, stuff: Any = None) -> Any:
        """The local chief's ``stuff`` on this host's ranks."""
        return self.allgather_local(stuff)[0]

    def close(self) -> None:
        """Tear down a process group this context created."""
        if self._owns_default:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_default = False
        self._pg = None
