"""Metric reducers: how per-batch values become one metric per validation (or training report).

``Reducer`` names the built-in reductions a trial's ``evaluation_reducer()`` may return; ``MetricReducer``
is the base for custom ones registered with ``context.wrap_reducer`` (the reducer sees every batch on its
own slot, ``per_slot_reduce`` condenses them, ``cross_slot_reduce`` combines the slots on the chief).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Sequence
from typing import Any


class Reducer(enum.Enum):
    """The built-in reductions over per-batch metric values."""

    AVG = 1
    SUM = 2
    MAX = 3
    MIN = 4


class MetricReducer(abc.ABC):
    """A custom reduction: ``reset`` before each training report or validation, ``update`` (your own
    method) per batch, ``per_slot_reduce`` on each slot, ``cross_slot_reduce`` over the slots' results."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget what was accumulated."""

    @abc.abstractmethod
    def per_slot_reduce(self) -> Any:
        """This slot's partial result (must be picklable: it is gathered to the chief)."""

    @abc.abstractmethod
    def cross_slot_reduce(self, per_slot_metrics: list[Any]) -> Any:
        """The final metric (or a dict of metrics) from every slot's partial result."""


class _SimpleReducer(MetricReducer):
    """``wrap_reducer(fn)``: collect values with ``update(value)``, then ``fn(all values)``."""

    def __init__(self, fn: Callable[[list[Any]], Any]) -> None:
        self._fn = fn
        self._values: list[Any] = []

    def update(self, value: Any) -> None:
        """Add one value (a tensor becomes a Python number or list)."""
        self._values.append(to_python(value))

    def reset(self) -> None:
        self._values = []

    def per_slot_reduce(self) -> list[Any]:
        return self._values

    def cross_slot_reduce(self, per_slot_metrics: list[Any]) -> Any:
        return self._fn([v for slot in per_slot_metrics for v in slot])


def to_python(value: Any) -> Any:
    """A tensor or numpy value as a Python number (or nested list); other values as they are."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    return value


def reduce_values(reducer: Reducer, values: Sequence[Any]) -> Any:
    """One built-in reduction over scalar values."""
    if not values:
        raise ValueError("no values to reduce")
    match reducer:
        case Reducer.AVG:
            return sum(values) / len(values)
        case Reducer.SUM:
            return sum(values)
        case Reducer.MAX:
            return max(values)
        case Reducer.MIN:
            return min(values)
    raise TypeError(f"not a Reducer: {reducer!r}")


def reduce_batch_metrics(batch_metrics: list[dict[str, Any]],
                         reducers: Reducer | dict[str, Reducer]) -> dict[str, Any]:
    """Reduce per-batch metric dicts (every slot's, gathered) to one dict, key by key."""
    if not batch_metrics:
        return {}
    keys = list(batch_metrics[0])
    out: dict[str, Any] = {}
    for key in keys:
        reducer = reducers.get(key, Reducer.AVG) if isinstance(reducers, dict) else reducers
        values = [to_python(m[key]) for m in batch_metrics]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = reduce_values(reducer, values)
        else:
            out[key] = values[-1]  # non-scalar metrics are not reduced; the last batch's stands
    return out
