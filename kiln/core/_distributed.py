"""``core_context.distributed``: rank, size and object collectives across a trial's processes."""

from __future__ import annotations

import os
from typing import Any


class DistributedContext:
    """Ranks from torchrun/Horovod environment variables; collectives through torch.distributed.

    A single-process trial gets rank 0 of 1 and collectives that just return their input.
    """

    def __init__(self, *, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int = 1,
                 cross_rank: int = 0, cross_size: int = 1) -> None:
        self.rank = rank
        self.size = size
        self.local_rank = local_rank
        self.local_size = local_size
        self.cross_rank = cross_rank
        self.cross_size = cross_size
        self._owns_group = False

    @classmethod
    def from_env(cls) -> DistributedContext:
        """Read torchrun's (or Horovod's) environment; rank 0 of 1 when there is none."""
        env = os.environ
        size = int(env.get("WORLD_SIZE") or env.get("HOROVOD_SIZE") or 1)
        if size <= 1:
            return cls()
        rank = int(env.get("RANK") or env.get("HOROVOD_RANK") or 0)
        local_rank = int(env.get("LOCAL_RANK") or env.get("HOROVOD_LOCAL_RANK") or 0)
        local_size = int(env.get("LOCAL_WORLD_SIZE") or env.get("HOROVOD_LOCAL_SIZE") or size)
        # torchrun names the host (GROUP_RANK); hosts may run different numbers of ranks, so it is not
        # always rank // local_size.
        cross_rank = int(env.get("GROUP_RANK") or env.get("HOROVOD_CROSS_RANK") or rank // max(local_size, 1))
        cross_size = int(env.get("GROUP_WORLD_SIZE") or env.get("HOROVOD_CROSS_SIZE")
                         or max(size // max(local_size, 1), 1))
        return cls(rank=rank, size=size, local_rank=local_rank, local_size=local_size,
                   cross_rank=cross_rank, cross_size=cross_size)

    @classmethod
    def from_torch_distributed(cls) -> DistributedContext:
        """Determined's constructor name: the same as reading torchrun's environment."""
        return cls.from_env()

    def _group(self) -> Any:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
            self._owns_group = True
        return dist

    def allgather(self, stuff: Any) -> list[Any]:
        """Every rank's ``stuff``, in rank order, on every rank."""
        if self.size == 1:
            return [stuff]
        dist = self._group()
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, stuff)
        return out

    def gather(self, stuff: Any) -> list[Any] | None:
        """Every rank's ``stuff`` on rank 0; None elsewhere."""
        everything = self.allgather(stuff)
        return everything if self.rank == 0 else None

    def broadcast(self, stuff: Any) -> Any:
        """Rank 0's ``stuff`` on every rank."""
        if self.size == 1:
            return stuff
        dist = self._group()
        box = [stuff if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def allgather_local(self, stuff: Any) -> list[Any]:
        """``stuff`` from the ranks on this host."""
        everything = self.allgather((self.cross_rank, stuff))
        return [item for host, item in everything if host == self.cross_rank]

    def gather_local(self, stuff: Any) -> list[Any] | None:
        """``stuff`` from this host's ranks on its local rank 0."""
        local = self.allgather_local(stuff)
        return local if self.local_rank == 0 else None

    def broadcast_local(self, stuff: Any) -> Any:
        """Local rank 0's ``stuff`` on this host's ranks."""
        return self.allgather_local(stuff)[0]

    def close(self) -> None:
        """Tear down a process group this context created."""
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False
