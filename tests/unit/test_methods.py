"""Whole searches played in memory (services.searcher.simulate): every method, no I/O."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from schemas.config import ExperimentConfig, parse_config
from services.searcher import asha, hparams
from services.searcher.methods import (
    ASHASearch,
    CreateTrial,
    Decision,
    MethodState,
    PromotionBracket,
    ResumeTrial,
    SearchContext,
    Shutdown,
    StoppingBracket,
    StopTrial,
    new_method,
)
from services.searcher.simulate import Fault, Simulation, TrialRecord, simulate

SPACE = (
    "hyperparameters:\n"
    "  lr: {type: log, minval: -4, maxval: -1}\n"
    "  layers: {type: int, minval: 1, maxval: 4}\n"
)
GRID_SPACE = (
    "hyperparameters:\n"
    "  lr: {type: log, minval: -4, maxval: -1, count: 3}\n"
    "  opt: {type: categorical, vals: [sgd, adam]}\n"
    "  fixed: 7\n"
)


def config(searcher: str, space: str = SPACE) -> ExperimentConfig:
    return parse_config(f"entrypoint: m:T\n{space}searcher: {searcher}\n")[0]


def quality(request_id: int) -> int:
    """A fixed, scrambled rank per trial: 1 (best) .. 11, with ties."""
    return 1 + (request_id * 37) % 11


def improving(request_id: int, time: int) -> float:
    """A loss that falls with training; trials keep their order at every time."""
    return quality(request_id) / (1 + time)


def encoded(decisions: list[Decision]) -> bytes:
    return msgspec.msgpack.encode(decisions)


RANDOM = "{name: random, metric: loss, max_trials: 7, max_concurrent_trials: 3, max_length: {batches: 50}}"
GRID = "{name: grid, metric: loss, max_concurrent_trials: 2, max_time: 30, time_metric: batches}"
ASHA_STOP = (
    "{name: adaptive_asha, metric: loss, max_trials: 40, max_time: 64, time_metric: batches, divisor: 2}"
)
ASHA_PROMOTE = ASHA_STOP[:-1] + ", stop_once: false}"
HALVING_STOP = (
    "{name: async_halving, metric: loss, max_trials: 20, num_rungs: 3, max_time: 48, time_metric: batches,"
    " max_concurrent_trials: 4}"
)
HALVING_PROMOTE = HALVING_STOP[:-1] + ", stop_once: false}"

SEARCHES: dict[str, ExperimentConfig] = {
    "single": config("{name: single, metric: loss, max_length: 20}"),
    "random": config(RANDOM),
    "grid": config(GRID, GRID_SPACE),
    "adaptive_asha": config(ASHA_STOP),
    "adaptive_asha promotion": config(ASHA_PROMOTE),
    "adaptive_asha conservative": config(ASHA_STOP[:-1] + ", mode: conservative, max_concurrent_trials: 0}"),
    "async_halving": config(HALVING_STOP),
    "async_halving promotion": config(HALVING_PROMOTE),
}


def initial_creates(sim: Simulation) -> int:
    """How many trials the method asks for before anything has happened."""
    fresh = new_method(sim.ctx.config)
    initial = fresh.initial_trials(SearchContext(sim.ctx.config, 1))
    return len([d for d in initial if isinstance(d, CreateTrial)])


def play(cfg: ExperimentConfig, seed: int = 1, period: int = 4, **kwargs: object) -> Simulation:
    sim = Simulation(cfg, seed, improving, period, **kwargs)  # type: ignore[arg-type]
    sim.run()
    return sim


# --- every method: determinism, snapshots, the end of the search -------------------------------


@pytest.mark.parametrize("name", SEARCHES)
def test_same_seed_same_decisions(name: str) -> None:
    first, second = play(SEARCHES[name]), play(SEARCHES[name])
    assert first.decisions
    assert encoded(first.decisions) == encoded(second.decisions)
    assert first.snapshot() == second.snapshot()


@pytest.mark.parametrize("name", SEARCHES)
def test_restoring_from_a_snapshot_before_every_call_changes_nothing(name: str) -> None:
    straight = play(SEARCHES[name])
    restored = play(SEARCHES[name], round_trip=True)
    assert encoded(restored.decisions) == encoded(straight.decisions)
    assert restored.records() == straight.records()


class SnapshotChecking(Simulation):
    """Checks snapshot -> restore -> snapshot is byte-equal before every method call."""

    checked = 0

    def _call(self, fn: Callable[[MethodState], list[Decision]]) -> list[Decision]:
        before = msgspec.msgpack.encode(self.method)
        restored = msgspec.msgpack.decode(before, type=MethodState)
        assert msgspec.msgpack.encode(restored) == before
        assert type(restored) is type(self.method)
        self.checked += 1
        return super()._call(fn)


@pytest.mark.parametrize("name", SEARCHES)
def test_snapshot_restore_snapshot_is_byte_equal_throughout(name: str) -> None:
    sim = SnapshotChecking(SEARCHES[name], 1, improving, 4)
    sim.run()
    assert sim.checked > 1


@pytest.mark.parametrize("name", SEARCHES)
def test_the_search_shuts_down_once_every_trial_has_exited(name: str) -> None:
    sim = play(SEARCHES[name])
    records = sim.records()
    assert all(r.exit_kind == "completed" for r in records)
    shutdowns = [i for i, d in enumerate(sim.decisions) if isinstance(d, Shutdown)]
    assert shutdowns and shutdowns[0] == len(sim.decisions) - 1  # nothing decided after it
    assert all(not d.failure for d in sim.decisions if isinstance(d, Shutdown))
    assert sim.method.progress() == pytest.approx(1.0)


@pytest.mark.parametrize("name", SEARCHES)
def test_request_ids_are_dense_and_in_creation_order(name: str) -> None:
    creates = [d for d in play(SEARCHES[name]).decisions if isinstance(d, CreateTrial)]
    assert [c.request_id for c in creates] == list(range(len(creates)))


def test_a_different_seed_draws_different_hyperparameters() -> None:
    one = simulate(SEARCHES["random"], 1, improving, 10)
    two = simulate(SEARCHES["random"], 2, improving, 10)
    assert [r.hparams for r in one] != [r.hparams for r in two]


# --- random --------------------------------------------------------------------------------------


def test_random_runs_max_trials_to_max_length_a_few_at_a_time() -> None:
    sim = play(SEARCHES["random"], period=10)
    records = sim.records()
    assert len(records) == 7
    assert all(r.lengths_trained == [50] and r.stop_length == 50 and not r.stopped_early for r in records)
    assert initial_creates(sim) == 3  # max_concurrent_trials


def test_random_with_no_concurrency_limit_starts_everything() -> None:
    cfg = config("{name: random, metric: loss, max_trials: 5, max_concurrent_trials: 0, max_length: 10}")
    assert initial_creates(play(cfg)) == 5


def test_random_replaces_invalid_hyperparameters_but_not_crashes() -> None:
    faults = {1: Fault(kind="invalid_hp", at=0), 2: Fault(kind="errored", at=20)}
    records = simulate(SEARCHES["random"], 1, improving, 10, faults=faults)
    assert len(records) == 8  # 7 + 1 replacement
    assert [r.exit_kind for r in records].count("invalid_hp") == 1
    assert [r.exit_kind for r in records].count("errored") == 1


def test_random_every_trial_errored_shuts_down_as_a_failure() -> None:
    cfg = config("{name: random, metric: loss, max_trials: 2, max_length: 10}")
    sim = play(cfg, faults={0: Fault(kind="errored"), 1: Fault(kind="errored")})
    assert sim.decisions[-1] == Shutdown(failure=True)


# --- grid ----------------------------------------------------------------------------------------


def test_grid_trains_every_point_exactly_once_in_order() -> None:
    cfg = SEARCHES["grid"]
    sim = play(cfg, period=10)
    records = sim.records()
    points = hparams.grid(cfg.hyperparameters)
    assert len(points) == 6
    assert [r.hparams for r in records] == points
    assert all(r.stop_length == 30 for r in records)
    assert initial_creates(sim) == 2  # max_concurrent_trials


def test_grid_does_not_replace_a_failed_point() -> None:
    records = simulate(SEARCHES["grid"], 1, improving, 10, faults={0: Fault(kind="invalid_hp")})
    assert len(records) == 6
    assert records[0].exit_kind == "invalid_hp"


def test_grid_seeds_come_from_the_experiment_seed() -> None:
    one = simulate(SEARCHES["grid"], 1, improving, 10)
    two = simulate(SEARCHES["grid"], 2, improving, 10)
    assert [r.hparams for r in one] == [r.hparams for r in two]
    assert [r.seed for r in one] != [r.seed for r in two]


# --- adaptive ASHA, stopping-based ---------------------------------------------------------------


def best_of(records: list[TrialRecord]) -> TrialRecord:
    return min(records, key=lambda r: (quality(r.request_id), r.request_id))


def test_adaptive_asha_stops_the_weak_early_and_trains_the_best_to_max_time() -> None:
    sim = play(SEARCHES["adaptive_asha"])
    records = sim.records()
    assert len(records) == 40  # max_trials, exactly
    assert all(r.lengths_trained == [64] for r in records)  # created to train to max_time
    stopped = [r for r in records if r.stopped_early]
    assert 0 < len(stopped) < len(records)
    assert best_of(records).stop_length == 64
    # Every stop is the searcher's, at a rung boundary of the trial's bracket.
    method = sim.method
    assert isinstance(method, ASHASearch)
    for r in stopped:
        bracket = method.brackets[method.trial_table[r.request_id]]
        assert r.stop_length in [rung.units for rung in bracket.rungs]


def test_adaptive_asha_brackets_follow_the_plan() -> None:
    method = new_method(SEARCHES["adaptive_asha"])
    assert isinstance(method, ASHASearch)
    # R = min(5, int(ln 64/ln 2) + 1 = 7, int(ln 40/ln 2) + 1 = 6) = 5; standard: [5, 4, 3].
    plan = asha.make_brackets(
        max_time=64, max_trials=40, divisor=2.0, max_rungs=5, mode="standard", max_concurrent_trials=16
    )
    assert [len(b.rungs) for b in method.brackets] == [b.num_rungs for b in plan] == [5, 4, 3]
    assert [b.max_trials for b in method.brackets] == [b.max_trials for b in plan]
    assert [[r.units for r in b.rungs] for b in method.brackets] == [
        [4, 8, 16, 32, 64],
        [8, 16, 32, 64],
        [16, 32, 64],
    ]
    assert all(isinstance(b, StoppingBracket) for b in method.brackets)
    played = play(SEARCHES["adaptive_asha"]).method
    assert isinstance(played, ASHASearch)
    per_bracket = [list(played.trial_table.values()).count(i) for i in range(3)]
    assert per_bracket == [b.max_trials for b in plan]


def test_larger_is_better_is_negated_by_the_method() -> None:
    cfg = config(ASHA_STOP[:-1] + ", smaller_is_better: false}")
    records = simulate(cfg, 1, lambda rid, t: -improving(rid, t), 4)
    assert best_of(records).stop_length == 64
    plain = simulate(SEARCHES["adaptive_asha"], 1, improving, 4)
    assert [r.stop_length for r in records] == [r.stop_length for r in plain]


def test_adaptive_asha_replaces_crashes_within_budget_and_invalid_hp_beyond_it() -> None:
    crashed = simulate(SEARCHES["adaptive_asha"], 1, improving, 4, faults={3: Fault(kind="errored", at=6)})
    assert len(crashed) == 40
    invalid = simulate(SEARCHES["adaptive_asha"], 1, improving, 4, faults={3: Fault(kind="invalid_hp", at=2)})
    assert len(invalid) == 41


def test_async_halving_is_one_stopping_bracket() -> None:
    method = new_method(SEARCHES["async_halving"])
    assert isinstance(method, ASHASearch) and len(method.brackets) == 1
    bracket = method.brackets[0]
    assert isinstance(bracket, StoppingBracket)
    assert [r.units for r in bracket.rungs] == [3, 12, 48]  # 48/16, 48/4, 48
    sim = play(SEARCHES["async_halving"], period=3)
    records = sim.records()
    assert len(records) == 20
    assert initial_creates(sim) == 4
    assert best_of(records).stop_length == 48
    assert any(r.stop_length == 3 for r in records)


# --- promotion-based ASHA ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adaptive_asha promotion", "async_halving promotion"])
def test_promotion_asha_resumes_promoted_trials_to_the_next_rung(name: str) -> None:
    sim = play(SEARCHES[name], period=3)
    method = sim.method
    assert isinstance(method, ASHASearch)
    assert all(isinstance(b, PromotionBracket) for b in method.brackets)
    records = sim.records()
    assert len(records) == sum(b.max_trials for b in method.brackets)
    resumed = 0
    for r in records:
        units = [rung.units for rung in method.brackets[method.trial_table[r.request_id]].rungs]
        # Created for rung 0, then resumed one rung at a time.
        assert r.lengths_trained == units[: len(r.lengths_trained)]
        assert r.stop_length == r.lengths_trained[-1]
        resumed += len(r.lengths_trained) > 1
    assert resumed > 0
    resumes = [d for d in sim.decisions if isinstance(d, ResumeTrial)]
    assert len(resumes) == sum(len(r.lengths_trained) - 1 for r in records)
    # Unpromoted trials are closed (StopTrial) while paused, after rung 0 filled up.
    assert any(isinstance(d, StopTrial) for d in sim.decisions)


def test_async_halving_promotion_trains_the_best_to_max_time() -> None:
    records = simulate(SEARCHES["async_halving promotion"], 1, improving, 3)
    assert best_of(records).lengths_trained == [3, 12, 48]
    assert best_of(records).stop_length == 48


def test_promotion_asha_survives_crashes_and_invalid_hyperparameters() -> None:
    faults = {2: Fault(kind="errored", at=2), 5: Fault(kind="invalid_hp", at=1)}
    sim = play(SEARCHES["async_halving promotion"], period=3, faults=faults)
    records = sim.records()
    assert len(records) == 21  # one replacement for the invalid trial
    assert all(r.exit_kind is not None for r in records)
    assert isinstance(sim.decisions[-1], Shutdown)


def test_every_searcher_name_builds_a_method() -> None:
    for cfg in SEARCHES.values():
        method = new_method(cfg)
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(method), type=MethodState) == method
