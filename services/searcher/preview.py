"""What a search will spend before any GPU is spent: brackets, rungs, trials per rung, total length.

Pure: computed from the config with the same arithmetic the searcher runs (``asha.py``), and the
``--simulate`` curves that ``kiln preview-search`` feeds to ``simulate.py``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

import msgspec

from schemas.config import ExperimentConfig
from services.searcher import asha, hparams

CurveName = Literal["improving", "worsening", "worse-each-report", "random"]
CURVES: tuple[CurveName, ...] = ("improving", "worsening", "worse-each-report", "random")


class RungPreview(msgspec.Struct, frozen=True, kw_only=True):
    """One rung: its length and how many trials reach it when the search stops as much as it may."""

    length: int
    trials: int


class BracketPreview(msgspec.Struct, frozen=True, kw_only=True):
    """One bracket (an independent sub-search)."""

    max_trials: int
    max_concurrent_trials: int
    rungs: list[RungPreview]
    total_length: int


class SearchPreview(msgspec.Struct, frozen=True, kw_only=True):
    """The whole search."""

    method: str
    unit: str
    max_length: int
    trials: int
    brackets: list[BracketPreview]
    total_length: int  # summed over trials, in ``unit``
    stop_once: bool = True


def preview(config: ExperimentConfig) -> SearchPreview:
    """The search's shape and budget, from its config alone."""
    s = config.searcher
    length = config.full_length or 0
    unit = s.time_metric or (s.max_length.unit if s.max_length is not None and not isinstance(s.max_length, int)
                             else "batches")
    match s.name:
        case "single" | "random" | "grid":
            trials = 1 if s.name == "single" else (len(hparams.grid(config.hyperparameters)) if s.name == "grid"
                                                   else int(s.max_trials or 0))
            rung = RungPreview(length=length, trials=trials)
            bracket = BracketPreview(max_trials=trials, max_concurrent_trials=s.max_concurrent_trials or trials,
                                     rungs=[rung], total_length=trials * length)
            return SearchPreview(method=s.name, unit=unit, max_length=length, trials=trials, brackets=[bracket],
                                 total_length=trials * length)
        case "adaptive_asha" | "async_halving":
            if s.name == "async_halving":
                brackets = [asha.Bracket(num_rungs=s.num_rungs or s.max_rungs, max_trials=int(s.max_trials or 0),
                                         max_concurrent_trials=s.max_concurrent_trials)]
            else:
                brackets = asha.make_brackets(max_time=length, max_trials=int(s.max_trials or 0), divisor=s.divisor,
                                              max_rungs=s.max_rungs, mode=s.mode,
                                              max_concurrent_trials=s.max_concurrent_trials,
                                              bracket_rungs=list(s.bracket_rungs) or None)
            shown = [_bracket(b, s.divisor, length) for b in brackets]
            return SearchPreview(method=s.name, unit=unit, max_length=length, trials=sum(b.max_trials for b in shown),
                                 brackets=shown, total_length=sum(b.total_length for b in shown),
                                 stop_once=s.stop_once)
        case other:
            raise ValueError(f"searcher.name: cannot preview {other!r}")


def _bracket(b: asha.Bracket, divisor: float, max_time: int) -> BracketPreview:
    """Rung lengths, and trials per rung when each rung keeps its top 1/divisor."""
    units = asha.rung_units(b.num_rungs, divisor, max_time)
    reaching = [b.max_trials]
    for _ in units[1:]:
        reaching.append(max(int(reaching[-1] / divisor), 1))
    rungs = [RungPreview(length=u, trials=n) for u, n in zip(units, reaching, strict=True)]
    # Trials that stop at rung k trained units[k]; the last rung's survivors train to the end.
    total = sum((reaching[k] - (reaching[k + 1] if k + 1 < len(reaching) else 0)) * units[k]
                for k in range(len(units)))
    return BracketPreview(max_trials=b.max_trials, max_concurrent_trials=b.max_concurrent_trials, rungs=rungs,
                          total_length=total)


def curve(name: CurveName, smaller_is_better: bool, seed: int = 0) -> Callable[[int, int], float]:
    """A synthetic learning curve ``f(request_id, time) -> metric`` for ``--simulate``.

    ``improving``: every trial gets better the longer it trains, at its own pace; ``worsening``: worse, each
    trial on its own slope; ``worse-each-report``: one counter for the whole search, so every report is worse than
    every earlier one of any trial (the curve Determined's searcher tests use; with the simulator's one trial at a
    time in creation order their expectations reproduce); ``random``: noise. "Better" follows ``smaller_is_better``.
    The ``worse-each-report`` curve has state: make a new one per simulation.
    """
    reports = 0

    def quality(request_id: int) -> float:
        return random.Random(f"{seed}:{request_id}").uniform(0.1, 1.0)

    def improving(request_id: int, time: int) -> float:
        loss = quality(request_id) / (1.0 + time)
        return loss if smaller_is_better else 1.0 - loss

    def worsening(request_id: int, time: int) -> float:
        loss = quality(request_id) * (1.0 + time)
        return loss if smaller_is_better else -loss

    def worse_each_report(request_id: int, time: int) -> float:
        nonlocal reports
        reports += 1
        return float(reports) if smaller_is_better else -float(reports)

    def noise(request_id: int, time: int) -> float:
        return random.Random(f"{seed}:{request_id}:{time}").random()

    curves = {"improving": improving, "worsening": worsening, "worse-each-report": worse_each_report,
              "random": noise}
    return curves[name]
