"""ASHA's arithmetic, exactly as Determined 0.38 computes it (``docs/asha.md``). Pure, no I/O.

Determined does this arithmetic in Go float64. Python floats are the same IEEE doubles and ``+ - * /``
round the same way. The number of rungs truncates ``ln(max_time)/ln(divisor)``, so the last bit of the
logarithms matters at exact powers (``ln(1000)/ln(10)`` is 2.9999999999999996: 3 rungs, not 4); it uses
the correctly rounded ``math.log`` values (ln(243)/ln(3) = 4.999999999999999). Go's ``math.Log`` is not
always correctly rounded (golang/go#9546: its ln(3) is one ulp low, which would give 5.0 there); that
difference shows only with ``max_rungs`` >= 6 and is the open question at the end of ``docs/asha.md``.
Powers use :func:`go_pow`, Go's ``math.Pow`` for whole exponents (square and multiply).

The two rung rules live here too, as functions over a sorted list of metrics, so that the tables in
the tests pin them without building a whole search.
"""

from __future__ import annotations

import bisect
import math
import sys
from typing import Literal, assert_never

import msgspec

Mode = Literal["aggressive", "standard", "conservative"]

# Determined's ``ashaExitedMetricValue``: a trial that exits early counts as the worst possible result.
EXITED_METRIC = sys.float_info.max


# ---------------------------------------------------------------------------------------------
# Go's float64 pow for whole exponents
# ---------------------------------------------------------------------------------------------

def go_pow(x: float, n: int) -> float:
    """Go's ``math.Pow(x, float64(n))`` for a whole ``n >= 0`` and finite ``x > 0`` (repeated squaring)."""
    if n < 0:
        raise ValueError(f"go_pow needs a whole exponent >= 0, got {n}")
    if n == 0 or x == 1:
        return 1.0
    if n == 1:
        return x
    a1, ae = 1.0, 0
    x1, xe = math.frexp(x)
    i = n
    while i != 0:
        if xe < -(1 << 12) or xe > (1 << 12):
            ae += xe  # overflow: Ldexp below gives inf or 0, as in Go
            break
        if i & 1:
            a1 *= x1
            ae += xe
        x1 *= x1
        xe <<= 1
        if x1 < 0.5:
            x1 += x1
            xe -= 1
        i >>= 1
    try:
        return math.ldexp(a1, ae)
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------------------------------------
# Brackets and rungs (adaptive_asha.go, asha_stopping.go)
# ---------------------------------------------------------------------------------------------


def num_rungs(max_time: int, max_trials: int, divisor: float, max_rungs: int) -> int:
    """Step 1: ``min(max_rungs, int(ln(max_time)/ln(divisor)) + 1, int(ln(max_trials)/ln(divisor)) + 1)``."""
    by_time = int(math.log(max_time) / math.log(divisor)) + 1
    by_trials = int(math.log(max_trials) / math.log(divisor)) + 1
    return min(max_rungs, by_time, by_trials)


def mode_rungs(mode: Mode, rungs: int) -> list[int]:
    """Step 2: the rung count of each bracket for ``mode``, before sorting."""
    match mode:
        case "aggressive":
            return [rungs]
        case "standard":
            return list(range((rungs - 1) // 2 + 1, rungs + 1))
        case "conservative":
            return list(range(1, rungs + 1))
        case _:
            assert_never(mode)


def bracket_max_trials(max_trials: int, divisor: float, bracket_rungs: list[int]) -> list[int]:
    """Step 3 (``getBracketMaxTrials``): trials per bracket; the remainder goes to bracket 0."""
    weights = [go_pow(divisor, r - 1) / r for r in bracket_rungs]
    total = 0.0
    for w in weights:  # summed in order, like the Go loop
        total += w
    trials = [max(int(w / total * max_trials), 1) for w in weights]
    trials[0] += max(max_trials - sum(trials), 0)
    return trials


def bracket_max_concurrent_trials(max_concurrent: int, divisor: float, trials: list[int]) -> list[int]:
    """Step 4 (``getBracketMaxConcurrentTrials``): how many trials each bracket runs at once."""
    n = len(trials)
    if max_concurrent == 0:
        return [max(trials[-1], int(divisor))] * n
    total = max(max_concurrent, n)
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def rung_units(rungs: int, divisor: float, max_time: int) -> list[int]:
    """Step 5 (``makeRungs``): ``max(int(max_time / divisor^(r-i-1)), 1)``; the top rung is ``max_time``."""
    return [max(int(float(max_time) / go_pow(divisor, rungs - i - 1)), 1) for i in range(rungs)]


def initial_trials(max_concurrent: int, max_trials: int, divisor: float, rungs: int) -> int:
    """How many trials a bracket starts with: its concurrency, or enough to fill the top rung."""
    if max_concurrent > 0:
        return min(max_concurrent, max_trials)
    return max(1, min(int(go_pow(divisor, rungs - 1)), max_trials))


class Bracket(msgspec.Struct, frozen=True, kw_only=True):
    """One bracket of adaptive ASHA: an independent sub-search with its own budget."""

    num_rungs: int
    max_trials: int
    max_concurrent_trials: int


def make_brackets(
    *,
    max_time: int,
    max_trials: int,
    divisor: float,
    max_rungs: int,
    mode: Mode,
    max_concurrent_trials: int,
    bracket_rungs: list[int] | None = None,
) -> list[Bracket]:
    """Steps 1-4 (``makeBrackets``): the brackets, most early-stopping (most rungs) first."""
    if bracket_rungs:
        rungs = list(bracket_rungs)
    else:
        rungs = mode_rungs(mode, num_rungs(max_time, max_trials, divisor, max_rungs))
    rungs.sort(reverse=True)
    trials = bracket_max_trials(max_trials, divisor, rungs)
    concurrent = bracket_max_concurrent_trials(max_concurrent_trials, divisor, trials)
    return [
        Bracket(num_rungs=r, max_trials=t, max_concurrent_trials=c)
        for r, t, c in zip(rungs, trials, concurrent, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# The rung rules
# ---------------------------------------------------------------------------------------------


def stopping_insert(metrics: list[float], metric: float) -> int:
    """Stopping ASHA's insert position: ``bisect_left``, a tie goes before the equal values."""
    return bisect.bisect_left(metrics, metric)


def keep_count(rung_size: int, divisor: float) -> int:
    """Stopping ASHA: how many of a rung's ``rung_size`` best trials go on, at least one."""
    return max(int(rung_size / divisor), 1)


class Promotion(msgspec.Struct, frozen=True, kw_only=True):
    """What the promotion rule decides for one new result in a rung of ``size`` results before it."""

    insert_index: int  # where the new result goes (bisect_right: a tie goes after the equal values)
    promote_new: bool  # the new trial goes to the next rung now
    promote_index: int | None  # else: the index (after the insert) of an older entry to promote


def promotion(metrics: list[float], promoted: list[bool], metric: float, divisor: float) -> Promotion:
    """Legacy ASHA (``promotionsAsync``) on a rung's sorted ``metrics`` and their ``promoted`` flags."""
    old = int(len(metrics) / divisor)
    new = int((len(metrics) + 1) / divisor)
    index = bisect.bisect_right(metrics, metric)
    if index < new:
        return Promotion(insert_index=index, promote_new=True, promote_index=None)
    # After the insert the entry at ``old`` is the one that should be promoted, unless it already is.
    after = promoted[:index] + [False] + promoted[index:]
    if new != old and not after[old]:
        return Promotion(insert_index=index, promote_new=False, promote_index=old)
    return Promotion(insert_index=index, promote_new=False, promote_index=None)


def pending_aware_limit(rung_size: int, pending: int, divisor: float) -> int:
    """Kiln's ``promotion: pending_aware``: how many of a rung's best results are sure of its top 1/divisor.

    With ``rung_size`` results and ``pending`` trials still training toward the rung, the result at index
    ``i`` is in the top ``floor((rung_size + pending) / divisor)`` whatever the pending trials report iff
    ``i + pending < floor((rung_size + pending) / divisor)``; with nothing pending, ASHA's ``floor(n / divisor)``.
    """
    return max(int((rung_size + pending) / divisor) - pending, 0)


def stopping_progress(rung0_size: int, max_trials: int, completed: int, invalid: int) -> float:
    """A bracket's progress: rung 0's fill with 20% overhead, then the share of valid trials done."""
    progress = rung0_size / (1.2 * max_trials)
    if rung0_size == max_trials:
        progress = max((completed - invalid) / max_trials, progress)
    return progress
