"""Drawing hyperparameters from a search space: random samples and grids. Pure, no I/O.

Names are visited in sorted order, like Determined's ``Hyperparameters.Each``: the draws then do not
depend on the order a mapping's keys were stored in (Postgres JSONB, for one, reorders them).
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from typing import Any, assert_never

from schemas.config import (
    CategoricalHP,
    ConstHP,
    DoubleHP,
    Hyperparameter,
    HyperparameterSpace,
    IntHP,
    LogHP,
)


def sample(space: HyperparameterSpace, rng: random.Random) -> dict[str, Any]:
    """One random draw from ``space``; nested groups become nested dicts. Same rng state, same draw."""
    return {name: _sample_one(space[name], rng) for name in sorted(space)}


def _sample_one(hp: Hyperparameter, rng: random.Random) -> Any:
    match hp:
        case ConstHP(val=val):
            return copy.deepcopy(val)  # the config is shared: a trial must not mutate it
        case IntHP(minval=lo, maxval=hi):
            return rng.randint(lo, hi)
        case DoubleHP(minval=lo, maxval=hi):
            return rng.uniform(lo, hi)
        case LogHP(minval=lo, maxval=hi, base=base):
            return base ** rng.uniform(lo, hi)
        case CategoricalHP(vals=vals):
            return copy.deepcopy(rng.choice(vals))
        case dict():
            return sample(hp, rng)
        case _:
            assert_never(hp)


def grid(space: HyperparameterSpace) -> list[dict[str, Any]]:
    """Every point of the grid over ``space``, the first name (sorted) varying slowest.

    Ranges need ``count`` (ValueError naming the hyperparameter otherwise). An empty space is one
    point, ``{}``: one trial with no hyperparameters, not Determined's zero trials.
    """
    return _grid(space, prefix="")


def _grid(space: HyperparameterSpace, prefix: str) -> list[dict[str, Any]]:
    names = sorted(space)
    axes = [_axis(space[name], f"{prefix}{name}") for name in names]
    return [copy.deepcopy(dict(zip(names, point, strict=True))) for point in itertools.product(*axes)]


def _axis(hp: Hyperparameter, path: str) -> list[Any]:
    """The grid points of one hyperparameter, as Determined's ``grid.go`` computes them."""
    match hp:
        case ConstHP(val=val):
            return [val]
        case IntHP(minval=lo, maxval=hi):
            # At most one point per integer in the range, rounded like Go's math.Round.
            count = min(_count(hp.count, path), hi - lo + 1)
            points = [_round_half_away(x) for x in _linspace(lo, hi, count)]
            return list(dict.fromkeys(points))
        case DoubleHP(minval=lo, maxval=hi):
            return _linspace(lo, hi, _count(hp.count, path))
        case LogHP(minval=lo, maxval=hi, base=base):
            return [base**x for x in _linspace(lo, hi, _count(hp.count, path))]
        case CategoricalHP(vals=vals):
            return list(vals)
        case dict():
            return _grid(hp, prefix=f"{path}.")
        case _:
            assert_never(hp)


def _count(count: int | None, path: str) -> int:
    if count is None:
        raise ValueError(f"hyperparameter {path!r}: grid search needs 'count'")
    return count


def _linspace(lo: float, hi: float, count: int) -> list[float]:
    """``count`` evenly spaced points including both ends; one point is the midpoint."""
    if count == 1:
        return [(lo + hi) / 2]
    return [lo + i * (hi - lo) / (count - 1) for i in range(count)]


def _round_half_away(x: float) -> int:
    return int(math.copysign(math.floor(abs(x) + 0.5), x))
