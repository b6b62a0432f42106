"""The ingest workload, shared by the Kiln side (run.py) and the MLflow side (mlflow_clients.py).

Pure Python with no imports from Kiln or MLflow, so both virtual environments generate exactly the
same points. The unit everywhere is the **point**: one (metric name, step, value) of one trial, which is
one row of Kiln's ``metric_points`` and one ``Metric`` in MLflow's ``log_batch`` (MLflow's own unit:
at most 1,000 of them per call).

Trial ``i`` reports ``1 + i % 3`` metric names at every step (``loss``; ``loss, lr``; ``loss, lr,
grad_norm``); a *batch* is ``steps`` consecutive steps of one trial, what the Core API sends at once
(it flushes every 500 steps or 1 s). So a 500-step batch holds 500, 1,000 or 1,500 points.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

NAMES = ("loss", "lr", "grad_norm")
# Fixed so that Kiln, the raw COPY and MLflow store the very same timestamps.
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def names_of(index: int) -> tuple[str, ...]:
    """The metric names trial number ``index`` (0-based within a run) reports at every step."""
    return NAMES[: 1 + index % 3]


def value(name: str, index: int, step: int) -> float:
    """A deterministic, plausible value (a decaying loss with jitter, a schedule, a norm)."""
    jitter = ((step * 7919 + index * 104729) % 1000) / 1000.0
    if name == "loss":
        return math.exp(-step / 4000.0) + 0.05 * jitter
    if name == "lr":
        return 1e-3 * (0.5 ** (step // 2000))
    return 1.0 + jitter


def reported_at(step: int) -> float:
    """Seconds since the epoch when the step was reported (100 steps a second)."""
    return T0 + step * 0.01


def batch(index: int, batch_no: int, steps: int) -> list[tuple[int, dict[str, float], float]]:
    """One batch of trial ``index``: ``steps`` consecutive (step, {name: value}, reported_at)."""
    names = names_of(index)
    first = batch_no * steps
    return [(s, {n: value(n, index, s) for n in names}, reported_at(s)) for s in range(first, first + steps)]


def points_in_batch(index: int, steps: int) -> int:
    """Points (name, step, value) in one batch of trial ``index``."""
    return steps * len(names_of(index))


def total_points(trials: int, batches: int, steps: int) -> int:
    """Points of the whole workload."""
    return sum(points_in_batch(i, steps) for i in range(trials)) * batches


def points(index: int, batch_no: int, steps: int) -> Iterator[tuple[str, int, float, float]]:
    """The batch flattened to (name, step, value, reported_at) points."""
    for s, metrics, at in batch(index, batch_no, steps):
        for n, v in metrics.items():
            yield n, s, v, at
