"""Search methods: pure, deterministic state machines (STYLE.md 1-2).

A method gets one call per incoming fact (``initial_trials``, ``trial_created``,
``validation_reported``, ``trial_exited``) and answers with a list of decisions. It never touches the
bus, the database or a clock. Its state is a msgspec Struct, so it serialises to bytes and back; the
random state is derived from the experiment seed and the trial's request id, never from a global RNG.
"""

from __future__ import annotations

import random
from typing import Any, Literal

import msgspec

from schemas.config import ExperimentConfig, searcher_max_length
from services.searcher import hparams

ExitKind = Literal["completed", "errored", "invalid_hp", "canceled"]


class CreateTrial(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Start a new trial with these hyperparameters."""

    request_id: int
    hparams: dict[str, Any]
    seed: int
    max_length: int | None = None


class StopTrial(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Ask a running trial to stop (it checkpoints and exits as completed)."""

    request_id: int


class ResumeTrial(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Resume a paused trial from its checkpoint and train it to ``max_length`` (promotion)."""

    request_id: int
    max_length: int


class Shutdown(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The search is over: create nothing more; the experiment ends when its trials have exited."""

    failure: bool = False


Decision = CreateTrial | StopTrial | ResumeTrial | Shutdown


class SearchContext:
    """What a method may consult but does not own: the search space, seed and target length."""

    def __init__(self, config: ExperimentConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.max_length = searcher_max_length(config)

    def new_trial(self, request_id: int) -> CreateTrial:
        """Draw trial ``request_id``'s hyperparameters and seed, the same every time it is asked."""
        # Seeding per request keeps each draw reproducible without carrying RNG state around.
        rng = random.Random(f"{self.seed}:{request_id}")
        drawn = hparams.sample(self.config.hyperparameters, rng)
        return CreateTrial(
            request_id=request_id,
            hparams=drawn,
            seed=rng.randrange(2**31),
            max_length=self.max_length,
        )


class SingleSearch(msgspec.Struct, kw_only=True, tag="single"):
    """``searcher.name: single``: one trial, trained to ``max_length``; done when it exits."""

    created: int = 0
    exited: int = 0

    def initial_trials(self, ctx: SearchContext) -> list[Decision]:
        """Create the one trial."""
        self.created = 1
        return [ctx.new_trial(0)]

    def trial_created(self, ctx: SearchContext, request_id: int) -> list[Decision]:
        """Nothing to decide: the trial was asked for at the start."""
        return []

    def validation_reported(
        self, ctx: SearchContext, request_id: int, metric: float, time_value: int
    ) -> list[Decision]:
        """A single trial is never stopped early."""
        return []

    def trial_exited(self, ctx: SearchContext, request_id: int, kind: ExitKind) -> list[Decision]:
        """The one trial is over, whatever its end: so is the search."""
        self.exited += 1
        return [Shutdown(failure=kind == "errored")]

    def progress(self) -> float:
        """0 until the trial exits, then 1 (per-step progress comes from the trial itself)."""
        return 1.0 if self.exited else 0.0


# The closed set of method states; issue 3 adds grid, random, ASHA variants here.
MethodState = SingleSearch


def new_method(config: ExperimentConfig) -> MethodState:
    """The initial state of the method the config names."""
    match config.searcher.name:
        case "single":
            return SingleSearch()
        case other:
            raise ValueError(f"searcher.name: {other!r} is not implemented yet (supported: single)")
