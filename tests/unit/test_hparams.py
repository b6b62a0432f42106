"""Sampling and grids over a hyperparameter space: pure, deterministic given the rng."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from schemas.config import (
    CategoricalHP,
    ConstHP,
    DoubleHP,
    HyperparameterSpace,
    IntHP,
    LogHP,
    parse_config,
)
from services.searcher import hparams

SPACE: HyperparameterSpace = {
    "lr": LogHP(minval=-4.0, maxval=-1.0),
    "layers": IntHP(minval=1, maxval=8),
    "dropout": DoubleHP(minval=0.1, maxval=0.5),
    "batch_size": ConstHP(val=64),
    "optimizer": {
        "name": CategoricalHP(vals=["sgd", "adam"]),
        "momentum": DoubleHP(minval=0.0, maxval=0.99),
        "betas": ConstHP(val=[0.9, 0.999]),
    },
}


# --- sample ----------------------------------------------------------------------------------


def test_same_seed_same_draws() -> None:
    first = [hparams.sample(SPACE, random.Random(7)) for _ in range(3)]
    rng_a, rng_b = random.Random(7), random.Random(7)
    run_a = [hparams.sample(SPACE, rng_a) for _ in range(5)]
    run_b = [hparams.sample(SPACE, rng_b) for _ in range(5)]
    assert run_a == run_b
    assert first[0] == first[1] == first[2]


def test_different_seeds_differ() -> None:
    draws = {repr(hparams.sample(SPACE, random.Random(seed))) for seed in range(10)}
    assert len(draws) > 1


def test_draw_does_not_depend_on_key_order() -> None:
    reversed_space = dict(reversed(list(SPACE.items())))
    assert hparams.sample(reversed_space, random.Random(3)) == hparams.sample(SPACE, random.Random(3))


def test_sample_shape_and_ranges() -> None:
    rng = random.Random(0)
    for _ in range(500):
        draw = hparams.sample(SPACE, rng)
        assert set(draw) == {"lr", "layers", "dropout", "batch_size", "optimizer"}
        assert 1e-4 <= draw["lr"] <= 1e-1
        assert isinstance(draw["layers"], int) and 1 <= draw["layers"] <= 8
        assert 0.1 <= draw["dropout"] <= 0.5
        assert draw["batch_size"] == 64
        assert draw["optimizer"]["name"] in ("sgd", "adam")
        assert 0.0 <= draw["optimizer"]["momentum"] <= 0.99
        assert draw["optimizer"]["betas"] == [0.9, 0.999]


def test_int_draws_reach_both_ends() -> None:
    rng = random.Random(1)
    seen = {hparams.sample({"k": IntHP(minval=1, maxval=3)}, rng)["k"] for _ in range(200)}
    assert seen == {1, 2, 3}


def test_log_uses_base() -> None:
    draw = hparams.sample({"x": LogHP(minval=3.0, maxval=3.0, base=2.0)}, random.Random(0))
    assert draw == {"x": 8.0}


def test_draws_do_not_alias_the_space() -> None:
    space: HyperparameterSpace = {"v": ConstHP(val=[1, 2]), "c": CategoricalHP(vals=[[1], [2]])}
    draw = hparams.sample(space, random.Random(0))
    draw["v"].append(3)
    draw["c"].append(3)
    assert space == {"v": ConstHP(val=[1, 2]), "c": CategoricalHP(vals=[[1], [2]])}


def test_sample_from_parsed_config() -> None:
    cfg, _ = parse_config(
        {
            "entrypoint": "model_def:Trial",
            "searcher": {"name": "random", "metric": "loss", "max_trials": 2},
            "hyperparameters": {"lr": {"type": "double", "minval": 0.1, "maxval": 0.2}, "n": 3},
        }
    )
    draw = hparams.sample(cfg.hyperparameters, random.Random(5))
    assert draw["n"] == 3 and 0.1 <= draw["lr"] <= 0.2


# --- grid ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hp", "points"),
    [
        (ConstHP(val="x"), ["x"]),
        (CategoricalHP(vals=[3, 1, 2]), [3, 1, 2]),
        (IntHP(minval=0, maxval=10, count=3), [0, 5, 10]),
        (IntHP(minval=1, maxval=4, count=2), [1, 4]),
        (IntHP(minval=1, maxval=4, count=3), [1, 3, 4]),  # 2.5 rounds half away from zero
        (IntHP(minval=1, maxval=4, count=1), [3]),  # midpoint, like Determined's grid.go
        (IntHP(minval=1, maxval=3, count=10), [1, 2, 3]),  # clamped to the integers in range
        (IntHP(minval=-4, maxval=-1, count=3), [-4, -3, -1]),
        (DoubleHP(minval=0.0, maxval=1.0, count=5), [0.0, 0.25, 0.5, 0.75, 1.0]),
        (DoubleHP(minval=0.0, maxval=1.0, count=1), [0.5]),
        (LogHP(minval=-3.0, maxval=-1.0, count=3), [1e-3, 1e-2, 1e-1]),
        (LogHP(minval=0.0, maxval=4.0, base=2.0, count=1), [4.0]),
    ],
)
def test_grid_axis(hp: Any, points: list[Any]) -> None:
    got = [point["h"] for point in hparams.grid({"h": hp})]
    assert got == pytest.approx(points)


def test_grid_is_the_cartesian_product_in_sorted_name_order() -> None:
    space: HyperparameterSpace = {
        "b": CategoricalHP(vals=["x", "y"]),
        "a": IntHP(minval=1, maxval=3, count=3),
        "c": ConstHP(val=0),
    }
    assert hparams.grid(space) == [
        {"a": 1, "b": "x", "c": 0},
        {"a": 1, "b": "y", "c": 0},
        {"a": 2, "b": "x", "c": 0},
        {"a": 2, "b": "y", "c": 0},
        {"a": 3, "b": "x", "c": 0},
        {"a": 3, "b": "y", "c": 0},
    ]


def test_grid_includes_nested_groups() -> None:
    space: HyperparameterSpace = {
        "opt": {"name": CategoricalHP(vals=["sgd", "adam"]), "lr": DoubleHP(minval=0.1, maxval=0.2, count=2)},
        "layers": ConstHP(val=2),
    }
    points = hparams.grid(space)
    assert len(points) == 4
    assert points[0] == {"layers": 2, "opt": {"lr": 0.1, "name": "sgd"}}
    combinations = {(p["opt"]["name"], p["opt"]["lr"]) for p in points}
    assert combinations == {("sgd", 0.1), ("adam", 0.1), ("sgd", 0.2), ("adam", 0.2)}


GRID_SPACE: HyperparameterSpace = {
    "lr": LogHP(minval=-4, maxval=-1, count=4),
    "layers": IntHP(minval=1, maxval=8, count=8),
    "dropout": DoubleHP(minval=0.1, maxval=0.5, count=3),
    "batch_size": ConstHP(val=64),
    "optimizer": {
        "name": CategoricalHP(vals=["sgd", "adam"]),
        "momentum": DoubleHP(minval=0, maxval=0.9, count=2),
    },
}


@pytest.mark.parametrize(
    ("space", "size"),
    [
        ({}, 1),  # one trial with no hyperparameters
        ({"c": ConstHP(val=1)}, 1),
        ({"k": IntHP(minval=0, maxval=100, count=7)}, 7),
        (GRID_SPACE, 4 * 8 * 3 * 1 * 2 * 2),
    ],
)
def test_grid_size(space: HyperparameterSpace, size: int) -> None:
    assert len(hparams.grid(space)) == size


def test_grid_is_stable() -> None:
    space: HyperparameterSpace = {"a": IntHP(minval=0, maxval=9, count=4), "b": CategoricalHP(vals=[1, 2])}
    assert hparams.grid(space) == hparams.grid(dict(reversed(list(space.items()))))


@pytest.mark.parametrize(
    ("space", "name"),
    [
        ({"lr": DoubleHP(minval=0.1, maxval=0.2)}, "lr"),
        ({"k": IntHP(minval=1, maxval=2)}, "k"),
        ({"opt": {"lr": LogHP(minval=-2, maxval=-1)}}, "opt.lr"),
    ],
)
def test_grid_needs_count(space: HyperparameterSpace, name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}'.*count"):
        hparams.grid(space)


def test_grid_points_do_not_alias_each_other() -> None:
    points = hparams.grid({"v": ConstHP(val=[1]), "k": CategoricalHP(vals=[1, 2])})
    points[0]["v"].append(2)
    assert points[1]["v"] == [1]


def test_log_grid_values_are_powers() -> None:
    points = hparams.grid({"x": LogHP(minval=1, maxval=3, base=10, count=3)})
    assert [math.log10(p["x"]) for p in points] == pytest.approx([1, 2, 3])
