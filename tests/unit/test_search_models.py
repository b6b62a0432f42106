"""Kiln's additions to the rung methods (docs/search-methods.md), played in memory: the density-model
sampler (``sampler: tpe``), ``promotion: pending_aware`` and ``rung_metric: extrapolated``."""

from __future__ import annotations

import math
import random

import msgspec
import numpy as np
import pytest

from schemas.config import ConfigError, ExperimentConfig, TPEConfig, parse_config
from services.searcher import asha, curves, tpe
from services.searcher.methods import (
    ASHASearch,
    CreateTrial,
    Decision,
    DensitySampler,
    PromotionBracket,
    ResumeTrial,
    Rung,
    SearchContext,
    StoppingBracket,
    new_method,
)
from services.searcher.simulate import Fault, Simulation

SPACE = (
    "hyperparameters:\n"
    "  x: {type: double, minval: 0, maxval: 1}\n"
    "  lr: {type: log, minval: -4, maxval: 0}\n"
    "  depth: {type: int, minval: 1, maxval: 4}\n"
    "  opt: {type: categorical, vals: [sgd, adam, rms]}\n"
    "  fixed: 3\n"
    "  group: {y: {type: double, minval: -1, maxval: 1}}\n"
)
BASE = "name: adaptive_asha, metric: loss, max_trials: 60, max_time: 27, time_metric: batches, divisor: 3"


def config(extra: str, base: str = BASE) -> ExperimentConfig:
    return parse_config(f"entrypoint: m:T\n{SPACE}searcher: {{{base}, {extra}}}\n")[0]


SEARCHES = {
    "tpe stopping": config("mode: aggressive, sampler: tpe, max_concurrent_trials: 3"),
    "tpe promotion pending extrapolated": config(
        "mode: standard, sampler: tpe, stop_once: false, promotion: pending_aware, rung_metric: extrapolated,"
        " max_concurrent_trials: 4"
    ),
    "tpe as bohb (ignore lower rungs)": config(
        "mode: aggressive, sampler: tpe, stop_once: false, tpe: {lower_rungs: ignore, random_fraction: 0.2}"
    ),
    "stopping extrapolated": config("mode: aggressive, rung_metric: extrapolated"),
}


class HPSimulation(Simulation):
    """A simulation whose curves depend on the trial's hyperparameters: best near x = 0.2, opt = adam."""

    def curve_of(self, request_id: int, time: int) -> float:
        hp = self.trials[request_id].create.hparams
        noise = random.Random(request_id).gauss(0, 0.02)
        level = (hp["x"] - 0.2) ** 2 + (0.0 if hp["opt"] == "adam" else 0.1) + noise
        return level + 1.0 / (1 + time)


def play(cfg: ExperimentConfig, seed: int = 1, **kwargs: object) -> HPSimulation:
    sim = HPSimulation(cfg, seed, lambda r, t: 0.0, 1, **kwargs)  # type: ignore[arg-type]
    sim.curve = sim.curve_of
    sim.run()
    return sim


def encoded(decisions: list[Decision]) -> bytes:
    return msgspec.msgpack.encode(decisions)


# --- determinism and snapshots ------------------------------------------------------------------


@pytest.mark.parametrize("name", SEARCHES)
def test_same_seed_same_decisions(name: str) -> None:
    first, second = play(SEARCHES[name]), play(SEARCHES[name])
    assert len(first.decisions) > 100
    assert encoded(first.decisions) == encoded(second.decisions)
    assert first.snapshot() == second.snapshot()


@pytest.mark.parametrize("name", SEARCHES)
def test_restoring_from_a_snapshot_before_every_call_changes_nothing(name: str) -> None:
    straight = play(SEARCHES[name])
    restored = play(SEARCHES[name], round_trip=True)
    assert encoded(restored.decisions) == encoded(straight.decisions)
    assert restored.records() == straight.records()


def test_a_different_seed_makes_different_model_draws() -> None:
    cfg = SEARCHES["tpe stopping"]
    a, b = play(cfg, seed=1), play(cfg, seed=2)
    assert [r.hparams for r in a.records()] != [r.hparams for r in b.records()]


# --- the density-model sampler ------------------------------------------------------------------


def model_draws(sim: Simulation) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    method = sim.method
    assert isinstance(method, ASHASearch) and method.sampler is not None
    records = sim.records()
    model = [r.hparams for r in records if r.request_id in method.sampler.model_units]
    rand = [r.hparams for r in records if r.request_id not in method.sampler.model_units]
    return model, rand


def test_the_densities_draw_near_the_good_region_and_random_draws_stay_uniform() -> None:
    sim = play(SEARCHES["tpe stopping"])
    model, rand = model_draws(sim)
    assert len(model) > 20 and len(rand) > 10
    dist = lambda hps: float(np.mean([abs(h["x"] - 0.2) for h in hps]))  # noqa: E731
    adam = lambda hps: sum(h["opt"] == "adam" for h in hps) / len(hps)  # noqa: E731
    assert dist(model) < 0.6 * dist(rand)
    assert adam(model) > 0.6 > adam(rand)


def test_model_draws_keep_the_space_bounds_types_and_constants() -> None:
    sim = play(SEARCHES["tpe promotion pending extrapolated"])
    model, _ = model_draws(sim)
    assert model
    for hp in model:
        assert 0 <= hp["x"] <= 1 and -1 <= hp["group"]["y"] <= 1  # type: ignore[index]
        assert 1e-4 <= hp["lr"] <= 1 and hp["depth"] in (1, 2, 3, 4) and hp["opt"] in ("sgd", "adam", "rms")
        assert hp["fixed"] == 3


def test_random_fraction_one_is_random_search_draw_for_draw() -> None:
    tpe_cfg = config("mode: aggressive, sampler: tpe, tpe: {random_fraction: 1}")
    plain = config("mode: aggressive")
    assert [r.hparams for r in play(tpe_cfg).records()] == [r.hparams for r in play(plain).records()]


def test_the_first_trials_are_random_until_a_rung_can_hold_two_densities() -> None:
    sim = play(SEARCHES["tpe stopping"])
    method = sim.method
    assert isinstance(method, ASHASearch) and method.sampler is not None
    # 5 sampled dimensions: each density needs 6 points; nothing is modelled before 12 results exist.
    first_model_draw = min(method.sampler.model_units)
    assert first_model_draw >= 12
    assert all(request_id not in method.sampler.model_units for request_id in range(first_model_draw))


def test_lower_rungs_and_trials_in_flight_count_as_bad_only_when_asked() -> None:
    sampler = DensitySampler(points={i: [0.5] for i in range(5)})  # trial 4 has no result yet
    bracket = StoppingBracket(divisor=3, max_trials=9, max_concurrent_trials=1, rungs=[
        asha_rung(1, [(0, 0.1), (1, 0.2), (2, 0.3), (3, 0.4)]), asha_rung(3, [(0, 0.1)])])
    budgets = {u: dict(zip(ids, losses, strict=True)) for u, ids, losses in sampler._budgets([bracket], True)}
    assert budgets[3] == {0: 0.1, 1: math.inf, 2: math.inf, 3: math.inf, 4: math.inf}
    assert budgets[1] == {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4, 4: math.inf}
    plain = {u: dict(zip(ids, losses, strict=True)) for u, ids, losses in sampler._budgets([bracket], False)}
    assert plain == {3: {0: 0.1}, 1: {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}}


def asha_rung(units: int, results: list[tuple[int, float]]) -> Rung:
    return Rung(units=units, metrics=[m for _, m in results], trials=[i for i, _ in results],
                promoted=[False] * len(results))


@pytest.mark.parametrize(
    ("n", "finite", "split_sizes"),
    [
        (10, 10, None),  # 6 needed per density (d = 5): 6 good + 4 bad is too few
        (12, 12, (6, 6)),
        (100, 100, (15, 85)),
        (100, 20, (6, 85)),  # +inf losses can only be bad; the good share counts the finite ones
        (100, 5, None),  # not even 6 finite results: no good density
    ],
)
def test_the_good_and_bad_split_follows_bohb(n: int, finite: int, split_sizes: tuple[int, int] | None) -> None:
    space = tpe.Space(config("sampler: tpe").hyperparameters)
    assert space.size == 5
    losses = np.array([float(i) if i < finite else math.inf for i in range(n)])
    parts = tpe.split(losses, space, TPEConfig())
    if split_sizes is None:
        assert parts is None
    else:
        assert parts is not None
        assert (len(parts[0]), len(parts[1])) == split_sizes
        assert sorted(parts[0]) == list(range(split_sizes[0]))  # the best ones are the good ones


def test_encoding_round_trips_every_kind_of_hyperparameter() -> None:
    space = tpe.Space(config("sampler: tpe").hyperparameters)
    assert [path for path, _ in space.dims] == ["depth", "group.y", "lr", "opt", "x"]
    hp = {"x": 0.25, "lr": 1e-2, "depth": 4, "opt": "rms", "fixed": 3, "group": {"y": -0.5}}
    vector = space.encode(hp)
    assert vector == pytest.approx([7 / 8, 0.25, 0.5, 2.0, 0.25])
    decoded = space.decode(vector, hp)
    assert decoded["depth"] == 4 and decoded["opt"] == "rms" and decoded["fixed"] == 3
    assert decoded["x"] == pytest.approx(0.25) and decoded["lr"] == pytest.approx(1e-2)
    assert decoded["group"]["y"] == pytest.approx(-0.5)
    # an int's interval is split evenly: each value owns a quarter of [0, 1]
    ints = [space.decode([x, 0.5, 0.5, 0.0, 0.5], hp)["depth"] for x in (0.0, 0.24, 0.26, 0.74, 0.76, 1.0)]
    assert ints == [1, 1, 2, 3, 4, 4]


# --- pending-aware promotion ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "pending", "divisor", "limit"),
    [
        (3, 0, 3.0, 1),  # nothing pending: ASHA's floor(n / divisor)
        (9, 0, 3.0, 3),
        (8, 0, 3.0, 2),
        (3, 3, 3.0, 0),  # three still training could all land ahead
        (9, 3, 3.0, 1),  # floor(12 / 3) - 3
        (12, 3, 3.0, 2),
        (30, 3, 3.0, 8),
        (4, 1, 2.0, 1),  # floor(5 / 2) - 1
        (1, 5, 4.0, 0),
    ],
)
def test_pending_aware_limit(size: int, pending: int, divisor: float, limit: int) -> None:
    assert asha.pending_aware_limit(size, pending, divisor) == limit


def test_pending_aware_holds_back_a_promotion_until_the_trials_in_flight_report() -> None:
    cfg = config("mode: aggressive, stop_once: false, promotion: pending_aware, max_concurrent_trials: 4",
                 base="name: async_halving, metric: loss, max_trials: 30, num_rungs: 2, max_time: 9,"
                      " time_metric: batches, divisor: 3")
    method = new_method(cfg)
    ctx = SearchContext(cfg, 1)
    created = [d.request_id for d in method.initial_trials(ctx) if isinstance(d, CreateTrial)]
    assert len(created) == 4
    bracket = method.brackets[0]
    assert isinstance(bracket, PromotionBracket) and bracket.rule == "pending_aware"
    # The first three report; the fourth still trains toward rung 0 (plus the replacements created).
    out: list[Decision] = []
    for rid, loss in zip(created[:3], [0.1, 0.5, 0.9], strict=True):
        out += method.validation_reported(ctx, rid, loss, 3)
    assert not [d for d in out if isinstance(d, ResumeTrial)]  # legacy ASHA would resume trial 0 now
    legacy = new_method(config("stop_once: false, max_concurrent_trials: 4",
                               base="name: async_halving, metric: loss, max_trials: 30, num_rungs: 2, max_time: 9,"
                                    " time_metric: batches, divisor: 3"))
    legacy.initial_trials(ctx)
    legacy_out: list[Decision] = []
    for rid, loss in zip(created[:3], [0.1, 0.5, 0.9], strict=True):
        legacy_out += legacy.validation_reported(ctx, rid, loss, 3)
    assert [d.request_id for d in legacy_out if isinstance(d, ResumeTrial)] == [created[0]]


def test_pending_aware_promotes_everything_sure_once_nothing_is_pending() -> None:
    bracket = PromotionBracket(divisor=3, max_trials=100, max_concurrent_trials=1, rule="pending_aware",
                               rungs=[asha_rung(1, [(i, 0.1 * i) for i in range(9)]), asha_rung(3, [])])
    bracket.rungs[0].outstanding = 0
    assert bracket._pending_aware_promotions(bracket.rungs[0]) == [0, 1, 2]
    assert bracket._pending_aware_promotions(bracket.rungs[0]) == []  # each trial is promoted once
    bracket.rungs[0].outstanding = 6
    bracket.rungs[0].promoted = [False] * 9
    assert bracket._pending_aware_promotions(bracket.rungs[0]) == []  # floor(15 / 3) - 6 < 0


# --- learning-curve scores ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("points", "at", "horizon", "expected"),
    [
        ([(3, 0.4)], 3, 27, 0.4),  # one point: its value
        ([(1, 0.5), (2, 0.5), (3, 0.5)], 3, 27, 0.5),  # flat: no change
        # v = 1 - 0.1 ln t: fit(3) = 1 - 0.1 ln 3, plus half the slope times ln(27 / 3)
        ([(t, 1 - 0.1 * math.log(t)) for t in (1, 2, 3)], 3, 27, 1 - 0.1 * math.log(3) - 0.05 * math.log(9)),
        ([(t, 1 - 0.1 * math.log(t)) for t in (4, 6, 9)], 9, 9, 1 - 0.1 * math.log(9)),  # at the horizon: the fit
        ([(1, 0.3), (2, math.inf)], 2, 9, math.inf),  # a non-finite value: the last value, unfitted
    ],
)
def test_curve_scores(points: list[tuple[int, float]], at: int, horizon: int, expected: float) -> None:
    assert curves.score(points, at, horizon) == pytest.approx(expected)


def test_extrapolated_rungs_keep_a_steep_curve_that_a_flat_one_would_beat_at_the_rung() -> None:
    cfg = config("rung_metric: extrapolated, max_concurrent_trials: 2",
                 base="name: async_halving, metric: loss, max_trials: 9, num_rungs: 2, max_time: 27,"
                      " time_metric: batches, divisor: 2")
    method = new_method(cfg)
    ctx = SearchContext(cfg, 1)
    flat, steep = [d.request_id for d in method.initial_trials(ctx) if isinstance(d, CreateTrial)]
    bracket = method.brackets[0]
    assert isinstance(bracket, StoppingBracket) and bracket.rungs[0].units == 13
    for t in range(1, 14):
        method.validation_reported(ctx, flat, 0.50, t)
    steep_out: list[Decision] = []
    for t in range(1, 14):
        steep_out += method.validation_reported(ctx, steep, 0.9 - 0.15 * math.log(t), t)
    # At 13 batches the steep curve is at 0.515, behind the flat 0.50; extrapolated it is ahead.
    assert not steep_out
    assert bracket.rungs[0].trials == [steep, flat]


def test_extrapolated_promotion_ignores_validations_of_paused_trials_and_survives_exits() -> None:
    cfg = SEARCHES["tpe promotion pending extrapolated"]
    sim = HPSimulation(cfg, 3, lambda r, t: 0.0, 1, faults={5: Fault(kind="errored", at=2),
                                                         9: Fault(kind="invalid_hp", at=1)})
    sim.curve = sim.curve_of
    records = sim.run()
    assert sim.shutdown
    assert {r.exit_kind for r in records} >= {"completed", "errored", "invalid_hp"}
    method = sim.method
    assert isinstance(method, ASHASearch)
    for bracket in method.brackets:
        assert not bracket.history  # nothing kept once the trials have exited


# --- the config ---------------------------------------------------------------------------------------


def test_the_new_options_default_to_determineds_behaviour() -> None:
    s = config("mode: aggressive").searcher
    assert (s.sampler, s.promotion, s.rung_metric) == ("random", "asha", "value")
    method = new_method(config("mode: aggressive"))
    assert isinstance(method, ASHASearch) and method.sampler is None


@pytest.mark.parametrize(
    ("searcher", "path"),
    [
        ("{name: random, metric: loss, max_trials: 3, sampler: tpe}", "searcher.sampler"),
        ("{name: grid, metric: loss, rung_metric: extrapolated}", "searcher.rung_metric"),
        (f"{{{BASE}, promotion: pending_aware}}", "searcher.promotion"),  # stop_once is true
        (f"{{{BASE}, sampler: gp}}", "searcher.sampler"),
        (f"{{{BASE}, tpe: {{random_fraction: 1.5}}}}", "searcher.tpe.random_fraction"),
        (f"{{{BASE}, tpe: {{bandwidth: 2}}}}", "searcher.tpe.bandwidth"),
    ],
)
def test_bad_options_are_refused_with_their_path(searcher: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"entrypoint: m:T\n{SPACE}searcher: {searcher}\n")
    assert path in str(info.value)
