"""BOHB's density-model sampler (Falkner et al. 2018), as pure functions over numpy arrays. No I/O.

The search space is mapped onto the unit cube (:class:`Space`): ``double`` and ``log`` hyperparameters
linearly in their value or exponent, ``int`` ones as ordinals (the interval ``[min - 0.5, max + 0.5]``),
``categorical`` ones as an index; ``const`` ones are not modelled. Given the results of the trials at one
rung (smaller is better), :func:`propose` splits them into the best ``top_fraction`` ("good") and the
rest ("bad"), builds a product-kernel density over each (Gaussian kernels for the ordered dimensions,
Aitchison-Aitken kernels for the categorical ones, normal-reference bandwidths per dimension), draws
``candidates`` points from the good density widened by ``bandwidth_factor``, and returns the one with
the largest ratio good / bad. Which rung's results to use, and when to draw at random instead, is the
caller's choice (:mod:`services.searcher.methods`).

Everything random comes from the ``numpy.random.Generator`` the caller passes in, so the same inputs give
the same point; the state a search keeps is only the points (lists of floats) it already tried.
"""

from __future__ import annotations

import copy
import math
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray
from scipy import special, stats

from schemas.config import (
    CategoricalHP,
    ConstHP,
    DoubleHP,
    HPSpec,
    HyperparameterSpace,
    IntHP,
    LogHP,
    TPEConfig,
    leaf_hyperparameters,
)

Vector = list[float]
_FLOOR = 1e-32  # BOHB's floor under each density before the ratio is taken
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Space:
    """The sampled (non-constant) hyperparameters of a space and their unit-cube coordinates."""

    def __init__(self, space: HyperparameterSpace) -> None:
        self.space = space
        self.leaves: list[tuple[str, HPSpec]] = list(leaf_hyperparameters(space))
        self.dims: list[tuple[str, HPSpec]] = [(p, hp) for p, hp in self.leaves if not isinstance(hp, ConstHP)]
        # For each dimension: 0 for an ordered one, else the number of categories.
        self.categories = np.array(
            [len(hp.vals) if isinstance(hp, CategoricalHP) else 0 for _, hp in self.dims], dtype=np.int64
        )

    @property
    def size(self) -> int:
        """How many dimensions are modelled."""
        return len(self.dims)

    def encode(self, hparams: dict[str, Any]) -> Vector:
        """A trial's hyperparameters as unit-cube coordinates (categoricals: the index of the value)."""
        return [_encode_one(hp, _get(hparams, path)) for path, hp in self.dims]

    def decode(self, vector: Vector, template: dict[str, Any]) -> dict[str, Any]:
        """Hyperparameters for ``vector``; constants (and the nesting) come from ``template``, a random draw."""
        out = _copy_tree(template)
        for (path, hp), x in zip(self.dims, vector, strict=True):
            _set(out, path, _decode_one(hp, x))
        return out


def _encode_one(hp: HPSpec, value: Any) -> float:
    match hp:
        case DoubleHP(minval=lo, maxval=hi):
            return _unit(float(value), lo, hi)
        case LogHP(minval=lo, maxval=hi, base=base):
            return _unit(math.log(float(value), base), lo, hi)
        case IntHP(minval=lo, maxval=hi):
            return _unit(float(value), lo - 0.5, hi + 0.5)
        case CategoricalHP(vals=vals):
            return float(vals.index(value))
        case _:
            raise ValueError(f"cannot encode {hp!r}")


def _decode_one(hp: HPSpec, x: float) -> Any:
    if isinstance(hp, CategoricalHP):
        return copy.deepcopy(hp.vals[min(max(int(round(x)), 0), len(hp.vals) - 1)])
    x = min(max(x, 0.0), 1.0)
    match hp:
        case DoubleHP(minval=lo, maxval=hi):
            return lo + x * (hi - lo)
        case LogHP(minval=lo, maxval=hi, base=base):
            return base ** (lo + x * (hi - lo))
        case IntHP(minval=lo, maxval=hi):
            return min(hi, lo + int(math.floor(x * (hi - lo + 1))))
        case _:
            raise ValueError(f"cannot decode {hp!r}")


def _unit(v: float, lo: float, hi: float) -> float:
    return 0.5 if hi == lo else min(max((v - lo) / (hi - lo), 0.0), 1.0)


def _get(tree: dict[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        node = node[part]
    return node


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[last] = value


def _copy_tree(tree: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(tree)


# ---------------------------------------------------------------------------------------------
# The densities
# ---------------------------------------------------------------------------------------------


def min_points(space: Space, options: TPEConfig) -> int:
    """How many points each density needs at least: BOHB's default is the dimension + 1."""
    return options.min_points if options.min_points is not None else space.size + 1


def split(
    losses: NDArray[np.float64], space: Space, options: TPEConfig
) -> tuple[NDArray[np.intp], NDArray[np.intp]] | None:
    """The good and the bad indices of ``losses`` (best first), or None when there are too few for two densities.

    BOHB: ``n_good = max(min_points, top_fraction * n)``, the bad ones are the next
    ``max(min_points, (1 - top_fraction) * n)``, and each density needs more points than dimensions.
    Losses of ``+inf`` (trials that never reached the rung) can only be bad; ``n`` for the good share counts
    the finite ones.
    """
    n = len(losses)
    ranked = int(np.isfinite(losses).sum())  # +inf: a trial stopped below this rung (Kiln's lower_rungs: bad)
    need = min_points(space, options)
    n_good = max(need, int(options.top_fraction * ranked))
    n_bad = max(need, int((1 - options.top_fraction) * n))
    order = np.argsort(losses, kind="stable")  # ties: the earlier result first, so the split is deterministic
    good, bad = order[:n_good], order[n_good : n_good + n_bad]
    if n_good > ranked or len(good) <= space.size or len(bad) <= space.size:
        return None
    return good, bad


def bandwidths(data: NDArray[np.float64], space: Space, options: TPEConfig) -> NDArray[np.float64]:
    """Normal-reference bandwidths per dimension (statsmodels' rule, as BOHB uses), at least ``min_bandwidth``.

    For a categorical dimension the value is the Aitchison-Aitken weight, at most ``(c-1)/c`` (uniform).
    """
    n, d = data.shape
    bw: NDArray[np.float64] = np.maximum(1.06 * data.std(axis=0) * n ** (-1.0 / (4 + d)), options.min_bandwidth)
    cats = space.categories
    cat = cats > 0
    bw[cat] = np.minimum(bw[cat], (cats[cat] - 1) / np.maximum(cats[cat], 1))
    return bw


def log_density(points: NDArray[np.float64], data: NDArray[np.float64], bw: NDArray[np.float64],
                space: Space) -> NDArray[np.float64]:
    """Log of the product-kernel density of ``data`` (n, d) with bandwidths ``bw`` at ``points`` (m, d)."""
    cats = space.categories
    ordered = cats == 0
    diff = points[:, None, :] - data[None, :, :]  # (m, n, d)
    per_dim = np.zeros_like(diff)
    if ordered.any():
        z = diff[:, :, ordered] / bw[ordered]
        per_dim[:, :, ordered] = -0.5 * z * z - np.log(bw[ordered]) - _HALF_LOG_2PI  # the Gaussian kernel's log
    for j in np.flatnonzero(~ordered):
        lam, c = bw[j], cats[j]
        same = np.abs(diff[:, :, j]) < 0.5
        other = math.log(lam / (c - 1)) if c > 1 else -math.inf
        per_dim[:, :, j] = np.where(same, math.log1p(-lam) if c > 1 else 0.0, other)
    total = special.logsumexp(per_dim.sum(axis=2), axis=1) - math.log(len(data))
    return cast(NDArray[np.float64], total)


MAX_POINTS = 256  # per density: beyond this, every k-th point by rank (Kiln; keeps a draw's cost bounded)


def _thin(indices: NDArray[np.intp]) -> NDArray[np.intp]:
    """At most ``MAX_POINTS`` of ``indices`` (sorted best first), spread evenly over the ranks."""
    if len(indices) <= MAX_POINTS:
        return indices
    return indices[np.linspace(0, len(indices) - 1, MAX_POINTS).round().astype(np.intp)]


def propose(
    vectors: NDArray[np.float64],
    losses: NDArray[np.float64],
    space: Space,
    options: TPEConfig,
    rng: np.random.Generator,
) -> Vector | None:
    """The candidate with the best good/bad density ratio, or None when the results cannot make two densities.

    ``vectors`` (n, d) are the unit-cube points of the trials that reached one rung and ``losses`` (n,) their
    results there, smaller better.
    """
    parts = split(losses, space, options)
    if parts is None:
        return None
    good, bad = vectors[_thin(parts[0])], vectors[_thin(parts[1])]
    bw_good = bandwidths(good, space, options)
    bw_bad = bandwidths(bad, space, options)
    m = options.candidates
    centres = good[rng.integers(len(good), size=m)]
    cand = np.empty_like(centres)
    cats = space.categories
    for j in range(space.size):
        if cats[j] == 0:
            scale = options.bandwidth_factor * bw_good[j]
            lo, hi = (0.0 - centres[:, j]) / scale, (1.0 - centres[:, j]) / scale
            cand[:, j] = stats.truncnorm.rvs(lo, hi, loc=centres[:, j], scale=scale, random_state=rng)
        else:
            keep = rng.random(m) < 1 - bw_good[j]
            cand[:, j] = np.where(keep, centres[:, j], rng.integers(cats[j], size=m))
    log_l = np.maximum(log_density(cand, good, bw_good, space), math.log(_FLOOR))
    log_g = np.maximum(log_density(cand, bad, bw_bad, space), math.log(_FLOOR))
    best = int(np.argmax(log_l - log_g))  # the first of equal ratios: deterministic
    return [float(x) for x in cand[best]]
