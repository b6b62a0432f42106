"""Learning-curve-aware rung scores (``rung_metric: extrapolated``). Pure, no I/O.

A trial that reaches a rung is ranked there by where its curve is heading rather than by its last value
alone: a least-squares line through its validations since the previous rung, against the logarithm of
the time metric, gives a smoothed value at the rung and a slope; the score adds part of the slope's
extrapolation to ``max_time``:

    score = fit(t) + WEIGHT * slope * ln(max_time / t)

Values are the searcher's (smaller is better), so a falling curve lowers the score. ``WEIGHT`` damps the
extrapolation: a line through a few noisy points overshoots, and rung-to-rung rankings on the two
benchmark tables (benchmarks/hpo/README.md) correlate best with the final values around one half.
"""

from __future__ import annotations

import math

import numpy as np

WEIGHT = 0.5

Point = tuple[int, float]


def score(points: list[Point], at: int, horizon: int) -> float:
    """The rung score of a trial whose validations since the previous rung are ``points`` ((time, value)),
    the last one at time ``at``; ``horizon`` is ``max_time``. Fewer than two distinct times: the last value."""
    if not points:
        raise ValueError("a rung score needs at least one validation")
    last = points[-1][1]
    times = [t for t, _ in points if t > 0]
    if len(set(times)) < 2 or at <= 0 or not all(math.isfinite(v) for _, v in points):
        return last
    x = np.log(np.array([t for t, _ in points if t > 0], dtype=np.float64))
    y = np.array([v for t, v in points if t > 0], dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    value = float(intercept + slope * math.log(at) + WEIGHT * slope * math.log(max(horizon, at) / at))
    return value if math.isfinite(value) else last
