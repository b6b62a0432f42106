"""ASHA's arithmetic and rung rules (docs/asha.md), table-driven; expected values derived by hand."""

from __future__ import annotations

import math
import sys

import pytest

from services.searcher import asha
from services.searcher.methods import (
    CreateTrial,
    Decision,
    PromotionBracket,
    ResumeTrial,
    Rung,
    SearchContext,
    StoppingBracket,
    StopTrial,
)

# --- Go's float64 log and pow ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top", "base", "ratio"),
    [
        # The exact powers docs/asha.md warns about: truncating these ratios drops a rung.
        (1000, 10, 2.9999999999999996),
        (243, 3, 4.999999999999999),
        (1024, 4, 5.0),
        (27, 3, 3.0),
    ],
)
def test_log_ratio_at_exact_powers(top: int, base: int, ratio: float) -> None:
    assert math.log(top) / math.log(base) == ratio


@pytest.mark.parametrize(("x", "n"), [(4.0, 0), (4.0, 1), (4.0, 4), (2.5, 3), (3.0, 5), (1.1, 8), (1.3, 6)])
def test_go_pow_is_binary_exponentiation(x: float, n: int) -> None:
    # Go's Pow multiplies mantissas in [0.5, 1) and keeps the exponent apart; scaling by 2 is exact,
    # so it rounds exactly like square-and-multiply on the values themselves.
    expected, square, i = 1.0, x, n
    while i:
        if i & 1:
            expected *= square
        square *= square
        i >>= 1
    assert asha.go_pow(x, n) == expected


def test_go_pow_differs_from_the_c_library_where_it_rounds_differently() -> None:
    assert asha.go_pow(1.1, 8) != 1.1**8


# --- step 1: the number of rungs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_time", "max_trials", "divisor", "max_rungs", "rungs"),
    [
        (64, 16, 2.0, 5, 5),  # by time 7, by trials 5
        (64, 1000, 2.0, 10, 7),  # by time: ln 64 / ln 2 = 6 -> 7
        (10000, 20, 4.0, 5, 3),  # by trials: ln 20 / ln 4 = 2.16 -> 3
        (10000, 10000, 4.0, 5, 5),  # max_rungs binds
        (1000, 1000, 10.0, 10, 3),  # 2.9999999999999996 truncates to 2: 3 rungs, not 4
        (1000, 100000, 10.0, 10, 3),
        (243, 243, 3.0, 10, 5),  # 4.999999999999999 truncates to 4: 5 rungs, not 6 (docs/asha.md)
        (243, 243, 3.0, 5, 5),
        (1, 100, 4.0, 5, 1),  # ln 1 = 0
        (100, 1, 4.0, 5, 1),
    ],
)
def test_num_rungs(max_time: int, max_trials: int, divisor: float, max_rungs: int, rungs: int) -> None:
    assert asha.num_rungs(max_time, max_trials, divisor, max_rungs) == rungs


# --- step 2: brackets per mode -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "rungs", "brackets"),
    [
        ("aggressive", 5, [5]),
        ("standard", 5, [3, 4, 5]),  # (5-1)//2 + 1 = 3
        ("standard", 4, [2, 3, 4]),  # (4-1)//2 + 1 = 2
        ("standard", 2, [1, 2]),
        ("standard", 1, [1]),
        ("conservative", 5, [1, 2, 3, 4, 5]),
        ("conservative", 1, [1]),
    ],
)
def test_mode_rungs(mode: asha.Mode, rungs: int, brackets: list[int]) -> None:
    assert asha.mode_rungs(mode, rungs) == brackets


# --- step 3: trials per bracket ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_trials", "divisor", "rungs", "trials"),
    [
        # w = 2^4/5, 2^3/4, 2^2/3 = 3.2, 2, 1.33 (sum 6.53): 7.84, 4.90, 3.27 -> 7, 4, 3; +2 to bracket 0
        (16, 2.0, [5, 4, 3], [9, 4, 3]),
        # w = 51.2, 16, 5.33 (sum 72.53): 70.6, 22.1, 7.35 -> 70, 22, 7; +1 to bracket 0
        (100, 4.0, [5, 4, 3], [71, 22, 7]),
        # w = 5.33, 2, 1 (sum 8.33): 1.92, 0.72, 0.36 -> 1, max(0, 1), max(0, 1)
        (3, 4.0, [3, 2, 1], [1, 1, 1]),
        # every bracket gets at least one, even beyond max_trials; the remainder is never negative
        (2, 4.0, [3, 2, 1], [1, 1, 1]),
        (7, 4.0, [4], [7]),
    ],
)
def test_bracket_max_trials(max_trials: int, divisor: float, rungs: list[int], trials: list[int]) -> None:
    assert asha.bracket_max_trials(max_trials, divisor, rungs) == trials


# --- step 4: concurrency per bracket -----------------------------------------------------------


@pytest.mark.parametrize(
    ("max_concurrent", "divisor", "trials", "concurrent"),
    [
        (0, 4.0, [71, 22, 7], [7, 7, 7]),  # 0: max(trials of the last bracket, int(divisor))
        (0, 4.0, [9, 4, 3], [4, 4, 4]),
        (0, 2.5, [5, 1], [2, 2]),  # int(2.5) = 2
        (16, 4.0, [71, 22, 7], [6, 5, 5]),  # 16 // 3 = 5, the first 16 % 3 = 1 get one more
        (2, 4.0, [71, 22, 7], [1, 1, 1]),  # raised to the number of brackets first
        (9, 4.0, [71, 22, 7], [3, 3, 3]),
        (5, 4.0, [10], [5]),
    ],
)
def test_bracket_max_concurrent_trials(
    max_concurrent: int, divisor: float, trials: list[int], concurrent: list[int]
) -> None:
    assert asha.bracket_max_concurrent_trials(max_concurrent, divisor, trials) == concurrent


def test_make_brackets_sorts_most_rungs_first_and_honours_bracket_rungs() -> None:
    brackets = asha.make_brackets(
        max_time=1000, max_trials=100, divisor=4.0, max_rungs=5, mode="standard", max_concurrent_trials=16
    )
    # R = min(5, int(4.98) + 1, int(3.32) + 1) = 4; standard: [2, 3, 4], sorted descending.
    assert [(b.num_rungs, b.max_trials, b.max_concurrent_trials) for b in brackets] == [
        (4, 70, 6),  # w = 16, 5.33, 2 (sum 23.33): 68.6, 22.9, 8.57 -> 68, 22, 8; +2
        (3, 22, 5),
        (2, 8, 5),
    ]
    override = asha.make_brackets(
        max_time=1000,
        max_trials=100,
        divisor=4.0,
        max_rungs=5,
        mode="aggressive",
        max_concurrent_trials=0,
        bracket_rungs=[1, 3],
    )
    assert [b.num_rungs for b in override] == [3, 1]


# --- step 5: rung units ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rungs", "divisor", "max_time", "units"),
    [
        (3, 4.0, 1000, [62, 250, 1000]),  # 1000/16 = 62.5 -> 62
        (5, 4.0, 100, [1, 1, 6, 25, 100]),  # 100/256 -> 0 -> at least 1; 100/64 = 1.56 -> 1
        (1, 4.0, 77, [77]),
        (4, 2.0, 64, [8, 16, 32, 64]),
        (3, 3.0, 10, [1, 3, 10]),  # 10/9 = 1.1 -> 1, 10/3 = 3.3 -> 3
    ],
)
def test_rung_units(rungs: int, divisor: float, max_time: int, units: list[int]) -> None:
    assert asha.rung_units(rungs, divisor, max_time) == units


# --- initial trials ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_concurrent", "max_trials", "divisor", "rungs", "initial"),
    [
        (16, 10, 4.0, 3, 10),  # min(max_concurrent, max_trials)
        (3, 10, 4.0, 3, 3),
        (0, 100, 4.0, 3, 16),  # 0: divisor^(rungs-1), enough to fill the top rung
        (0, 5, 4.0, 3, 5),  # ... clamped to max_trials
        (0, 100, 4.0, 1, 1),  # ... and to at least 1
        (0, 100, 2.5, 3, 6),  # int(6.25)
    ],
)
def test_initial_trials(
    max_concurrent: int, max_trials: int, divisor: float, rungs: int, initial: int
) -> None:
    assert asha.initial_trials(max_concurrent, max_trials, divisor, rungs) == initial


# --- the rung rules on plain lists -------------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "metric", "index"),
    [([1.0, 2.0, 2.0, 3.0], 2.0, 1), ([1.0, 2.0], 0.5, 0), ([1.0, 2.0], 9.0, 2), ([], 1.0, 0)],
)
def test_stopping_insert_puts_a_tie_before(metrics: list[float], metric: float, index: int) -> None:
    assert asha.stopping_insert(metrics, metric) == index


@pytest.mark.parametrize(
    ("size", "divisor", "keep"), [(1, 4.0, 1), (3, 4.0, 1), (8, 4.0, 2), (9, 2.0, 4), (0, 2.0, 1)]
)
def test_keep_count(size: int, divisor: float, keep: int) -> None:
    assert asha.keep_count(size, divisor) == keep


def promo(insert_index: int, promote_new: bool, promote_index: int | None) -> asha.Promotion:
    return asha.Promotion(insert_index=insert_index, promote_new=promote_new, promote_index=promote_index)


@pytest.mark.parametrize(
    ("metrics", "promoted", "metric", "expected"),
    [
        # len 3, divisor 2: old = 1, new = 2; 2.5 lands at 1 < 2: promote the new trial
        ([2.0, 3.0, 4.0], [True, False, False], 2.5, promo(1, True, None)),
        # a tie goes after: 2.0 lands at 2 (bisect_left would give 1 and promote it)
        ([1.0, 2.0, 3.0], [True, False, False], 2.0, promo(2, False, 1)),
        # not good enough, and new != old: the unpromoted entry at index old (= 1) goes up
        ([1.0, 2.0, 3.0], [True, False, False], 5.0, promo(3, False, 1)),
        # ... unless it already went up
        ([1.0, 2.0, 3.0], [True, True, False], 5.0, promo(3, False, None)),
        # len 2: old = new = 1, nothing changes
        ([1.0, 3.0], [True, False], 2.0, promo(1, False, None)),
        # the first result of a rung: new = int(1/2) = 0, nobody goes up
        ([], [], 1.0, promo(0, False, None)),
        # the new entry shifts the old ones: after inserting 0.5 at 0, index old = 1 holds 1.0
        ([1.0, 2.0, 3.0], [False, False, False], 0.5, promo(0, True, None)),
    ],
)
def test_promotion_rule(
    metrics: list[float], promoted: list[bool], metric: float, expected: asha.Promotion
) -> None:
    assert asha.promotion(metrics, promoted, metric, 2.0) == expected


@pytest.mark.parametrize(
    ("rung0", "max_trials", "completed", "invalid", "progress"),
    [
        (0, 10, 0, 0, 0.0),
        (6, 10, 6, 0, 6 / 12),  # rung 0 not full: its fill against 1.2 * max_trials
        (10, 10, 5, 0, 10 / 12),  # full, few completed: the fill still wins
        (10, 10, 10, 1, 0.9),  # full: (completed - invalid) / max_trials
        (10, 10, 11, 1, 1.0),
    ],
)
def test_stopping_progress(
    rung0: int, max_trials: int, completed: int, invalid: int, progress: float
) -> None:
    assert asha.stopping_progress(rung0, max_trials, completed, invalid) == pytest.approx(progress)


# --- the stopping bracket ----------------------------------------------------------------------

CTX: SearchContext = None  # type: ignore[assignment]  # the brackets only use ctx through spawn


class Spawner:
    """Hands out request ids like the tournament does, without hyperparameters."""

    def __init__(self, first: int = 100) -> None:
        self.next = first

    def __call__(self, max_length: int) -> CreateTrial:
        self.next += 1
        return CreateTrial(request_id=self.next - 1, hparams={}, seed=0, max_length=max_length)


def stopping(
    units: list[int], max_trials: int, divisor: float = 4.0, **rungs: list[tuple[int, float]]
) -> StoppingBracket:
    """A bracket whose rung ``k`` (keyword ``r{k}``) already holds the (request id, metric) pairs given."""
    bracket = StoppingBracket(
        divisor=divisor, max_trials=max_trials, max_concurrent_trials=1, rungs=[Rung(units=u) for u in units]
    )
    for k, rung in enumerate(bracket.rungs):
        for request_id, metric in sorted(rungs.get(f"r{k}", []), key=lambda p: p[1]):
            rung.insert(len(rung.metrics), request_id, metric)
            bracket.trial_rungs[request_id] = max(bracket.trial_rungs.get(request_id, 0), k)
    return bracket


def kinds(decisions: list[Decision]) -> list[tuple[str, int]]:
    return [(type(d).__name__, getattr(d, "request_id", -1)) for d in decisions]


def test_stopping_tie_goes_before_the_equal_result_and_survives() -> None:
    bracket = stopping([10, 40], max_trials=10, divisor=2.0, r0=[(1, 5.0)])
    bracket.trial_rungs[2] = 0
    # Inserted at 0 (before trial 1's equal 5.0); keep = max(int(2/2), 1) = 1; 0 < 1: it goes on.
    assert bracket.validation_reported(CTX, Spawner(), 2, 5.0, 10) == []
    assert bracket.rungs[0].trials == [2, 1]
    assert bracket.trial_rungs[2] == 1


def test_stopping_below_the_rung_length_does_nothing() -> None:
    bracket = stopping([10, 40], max_trials=10, r0=[(1, 5.0)])
    bracket.trial_rungs[2] = 0
    assert bracket.validation_reported(CTX, Spawner(), 2, 1.0, 9) == []
    assert bracket.rungs[0].trials == [1]


def test_stopping_worse_than_the_kept_share_stops_and_creates_a_replacement() -> None:
    bracket = stopping([10, 40], max_trials=10, r0=[(1, 1.0), (3, 2.0), (4, 3.0)])
    bracket.trial_rungs[2] = 0
    # Index 3 of 4; keep = max(int(4/4), 1) = 1: stop; 4 trials known < 10: create one more.
    out = bracket.validation_reported(CTX, Spawner(), 2, 9.0, 10)
    assert kinds(out) == [("StopTrial", 2), ("CreateTrial", 100)]
    assert out[1] == CreateTrial(request_id=100, hparams={}, seed=0, max_length=40)  # trains to max_time
    assert bracket.trial_rungs[100] == 0


def test_stopping_at_max_trials_stops_without_creating() -> None:
    bracket = stopping([10, 40], max_trials=4, r0=[(1, 1.0), (3, 2.0), (4, 3.0)])
    bracket.trial_rungs[2] = 0
    assert kinds(bracket.validation_reported(CTX, Spawner(), 2, 9.0, 10)) == [("StopTrial", 2)]


def test_one_validation_passes_several_rungs_and_the_top_one_stops() -> None:
    bracket = stopping([1, 4, 16], max_trials=10, r0=[(1, 2.0)], r1=[(1, 2.0)])
    bracket.trial_rungs[2] = 0
    # t = 16 reaches every rung: best in rung 0, best in rung 1, then the top rung: Stop (+ Create).
    out = bracket.validation_reported(CTX, Spawner(), 2, 1.0, 16)
    assert kinds(out) == [("StopTrial", 2), ("CreateTrial", 100)]
    assert [r.trials for r in bracket.rungs] == [[2, 1], [2, 1], [2]]
    assert bracket.trial_rungs[2] == 2


def test_one_validation_can_pass_one_rung_and_be_stopped_in_the_next() -> None:
    bracket = stopping([1, 4, 16], max_trials=10, r0=[(1, 2.0)], r1=[(1, 0.5), (3, 0.7)])
    bracket.trial_rungs[2] = 0
    out = bracket.validation_reported(CTX, Spawner(), 2, 1.0, 5)
    # Rung 0: index 0 < keep 1, go on; rung 1: index 2 >= keep max(int(3/4), 1) = 1: stop.
    assert kinds(out) == [("StopTrial", 2), ("CreateTrial", 100)]
    assert bracket.trial_rungs[2] == 1
    # A stopped trial validating again on its way out changes nothing (Kiln's guard).
    assert bracket.validation_reported(CTX, Spawner(), 2, 0.1, 6) == []
    assert bracket.rungs[1].trials == [1, 3, 2]


def test_early_exit_is_the_worst_result_in_its_current_rung() -> None:
    bracket = stopping([1, 4, 16], max_trials=10, r0=[(1, 2.0), (2, 1.0)], r1=[(2, 1.0)])
    out = bracket.trial_exited(CTX, Spawner(), 2, "errored")
    assert kinds(out) == [("CreateTrial", 100)]
    assert bracket.rungs[1].metrics == [1.0, sys.float_info.max]
    assert bracket.rungs[1].trials == [2, 2]
    assert bracket.rungs[0].trials == [2, 1]  # the lower rungs keep its real results
    assert bracket.trials_completed == 1


def test_early_exit_at_max_trials_creates_nothing() -> None:
    bracket = stopping([1, 4], max_trials=2, r0=[(1, 2.0), (2, 1.0)])
    assert bracket.trial_exited(CTX, Spawner(), 1, "canceled") == []
    assert bracket.rungs[0].metrics == [1.0, 2.0, sys.float_info.max]


def test_invalid_hp_is_forgotten_and_always_replaced() -> None:
    bracket = stopping([1, 4, 16], max_trials=2, r0=[(1, 2.0), (2, 1.0)], r1=[(2, 1.0)])
    out = bracket.trial_exited(CTX, Spawner(), 2, "invalid_hp")
    assert kinds(out) == [("CreateTrial", 100)]  # replaced although 2 trials = max_trials
    assert [r.trials for r in bracket.rungs] == [[1], [], []]
    assert bracket.invalid_trials == 1
    # Three known trials, one invalid: the budget is full again.
    assert not bracket._budget_left()


def test_a_clean_exit_only_counts_as_completed() -> None:
    bracket = stopping([1, 4], max_trials=10, r0=[(1, 2.0)])
    assert bracket.trial_exited(CTX, Spawner(), 1, "completed") == []
    assert bracket.trials_completed == 1
    assert bracket.rungs[0].metrics == [2.0]


# --- the promotion bracket ---------------------------------------------------------------------


def test_promotion_bracket_promotes_and_closes_out_when_rung_zero_is_full() -> None:
    bracket = PromotionBracket(
        divisor=2.0, max_trials=4, max_concurrent_trials=4, rungs=[Rung(units=4), Rung(units=8)]
    )
    spawn = Spawner(first=0)
    created = bracket.initial_trials(CTX, spawn)
    assert [(d.request_id, d.max_length) for d in created if isinstance(d, CreateTrial)] == [
        (0, 4), (1, 4), (2, 4), (3, 4)  # fmt: skip
    ]
    assert bracket.rungs[0].outstanding == 4
    # Validations before the rung's length are not rung results.
    assert bracket.validation_reported(CTX, spawn, 0, 0.1, 3) == []
    # Trial 0 first: old = new = 0, nobody goes up; 4 trials exist: no create.
    assert bracket.validation_reported(CTX, spawn, 0, 4.0, 4) == []
    # Trial 1: old 0, new 1, lands at 0 < 1: promoted now, resumed to the next rung's length.
    assert bracket.validation_reported(CTX, spawn, 1, 3.0, 4) == [ResumeTrial(request_id=1, max_length=8)]
    # Trial 2: old = new = 1, lands at 0 < 1: promoted too.
    assert bracket.validation_reported(CTX, spawn, 2, 2.0, 4) == [ResumeTrial(request_id=2, max_length=8)]
    # Trial 3: old 1, new 2, lands last; index old holds trial 1, already promoted: nobody. Rung 0 is
    # full and nothing trains toward it: close its unpromoted trials. Rung 1 still has work: stop there.
    out = bracket.validation_reported(CTX, spawn, 3, 5.0, 4)
    assert out == [StopTrial(request_id=0), StopTrial(request_id=3)]
    assert bracket.rungs[0].trials == [2, 1, 0, 3]
    assert bracket.rungs[0].promoted == [True, True, False, False]
    # The top rung's result: the trial is done (it exits at max_time by itself), nothing to stop.
    assert bracket.validation_reported(CTX, spawn, 1, 1.5, 8) == []
    assert bracket.validation_reported(CTX, spawn, 2, 1.0, 8) == []
    assert bracket.closed == {0: True, 3: True, 1: True, 2: True}
    assert bracket.progress() == pytest.approx(4 / 4.8)


def test_promotion_bracket_creates_when_nothing_was_promoted() -> None:
    bracket = PromotionBracket(
        divisor=2.0, max_trials=3, max_concurrent_trials=1, rungs=[Rung(units=4), Rung(units=8)]
    )
    spawn = Spawner(first=0)
    assert len(bracket.initial_trials(CTX, spawn)) == 1
    # The first result: nobody goes up (new = 0), 1 trial < 3: create one more.
    assert bracket.validation_reported(CTX, spawn, 0, 4.0, 4) == [
        CreateTrial(request_id=1, hparams={}, seed=0, max_length=4)
    ]
    # The second: it is better, promoted now: no create (its promotion is the new work).
    assert bracket.validation_reported(CTX, spawn, 1, 3.0, 4) == [ResumeTrial(request_id=1, max_length=8)]


def test_promotion_bracket_early_exit_while_training_counts_as_worst_and_invalid_is_replaced() -> None:
    bracket = PromotionBracket(
        divisor=2.0, max_trials=2, max_concurrent_trials=2, rungs=[Rung(units=4), Rung(units=8)]
    )
    spawn = Spawner(first=0)
    bracket.initial_trials(CTX, spawn)
    # Trial 0 crashes before rung 0: the worst result; no promotion (new = 0), budget full: nothing.
    assert bracket.trial_exited(CTX, spawn, 0, "errored") == []
    assert bracket.rungs[0].metrics == [sys.float_info.max]
    assert bracket.rungs[0].outstanding == 1
    # Trial 1 has invalid hyperparameters: forgotten, replaced although the budget is full.
    assert bracket.trial_exited(CTX, spawn, 1, "invalid_hp") == [
        CreateTrial(request_id=2, hparams={}, seed=0, max_length=4)
    ]
    assert bracket.rungs[0].outstanding == 1  # 1 left, 1 replaced
    # Trial 2's result: better than the crash, promoted now (old 0, new 1).
    assert bracket.validation_reported(CTX, spawn, 2, 1.0, 4) == [ResumeTrial(request_id=2, max_length=8)]


def test_promotion_of_a_trial_that_already_exited_records_the_worst_result_in_the_next_rung() -> None:
    bracket = PromotionBracket(
        divisor=2.0, max_trials=3, max_concurrent_trials=3, rungs=[Rung(units=u) for u in (4, 8, 16)]
    )
    spawn = Spawner(first=0)
    bracket.initial_trials(CTX, spawn)
    assert bracket.validation_reported(CTX, spawn, 0, 5.0, 4) == []
    # Trial 0 is closed by the user while paused: its rung-0 result stays.
    assert bracket.trial_exited(CTX, spawn, 0, "canceled") == []
    # Trial 1 is worse: old 0, new 1, lands at 1, not < 1; the entry at index old = 0 (trial 0) is
    # promoted, but it has exited, so it "reports" the worst result in rung 1 at once.
    assert bracket.validation_reported(CTX, spawn, 1, 6.0, 4) == []
    assert bracket.rungs[1].metrics == [sys.float_info.max]
    assert bracket.rungs[1].outstanding == 0
