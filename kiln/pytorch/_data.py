"""``kiln.pytorch.DataLoader``: torch's DataLoader arguments, with a batch order the Trainer can resume.

The Trainer does not iterate the user's loader directly: it asks for ``get_data_loader(...)``, whose batches
are a pure function of (seed, epoch, batch), sharded across the trial's slots, repeated across epochs and
starting after the batches a checkpoint already trained on. A paused and resumed trial therefore sees the
same batches, in the same order, as one that was never interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.utils.data

TorchData = dict[str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor


class _ResumableBatches:
    """Index batches for a torch DataLoader's ``batch_sampler``: epoch ``e``'s order is seeded by (seed, e)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int, repeat: bool,
                 skip: int, num_replicas: int, rank: int, sampler: Any = None) -> None:
        self._n = n
        self._sampler = sampler
        self._batch_size = batch_size
        self._shuffle = shuffle
        self._drop_last = drop_last
        self._seed = seed
        self._repeat = repeat
        self._skip = skip
        self._replicas = num_replicas
        self._rank = rank

    def _epoch_indices(self, epoch: int) -> list[int]:
        if self._sampler is not None:
            if hasattr(self._sampler, "set_epoch"):
                self._sampler.set_epoch(epoch)
            return list(self._sampler)
        if self._shuffle:
            gen = torch.Generator().manual_seed(self._seed * 1_000_003 + epoch)
            return torch.randperm(self._n, generator=gen).tolist()
        return list(range(self._n))

    def _global_batches(self) -> int:
        n = len(self._sampler) if self._sampler is not None else self._n
        return n // self._batch_size if self._drop_last else -(-n // self._batch_size)

    def __len__(self) -> int:
        """Batches per epoch on this slot.

        Training (``repeat``): every slot gets the same count, so the slots step together (DDP's gradient
        allreduce is a collective); the global batches left over when their count does not divide by the
        slots are dropped. Evaluation: every global batch is evaluated exactly once, so the first
        ``global % replicas`` slots take one batch more.
        """
        total = self._global_batches()
        if self._replicas == 1:
            return total
        if self._repeat:
            return total // self._replicas
        return len(range(self._rank, total, self._replicas))

    def _one_epoch(self, epoch: int) -> Iterator[list[int]]:
        indices = self._epoch_indices(epoch)
        per_slot = len(self)
        for i in range(per_slot):
            # Slot r takes global batches r, r + replicas, ... (Determined deals batches out the same way):
            # each optimizer step sees replicas consecutive batches of the global order, as one slot would.
            b = i * self._replicas + self._rank
            yield indices[b * self._batch_size:(b + 1) * self._batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = len(self)
        if per_epoch == 0:
            return
        epoch, offset = divmod(self._skip, per_epoch)
        while True:
            for i, batch in enumerate(self._one_epoch(epoch)):
                if i >= offset:
                    yield batch
            offset = 0
            epoch += 1
            if not self._repeat:
                return


class DataLoader:
    """Determined's DataLoader: takes torch's arguments; the Trainer builds the real loader from them.

    Iterating it directly (e.g. in ``evaluate_full_dataset``) gives a plain torch DataLoader's batches.
    """

    def __init__(self, dataset: torch.utils.data.Dataset[Any], batch_size: int | None = 1, shuffle: bool = False,
                 sampler: Any = None, batch_sampler: Any = None, num_workers: int = 0, collate_fn: Any = None,
                 pin_memory: bool = False, drop_last: bool = False, timeout: float = 0,
                 worker_init_fn: Any = None, multiprocessing_context: Any = None, generator: Any = None, *,
                 prefetch_factor: int | None = None, persistent_workers: bool = False) -> None:
        if batch_sampler is not None:
            raise ValueError("kiln.pytorch.DataLoader does not take batch_sampler (it must own the batch order "
                             "to resume exactly); return a torch.utils.data.DataLoader with "
                             "context.experimental.disable_dataset_reproducibility_checks() instead")
        if batch_size is None or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError("kiln.pytorch.DataLoader needs a map-style dataset; for an IterableDataset "
                             "return a torch.utils.data.DataLoader (see disable_dataset_reproducibility_checks)")
        if shuffle and sampler is not None:
            raise ValueError("give either shuffle=True or a sampler, not both")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.sampler = sampler
        self.drop_last = drop_last
        self._loader_kwargs: dict[str, Any] = {
            "num_workers": num_workers, "collate_fn": collate_fn, "pin_memory": pin_memory, "timeout": timeout,
            "worker_init_fn": worker_init_fn, "multiprocessing_context": multiprocessing_context,
            "generator": generator, "persistent_workers": persistent_workers}
        if prefetch_factor is not None:
            self._loader_kwargs["prefetch_factor"] = prefetch_factor

    def get_data_loader(self, repeat: bool = False, skip: int = 0, num_replicas: int = 1, rank: int = 0,
                        seed: int = 0) -> torch.utils.data.DataLoader[Any]:
        """The torch DataLoader the Trainer iterates: this slot's shard, ``skip`` batches in, epoch order
        seeded by ``seed``; ``repeat`` runs through epochs without end (its ``len`` is one epoch)."""
        batches = _ResumableBatches(len(self.dataset), self.batch_size, shuffle=self.shuffle,  # type: ignore[arg-type]
                                    drop_last=self.drop_last, seed=seed, repeat=repeat, skip=skip,
                                    num_replicas=num_replicas, rank=rank, sampler=self.sampler)
        kwargs = dict(self._loader_kwargs)
        if kwargs["generator"] is None:
            # Starting an iterator draws a base seed for workers; from its own generator it leaves the global
            # RNG alone, so validations and a resume's fresh iterator do not shift the trial's dropout masks.
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.get_data_loader())

    def __len__(self) -> int:
        return len(_ResumableBatches(len(self.dataset), self.batch_size, shuffle=False,  # type: ignore[arg-type]
                                     drop_last=self.drop_last, seed=0, repeat=False, skip=0, num_replicas=1,
                                     rank=0, sampler=self.sampler))


def to_device(data: Any, device: torch.device | str, warned_types: set[type] | None = None) -> Any:
    """Move tensors (and modules) in nested dicts, lists and tuples to ``device``; other values stay."""
    if hasattr(data, "to") and callable(data.to) and isinstance(data, (torch.Tensor, torch.nn.Module)):
        return data.to(device)
    if isinstance(data, dict):
        return {k: to_device(v, device, warned_types) for k, v in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # a namedtuple
        return type(data)(*(to_device(v, device, warned_types) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(to_device(v, device, warned_types) for v in data)
    return data


def data_length(data: Any) -> int:
    """The number of records in a batch (the first dimension of its first tensor)."""
    if isinstance(data, torch.Tensor):
        return int(data.shape[0]) if data.dim() else 1
    if isinstance(data, dict):
        return data_length(next(iter(data.values())))
    if isinstance(data, (list, tuple)) and data:
        return data_length(data[0])
    raise TypeError(f"cannot tell the length of a batch of type {type(data).__name__}; "
                    "override PyTorchTrial.get_batch_length")


