"""``Batch`` and ``Epoch``: how long to train and how often to validate, checkpoint and report."""

from __future__ import annotations

import sys
from collections.abc import Container
from typing import Literal


class TrainUnit:
    """A length of training: an int is a period (``Batch(100)``: every 100 batches), a container a schedule
    (``Batch([5, 30])``: after batches 5 and 30)."""

    def __init__(self, value: int | Container[int]) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, Container)):
            raise TypeError(f"{type(self).__name__} takes an int or a container of ints, got {value!r}")
        self.value = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainUnit) and type(other) is type(self) and other.value == self.value

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self.value)))

    def reached(self, count: int) -> bool:
        """True when ``count`` units completed is one of this period's (or schedule's) boundaries."""
        if isinstance(self.value, int):
            if self.value < 1:  # Determined: a period of 0 or less means every unit
                return count > 0
            return count > 0 and count % self.value == 0
        return count in self.value

    def length(self) -> int:
        """The value as a length (``max_length`` takes an int only)."""
        if not isinstance(self.value, int):
            raise TypeError(f"a length must be {type(self).__name__}(int), got {self!r}")
        return self.value


class Batch(TrainUnit):
    """A number of batches (optimizer steps of the global batch)."""

    @staticmethod
    def _from_records(records: int, global_batch_size: int) -> Batch:
        return Batch(max(records // global_batch_size, 1))


class Epoch(TrainUnit):
    """A number of passes over the training data loader."""


# A period that never fires: the default for checkpoint and validation periods.
NEVER = Batch(sys.maxsize)

SearcherUnit = Literal["batches", "records", "epochs"]


def from_searcher_unit(length: int, unit: SearcherUnit, global_batch_size: int | None) -> TrainUnit:
    """The searcher's length (``searcher.max_length: {epochs: 3}``) as a TrainUnit."""
    if unit == "epochs":
        return Epoch(length)
    if unit == "records":
        if not global_batch_size:
            raise ValueError("searcher length in records needs the hyperparameter global_batch_size")
        return Batch._from_records(length, global_batch_size)
    return Batch(length)
