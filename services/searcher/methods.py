"""Search methods: pure, deterministic state machines that answer each fact with a closed set of decisions.

A method gets one call per incoming fact (``initial_trials``, ``trial_created``,
``validation_reported``, ``trial_exited``) and answers with a list of decisions. It never touches the
bus, the database or a clock. Its state is a msgspec Struct, so it serialises to bytes and back; the
random state is derived from the experiment seed and the trial's request id, never from a global RNG.

Every method hands out its own request ids (0, 1, 2, ... in the order it decides to create trials) and
emits ``Shutdown`` once every trial it created has exited and it will create no more: Determined's
``TrialsRequested == len(TrialsClosed)`` rule (``searcher.go``).

``adaptive_asha`` and ``async_halving`` follow ``docs/asha.md``: a tournament of brackets, each
an independent ASHA sub-search, stopping-based (``stop_once: true``, Determined 0.38's
``asha_stopping.go``) or promotion-based (``stop_once: false``, the legacy ``asha.go``, with pause and
resume from checkpoint). The arithmetic lives in :mod:`services.searcher.asha`.
"""

from __future__ import annotations

import copy
import functools
import math
import random
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import numpy as np

from schemas.config import ExperimentConfig
from services.searcher import asha, curves, hparams, tpe

ExitKind = Literal["completed", "errored", "invalid_hp", "canceled"]


class CreateTrial(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Start a new trial with these hyperparameters."""

    request_id: int
    hparams: dict[str, Any]
    seed: int
    max_length: int | None = None


class StopTrial(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Ask a running trial to stop (it checkpoints and exits as completed); a paused one is closed."""

    request_id: int


class ResumeTrial(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Resume a paused trial from its checkpoint and train it to ``max_length`` (promotion)."""

    request_id: int
    max_length: int


class ContinueTrial(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Train an ended trial again (``kiln experiment continue``): from its latest checkpoint, to ``max_length``."""

    request_id: int
    hparams: dict[str, Any]
    max_length: int | None = None


class Shutdown(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The search is over: create nothing more; the experiment ends when its trials have exited."""

    failure: bool = False


Decision = CreateTrial | StopTrial | ResumeTrial | ContinueTrial | Shutdown


class SearchContext:
    """What a method may consult but does not own: the search space, seed and target length."""

    def __init__(self, config: ExperimentConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.max_length = config.full_length

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

    @functools.cached_property
    def grid_points(self) -> list[dict[str, Any]]:
        """The grid over the search space, computed once per context (it is not part of the state)."""
        return hparams.grid(self.config.hyperparameters)

    @functools.cached_property
    def space(self) -> tpe.Space:
        """The search space on the unit cube, for the density-model sampler (not part of the state)."""
        return tpe.Space(self.config.hyperparameters)

    def searcher_value(self, metric: float) -> float:
        """``metric`` as the methods rank it: smaller is better (negated when the config says larger)."""
        return metric if self.config.searcher.smaller_is_better else -metric

    def full_length(self) -> int:
        """The searcher's length (``max_time`` or legacy ``max_length``); methods that need one call this."""
        if self.max_length is None:
            raise ValueError(f"searcher {self.config.searcher.name!r} needs max_time (or legacy max_length)")
        return self.max_length


def _continue(drawn: CreateTrial) -> ContinueTrial:
    """The trial ``drawn`` describes, continued: its hyperparameters, the context's (current) length."""
    return ContinueTrial(request_id=drawn.request_id, hparams=drawn.hparams, max_length=drawn.max_length)


def _shutdown_if_done(created: int, exited: int, errored: int) -> list[Decision]:
    """Determined's rule: once every requested trial has exited, the search is over."""
    if exited < created:
        return []
    return [Shutdown(failure=created > 0 and errored >= created)]


class SearchMethod(msgspec.Struct, kw_only=True):
    """What every search method answers (Determined's ``SearchMethod``): one call per fact, decisions back.

    The facts most methods ignore default to no decision here; ``initial_trials``, ``trial_exited`` and
    ``progress`` are each method's own. The base has no fields, so a method's snapshot is only its own state.
    """

    def initial_trials(self, ctx: SearchContext) -> list[Decision]:
        """The trials to create when the experiment starts."""
        raise NotImplementedError

    def trial_created(self, ctx: SearchContext, request_id: int) -> list[Decision]:
        """Nothing to decide: a method registers its trials when it decides to create them."""
        return []

    def validation_reported(
        self, ctx: SearchContext, request_id: int, metric: float, time_value: int
    ) -> list[Decision]:
        """Nothing to decide: only early-stopping methods rank validations."""
        return []

    def trial_exited(self, ctx: SearchContext, request_id: int, kind: ExitKind) -> list[Decision]:
        """What a trial's end changes: a replacement, the next trial, or the end of the search."""
        raise NotImplementedError

    def progress(self) -> float:
        """How far the search is, within [0, 1]."""
        raise NotImplementedError

    def trial_continued(self, ctx: SearchContext, request_id: int, counted: ExitKind | None) -> list[Decision]:
        """A user continued the ended experiment and this trial with it (Determined's ``continue``): take back
        its exit (``counted``: how ``trial_exited`` counted it; None when the method never saw it) and answer
        ``ContinueTrial``. Only single, grid and random searches can be continued, as in Determined."""
        return []


# ---------------------------------------------------------------------------------------------
# single
# ---------------------------------------------------------------------------------------------


class SingleSearch(SearchMethod, kw_only=True, tag="single"):
    """``searcher.name: single``: one trial, trained to ``max_length`` and never stopped early; done when it exits."""

    created: int = 0
    exited: int = 0

    def initial_trials(self, ctx: SearchContext) -> list[Decision]:
        """Create the one trial."""
        self.created = 1
        return [ctx.new_trial(0)]

    def trial_exited(self, ctx: SearchContext, request_id: int, kind: ExitKind) -> list[Decision]:
        """The one trial is over, whatever its end: so is the search."""
        self.exited += 1
        return [Shutdown(failure=kind == "errored")]

    def progress(self) -> float:
        """0 until the trial exits, then 1 (per-step progress comes from the trial itself)."""
        return 1.0 if self.exited else 0.0

    def trial_continued(self, ctx: SearchContext, request_id: int, counted: ExitKind | None) -> list[Decision]:
        """More training of the one trial, to the (possibly longer) length of the continued config; its
        hyperparameters are drawn again from that config (the same seed: unchanged values stay the same)."""
        if counted is not None:
            self.exited -= 1
        return [_continue(ctx.new_trial(request_id))]


# ---------------------------------------------------------------------------------------------
# random (Determined 0.38 random.go)
# ---------------------------------------------------------------------------------------------


class RandomSearch(SearchMethod, kw_only=True, tag="random"):
    """``searcher.name: random``: ``max_trials`` random trials, ``max_concurrent_trials`` at a time.

    ``max_concurrent_trials: 0`` starts them all at once. Each exit starts the next one while fewer than
    ``max_trials`` count against the budget; an invalid-hyperparameter trial does not count (it is
    replaced), as in Determined. No trial is stopped early.
    """

    max_trials: int
    max_concurrent_trials: int
    next_request_id: int = 0
    budget_used: int = 0  # Determined's CreatedTrials: created minus invalid-HP trials
    exited: int = 0
    errored: int = 0
    invalid: int = 0

    def initial_trials(self, ctx: SearchContext) -> list[Decision]:
        """``min(max_trials, max_concurrent_trials)`` trials, or ``max_trials`` when that is 0."""
        n = self.max_trials
        if self.max_concurrent_trials > 0:
            n = min(self.max_trials, self.max_concurrent_trials)
        return [self._create(ctx) for _ in range(n)]

    def trial_exited(self, ctx: SearchContext, request_id: int, kind: ExitKind) -> list[Decision]:
        """Start the next trial while the budget allows; shut down when the last one has exited."""
        self.exited += 1
        self.errored += kind == "errored"
        if kind == "invalid_hp":
            self.invalid += 1
            self.budget_used -= 1  # replaced, not counted against max_trials
        out: list[Decision] = []
        if self.budget_used < self.max_trials:
            out.append(self._create(ctx))
        return out + _shutdown_if_done(self.next_request_id, self.exited, self.errored)

    def progress(self) -> float:
        """The share of ``max_trials`` that have exited (invalid-HP trials do not count)."""
        return min(1.0, (self.exited - self.invalid) / self.max_trials)

    def trial_continued(self, ctx: SearchContext, request_id: int, counted: ExitKind | None) -> list[Decision]:
        """Rerun a trial that did not complete, with the same hyperparameters; its exit counts again later."""
        if counted is not None:
            self.exited -= 1
            self.errored -= counted == "errored"
        return [_continue(ctx.new_trial(request_id))]

    def _create(self, ctx: SearchContext) -> CreateTrial:
        request_id = self.next_request_id
        self.next_request_id += 1
        self.budget_used += 1
        return ctx.new_trial(request_id)


# ---------------------------------------------------------------------------------------------
# grid (Determined 0.38 grid.go)
# ---------------------------------------------------------------------------------------------


class GridSearch(SearchMethod, kw_only=True, tag="grid"):
    """``searcher.name: grid``: one trial per grid point, in grid order, each trained to ``max_length``.

    At most ``max_concurrent_trials`` run at once (0: all). Request id ``i`` is grid point ``i``. A trial
    that fails, invalid hyperparameters included, is not replaced: it was its point's only chance. No trial
    is stopped early.
    """

    points: int = 0  # how many points the grid has (fixed at the start)
    created: int = 0
    exited: int = 0
    errored: int = 0

    def initial_trials(self, ctx: SearchContext) -> list[Decision]:
        """The first ``max_concurrent_trials`` points (all of them when it is 0)."""
        self.points = len(ctx.grid_points)
        limit = ctx.config.searcher.max_concurrent_trials
        n = self.points if limit == 0 else min(limit, self.points)
        out: list[Decision] = [self._create(ctx) for _ in range(n)]
        return out or [Shutdown()]

    def trial_exited(self, ctx: SearchContext, request_id: int, kind: ExitKind) -> list[Decision]:
        """Start the next point, if any; shut down when the last one has exited."""
        self.exited += 1
        self.errored += kind == "errored"
        out: list[Decision] = []
        if self.created < self.points:
            out.append(self._create(ctx))
        return out + _shutdown_if_done(self.points, self.exited, self.errored)

    def progress(self) -> float:
        """The share of grid points whose trial has exited."""
        return self.exited / self.points if self.points else 0.0

    def trial_continued(self, ctx: SearchContext, request_id: int, counted: ExitKind | None) -> list[Decision]:
        """Rerun a grid point whose trial did not complete; its exit counts again later."""
        if counted is not None:
            self.exited -= 1
            self.errored -= counted == "errored"
        drawn = _continue(ctx.new_trial(request_id))
        return [msgspec.structs.replace(drawn, hparams=copy.deepcopy(ctx.grid_points[request_id]))]

    def _create(self, ctx: SearchContext) -> CreateTrial:
        index = self.created
        self.created += 1
        drawn = ctx.new_trial(index)  # the seed still comes from (experiment seed, request id)
        return msgspec.structs.replace(drawn, hparams=copy.deepcopy(ctx.grid_points[index]))


# ---------------------------------------------------------------------------------------------
# ASHA: rungs and brackets
# ---------------------------------------------------------------------------------------------

Spawn = Callable[[int], CreateTrial]
"""Creates a trial for the calling bracket: takes its ``max_length``, allocates the request id."""


class Rung(msgspec.Struct, kw_only=True):
    """One rung: the length it needs and its results, sorted best (smallest) first.

    ``metrics``, ``trials`` and ``promoted`` are parallel lists, so that the rules in
    :mod:`services.searcher.asha` work on plain ``list[float]``.
    """

    units: int
    metrics: list[float] = []
    trials: list[int] = []
    promoted: list[bool] = []
    outstanding: int = 0  # promotion-based only: trials training toward this rung

    def insert(self, index: int, request_id: int, metric: float, promoted: bool = False) -> None:
        """Put a result at ``index`` (the caller picked it with the rule it follows)."""
        self.metrics.insert(index, metric)
        self.trials.insert(index, request_id)
        self.promoted.insert(index, promoted)

    def remove(self, request_id: int) -> None:
        """Drop the trial's first result, if it has one (Determined removes one entry per rung)."""
        if request_id in self.trials:
            index = self.trials.index(request_id)
            del self.metrics[index], self.trials[index], self.promoted[index]


def _make_rungs(num_rungs: int, divisor: float, max_time: int) -> list[Rung]:
    return [Rung(units=u) for u in asha.rung_units(num_rungs, divisor, max_time)]


class StoppingBracket(msgspec.Struct, kw_only=True, tag="stopping"):
    """One bracket of stopping-based ASHA (Determined 0.38 ``asha_stopping.go``).

    Trials are created to train to ``max_time`` (the top rung); a trial that falls out of the top
    ``1/divisor`` of a rung it reaches is stopped, and a new one is created in its place while the
    bracket's ``max_trials`` (minus invalid-HP trials) allows.
    """

    divisor: float
    max_trials: int
    max_concurrent_trials: int
    rungs: list[Rung]
    trial_rungs: dict[int, int] = {}  # request id -> the rung it is in (or working toward)
    early_exit: dict[int, bool] = {}
    stopped: dict[int, bool] = {}  # Kiln: trials this bracket already stopped; see validation_reported
    trials_completed: int = 0
    invalid_trials: int = 0
    # Kiln, ``rung_metric: extrapolated``: a trial is ranked at a rung by its curve's score
    # (services/searcher/curves.py), from its validations since the rung below, kept here meanwhile.
    rung_metric: Literal["value", "extrapolated"] = "value"
    history: dict[int, list[tuple[int, float]]] = {}

    def initial_trials(self, ctx: SearchContext, spawn: Spawn) -> list[Decision]:
        """``min(max_concurrent, max_trials)``, or ``clamp(1, divisor^(r-1), max_trials)`` when 0."""
        n = asha.initial_trials(self.max_concurrent_trials, self.max_trials, self.divisor, len(self.rungs))
        return [self._create(spawn) for _ in range(n)]

    def validation_reported(
        self, ctx: SearchContext, spawn: Spawn, request_id: int, metric: float, time_value: int
    ) -> list[Decision]:
        """The stopping rule; a Stop also creates a replacement while below ``max_trials``."""
        # Kiln: a trial already told to stop may still validate on its way out (or re-report after a
        # restart). Determined would insert it into the same rung again and create one more trial; the
        # rung would then hold it twice, so its later validations are ignored instead.
        if request_id not in self.trial_rungs or request_id in self.stopped:
            return []
        if self.rung_metric == "extrapolated":
            self.history.setdefault(request_id, []).append((time_value, metric))
        out = self._stop_run(request_id, time_value, metric)
        if out and self._budget_left():
            out.append(self._create(spawn))
        return out

    def trial_exited(
        self, ctx: SearchContext, spawn: Spawn, request_id: int, kind: ExitKind
    ) -> list[Decision]:
        """Early exits count as the worst result in their rung; invalid HP is forgotten and replaced."""
        if request_id not in self.trial_rungs:
            return []
        self.trials_completed += 1
        self.history.pop(request_id, None)
        if kind == "invalid_hp":
            self.early_exit[request_id] = True
            self.invalid_trials += 1
            for rung in self.rungs[: self.trial_rungs[request_id] + 1]:
                rung.remove(request_id)
            return [self._create(spawn)]  # always: an invalid trial does not use the budget
        if kind in ("errored", "canceled"):
            self.early_exit[request_id] = True
            rung = self.rungs[self.trial_rungs[request_id]]
            index = asha.stopping_insert(rung.metrics, asha.EXITED_METRIC)
            rung.insert(index, request_id, asha.EXITED_METRIC)
            return [self._create(spawn)] if self._budget_left() else []
        return []

    def progress(self) -> float:
        """Rung 0's fill against ``1.2 * max_trials``, then the share of valid trials completed."""
        return asha.stopping_progress(
            len(self.rungs[0].metrics), self.max_trials, self.trials_completed, self.invalid_trials
        )

    def _stop_run(self, request_id: int, time_value: int, metric: float) -> list[Decision]:
        top = len(self.rungs) - 1
        # One validation can pass several rungs: walk up from the trial's rung until it falls short.
        for k in range(self.trial_rungs[request_id], top + 1):
            rung = self.rungs[k]
            self.trial_rungs[request_id] = k
            if time_value < rung.units:
                return []
            value = metric
            if self.rung_metric == "extrapolated":
                below = self.rungs[k - 1].units if k > 0 else 0
                window = [p for p in self.history.get(request_id, []) if p[0] > below]
                value = curves.score(window or [(time_value, metric)], time_value, self.rungs[-1].units)
            index = asha.stopping_insert(rung.metrics, value)
            rung.insert(index, request_id, value)
            if k == top or index >= asha.keep_count(len(rung.metrics), self.divisor):
                self.stopped[request_id] = True
                self.history.pop(request_id, None)
                return [StopTrial(request_id=request_id)]
            if self.rung_metric == "extrapolated":
                self.history[request_id] = [p for p in self.history.get(request_id, []) if p[0] > rung.units]
        return []

    def _budget_left(self) -> bool:
        return len(self.trial_rungs) - self.invalid_trials < self.max_trials

    def _create(self, spawn: Spawn) -> CreateTrial:
        created = spawn(self.rungs[-1].units)  # a surviving trial trains to max_time
        self.trial_rungs[created.request_id] = 0
        return created


class PromotionBracket(msgspec.Struct, kw_only=True, tag="promotion"):
    """One bracket of promotion-based ASHA (Determined's legacy ``asha.go``), with pause and resume.

    New trials train to rung 0's length, validate and pause. When a rung's result arrives, the rule in
    :func:`services.searcher.asha.promotion` may promote a trial, which resumes from its checkpoint and
    trains to the next rung's length. Once rung 0 holds ``max_trials`` results, every unpromoted trial
    in the bottom rungs that have no trial still training toward them is closed (``StopTrial``).
    """

    divisor: float
    max_trials: int
    max_concurrent_trials: int
    rungs: list[Rung]
    trial_rungs: dict[int, int] = {}
    # Kiln: trials with outstanding work, i.e. training toward the length of their rung (Determined's
    # pending ValidateAfter operation). Only such a trial's validation at that length is a rung result.
    training: dict[int, bool] = {}
    early_exit: dict[int, bool] = {}
    closed: dict[int, bool] = {}
    trials_completed: int = 0
    invalid_trials: int = 0
    # Kiln's options (docs/search-methods.md): ``promotion: pending_aware`` promotes only the results that
    # stay in their rung's top 1/divisor whatever the trials still training toward it report;
    # ``rung_metric: extrapolated`` ranks by the curve's score, from the validations kept in ``history``.
    rule: Literal["asha", "pending_aware"] = "asha"
    rung_metric: Literal["value", "extrapolated"] = "value"
    history: dict[int, list[tuple[int, float]]] = {}

    def initial_trials(self, ctx: SearchContext, spawn: Spawn) -> list[Decision]:
        """The same initial count as the stopping version."""
        n = asha.initial_trials(self.max_concurrent_trials, self.max_trials, self.divisor, len(self.rungs))
        return [self._create(spawn) for _ in range(n)]

    def validation_reported(
        self, ctx: SearchContext, spawn: Spawn, request_id: int, metric: float, time_value: int
    ) -> list[Decision]:
        """A trial's result for the rung it was training toward; earlier validations are ignored."""
        if not self.training.get(request_id):
            return []
        k = self.trial_rungs[request_id]
        if self.rung_metric == "extrapolated":
            self.history.setdefault(request_id, []).append((time_value, metric))
        if time_value < self.rungs[k].units:
            return []
        del self.training[request_id]
        if self.rung_metric == "extrapolated":
            below = self.rungs[k - 1].units if k > 0 else 0
            window = [p for p in self.history.pop(request_id, []) if p[0] > below]
            metric = curves.score(window or [(time_value, metric)], time_value, self.rungs[-1].units)
        return self._promote(spawn, request_id, metric)

    def trial_exited(
        self, ctx: SearchContext, spawn: Spawn, request_id: int, kind: ExitKind
    ) -> list[Decision]:
        """Invalid HP: forget and replace. A trial that ends while training: the worst result."""
        if request_id not in self.trial_rungs:
            return []
        self.trials_completed += 1
        self.history.pop(request_id, None)
        was_training = self.training.pop(request_id, False)
        rung_index = self.trial_rungs[request_id]
        if kind == "invalid_hp":
            self.early_exit[request_id] = True
            self.closed[request_id] = True
            self.invalid_trials += 1
            if was_training:
                self.rungs[rung_index].outstanding -= 1
            for rung in self.rungs[: rung_index + 1]:
                rung.remove(request_id)
            return [self._create(spawn)]
        if self.closed.get(request_id):
            return []  # finished the top rung, or closed by this bracket: the expected end
        self.early_exit[request_id] = True
        self.closed[request_id] = True
        if not was_training:
            return []  # ended while paused: its result is already in its rung
        # Errored, canceled, or exited before reaching its rung's length: the worst possible result.
        return self._promote(spawn, request_id, asha.EXITED_METRIC)

    def progress(self) -> float:
        """The same formula as the stopping version."""
        return asha.stopping_progress(
            len(self.rungs[0].metrics), self.max_trials, self.trials_completed, self.invalid_trials
        )

    def _promote(self, spawn: Spawn, request_id: int, metric: float) -> list[Decision]:
        """Determined's ``promoteAsync``: record the result, promote at most one trial, create, close."""
        k = self.trial_rungs[request_id]
        rung = self.rungs[k]
        rung.outstanding -= 1
        out: list[Decision] = []
        resumed = False
        if k == len(self.rungs) - 1:
            rung.insert(len(rung.metrics), request_id, metric)  # the top rung is not ranked
            if not self.early_exit.get(request_id):
                # Trained to max_time: it exits by itself, so there is nothing to stop.
                self.closed[request_id] = True
        elif self.rule == "pending_aware":
            index = asha.promotion(rung.metrics, rung.promoted, metric, self.divisor).insert_index
            rung.insert(index, request_id, metric)
            for winner in self._pending_aware_promotions(rung):
                upper = self.rungs[k + 1]
                self.trial_rungs[winner] = k + 1
                upper.outstanding += 1
                resumed = True
                if self.early_exit.get(winner):
                    out.extend(self._promote(spawn, winner, asha.EXITED_METRIC))
                else:
                    self.training[winner] = True
                    out.append(ResumeTrial(request_id=winner, max_length=upper.units))
        else:
            decision = asha.promotion(rung.metrics, rung.promoted, metric, self.divisor)
            rung.insert(decision.insert_index, request_id, metric, promoted=decision.promote_new)
            promoted_id: int | None = None
            if decision.promote_new:
                promoted_id = request_id
            elif decision.promote_index is not None:
                rung.promoted[decision.promote_index] = True
                promoted_id = rung.trials[decision.promote_index]
            if promoted_id is not None:
                upper = self.rungs[k + 1]
                self.trial_rungs[promoted_id] = k + 1
                upper.outstanding += 1
                if self.early_exit.get(promoted_id):
                    # As if it had trained on and reported the worst possible result.
                    return self._promote(spawn, promoted_id, asha.EXITED_METRIC)
                self.training[promoted_id] = True
                out.append(ResumeTrial(request_id=promoted_id, max_length=upper.units))
                resumed = True
        if not resumed and len(self.trial_rungs) - self.invalid_trials < self.max_trials:
            out.append(self._create(spawn))
        if len(self.rungs[0].metrics) == self.max_trials:
            out.extend(self._close_out())
        return out

    def _pending_aware_promotions(self, rung: Rung) -> list[int]:
        """Mark and return every unpromoted result of ``rung`` that is sure to stay in its top 1/divisor.

        With ``n`` results in the rung and ``p`` trials still training toward it, the result at index
        ``i`` stays in the top ``floor((n + p) / divisor)`` even if all ``p`` land ahead of it when
        ``i + p < floor((n + p) / divisor)`` (:func:`services.searcher.asha.pending_aware_limit`). With no
        trial pending this is ASHA's own rule: promote the top ``floor(n / divisor)``.
        """
        limit = asha.pending_aware_limit(len(rung.metrics), rung.outstanding, self.divisor)
        promoted: list[int] = []
        for i in range(min(limit, len(rung.metrics))):
            if not rung.promoted[i]:
                rung.promoted[i] = True
                promoted.append(rung.trials[i])
        return promoted

    def _close_out(self) -> list[Decision]:
        """Close every unpromoted trial of the bottom rungs that have nothing still training toward them."""
        out: list[Decision] = []
        for rung in self.rungs:
            if rung.outstanding > 0:
                break
            for request_id, promoted in zip(rung.trials, rung.promoted, strict=True):
                if not promoted and not self.closed.get(request_id) and not self.early_exit.get(request_id):
                    self.closed[request_id] = True
                    out.append(StopTrial(request_id=request_id))
        return out

    def _create(self, spawn: Spawn) -> CreateTrial:
        created = spawn(self.rungs[0].units)  # train to rung 0, validate, pause
        self.trial_rungs[created.request_id] = 0
        self.rungs[0].outstanding += 1
        self.training[created.request_id] = True
        return created


class ASHASearch(SearchMethod, kw_only=True, tag="asha"):
    """``adaptive_asha`` and ``async_halving``: a tournament of ASHA brackets (``tournament.go``).

    Each trial's events go to the bracket that created it. ``async_halving`` is the one-bracket case.
    Progress is the mean of the brackets' progress.
    """

    brackets: list[StoppingBracket | PromotionBracket]
    trial_table: dict[int, int] = {}  # request id -> bracket index
    next_request_id: int = 0
    exited: int = 0
    errored: int = 0
    sampler: DensitySampler | None = None  # ``sampler: tpe``; None: every trial drawn at random

    def initial_trials(self, ctx: SearchContext) -> list[Decision]:
        """Every bracket's initial trials, the most early-stopping bracket first."""
        out: list[Decision] = []
        for index, bracket in enumerate(self.brackets):
            out.extend(bracket.initial_trials(ctx, self._spawner(ctx, index)))
        return out

    def validation_reported(
        self, ctx: SearchContext, request_id: int, metric: float, time_value: int
    ) -> list[Decision]:
        """Route the (sign-adjusted) metric to the trial's bracket."""
        index = self.trial_table.get(request_id)
        if index is None:
            return []
        spawn = self._spawner(ctx, index)
        return self.brackets[index].validation_reported(
            ctx, spawn, request_id, ctx.searcher_value(metric), time_value
        )

    def trial_exited(self, ctx: SearchContext, request_id: int, kind: ExitKind) -> list[Decision]:
        """Route the exit to the trial's bracket; shut down once every created trial has exited."""
        index = self.trial_table.get(request_id)
        if index is None:
            return []
        self.exited += 1
        self.errored += kind == "errored"
        out = self.brackets[index].trial_exited(ctx, self._spawner(ctx, index), request_id, kind)
        return out + _shutdown_if_done(len(self.trial_table), self.exited, self.errored)

    def progress(self) -> float:
        """The mean of the brackets' progress, within [0, 1]."""
        mean = sum(b.progress() for b in self.brackets) / len(self.brackets)
        return min(max(mean, 0.0), 1.0)

    def _spawner(self, ctx: SearchContext, index: int) -> Spawn:
        def spawn(max_length: int) -> CreateTrial:
            request_id = self.next_request_id
            self.next_request_id += 1
            self.trial_table[request_id] = index
            if self.sampler is not None:
                created = self.sampler.new_trial(ctx, request_id, self.brackets)
            else:
                created = ctx.new_trial(request_id)
            return msgspec.structs.replace(created, max_length=max_length)

        return spawn


class DensitySampler(msgspec.Struct, kw_only=True, tag="tpe"):
    """``sampler: tpe``: BOHB's density models over the rungs' results (``services/searcher/tpe.py``).

    Each new trial is drawn at random with probability ``tpe.random_fraction`` (and whenever no rung has
    enough results for two densities); otherwise from the densities built on the highest rung, over all
    brackets, that has enough results. Rungs of different brackets with the same length are one budget.
    Its random numbers come from (experiment seed, request id), so a replay draws the same points; its
    state is the unit-cube point of every trial it drew.
    """

    points: dict[int, list[float]] = {}  # request id -> the trial's point on the unit cube
    model_units: dict[int, int] = {}  # request id -> the rung length whose densities drew it (absent: random)

    def new_trial(
        self, ctx: SearchContext, request_id: int, brackets: list[StoppingBracket | PromotionBracket]
    ) -> CreateTrial:
        """Trial ``request_id``: a random draw, or the densities' best candidate; the same every replay."""
        drawn = ctx.new_trial(request_id)  # the trial's seed, constants and the random fallback
        space = ctx.space
        if space.size == 0:
            return drawn
        options = ctx.config.searcher.tpe
        rng = np.random.default_rng([ctx.seed % 2**63, request_id])
        if rng.random() >= options.random_fraction:
            for units, ids, losses in self._budgets(brackets, options.lower_rungs == "bad"):
                vectors = np.array([self.points[i] for i in ids], dtype=np.float64)
                point = tpe.propose(vectors, np.array(losses, dtype=np.float64), space, options, rng)
                if point is not None:
                    self.points[request_id] = point
                    self.model_units[request_id] = units
                    return msgspec.structs.replace(drawn, hparams=space.decode(point, drawn.hparams))
        self.points[request_id] = space.encode(drawn.hparams)
        return drawn

    def _budgets(
        self, brackets: list[StoppingBracket | PromotionBracket], lower_as_bad: bool
    ) -> list[tuple[int, list[int], list[float]]]:
        """The rungs' results by length, longest first: (length, request ids, results).

        With ``lower_as_bad`` a rung's list also holds, with result ``+inf``, every trial whose furthest
        result is at a shorter length (the densities then learn where trials fail early, too) and every
        trial with no result yet.
        """
        by_units: dict[int, dict[int, float]] = {}
        furthest: dict[int, int] = {}
        for bracket in brackets:
            for rung in bracket.rungs:
                results = by_units.setdefault(rung.units, {})
                for request_id, metric in zip(rung.trials, rung.metrics, strict=True):
                    if request_id in self.points:
                        results[request_id] = metric
                        furthest[request_id] = max(furthest.get(request_id, 0), rung.units)
        # Trials with no result yet (in flight toward their first rung) are bad everywhere too: the
        # "constant liar" of parallel model-based search, so that W workers do not get W copies of one draw.
        in_flight = [request_id for request_id in sorted(self.points) if request_id not in furthest]
        out: list[tuple[int, list[int], list[float]]] = []
        for units in sorted(by_units, reverse=True):
            results = dict(by_units[units])
            if lower_as_bad:
                for request_id in sorted(furthest):
                    if furthest[request_id] < units:
                        results[request_id] = math.inf
                for request_id in in_flight:
                    results[request_id] = math.inf
            out.append((units, list(results), list(results.values())))
        return out


def _asha_search(config: ExperimentConfig) -> ASHASearch:
    """The brackets ``adaptive_asha`` (docs/asha.md, "Planning") or ``async_halving`` (one bracket) asks for."""
    searcher = config.searcher
    max_time = config.full_length
    if max_time is None or searcher.max_trials is None:
        raise ValueError(f"searcher {searcher.name!r} needs max_trials and max_time (or legacy max_length)")
    if searcher.name == "adaptive_asha":
        plan = asha.make_brackets(
            max_time=max_time,
            max_trials=searcher.max_trials,
            divisor=searcher.divisor,
            max_rungs=searcher.max_rungs,
            mode=searcher.mode,
            max_concurrent_trials=searcher.max_concurrent_trials,
            bracket_rungs=searcher.bracket_rungs,
        )
    else:
        rungs = searcher.num_rungs if searcher.num_rungs is not None else searcher.max_rungs
        plan = [
            asha.Bracket(
                num_rungs=rungs,
                max_trials=searcher.max_trials,
                max_concurrent_trials=searcher.max_concurrent_trials,
            )
        ]
    brackets: list[StoppingBracket | PromotionBracket] = []
    for b in plan:
        bracket_rungs = _make_rungs(b.num_rungs, searcher.divisor, max_time)
        if searcher.stop_once:
            brackets.append(StoppingBracket(
                divisor=searcher.divisor, max_trials=b.max_trials, max_concurrent_trials=b.max_concurrent_trials,
                rungs=bracket_rungs, rung_metric=searcher.rung_metric,
            ))
        else:
            brackets.append(PromotionBracket(
                divisor=searcher.divisor, max_trials=b.max_trials, max_concurrent_trials=b.max_concurrent_trials,
                rungs=bracket_rungs, rule=searcher.promotion, rung_metric=searcher.rung_metric,
            ))
    sampler = DensitySampler() if searcher.sampler == "tpe" else None
    return ASHASearch(brackets=brackets, sampler=sampler)


# The closed set of method states, tagged so a snapshot decodes back to the right one.
MethodState = SingleSearch | RandomSearch | GridSearch | ASHASearch


def new_method(config: ExperimentConfig) -> MethodState:
    """The initial state of the method the config names."""
    match config.searcher.name:
        case "single":
            return SingleSearch()
        case "random":
            if config.searcher.max_trials is None:
                raise ValueError("searcher 'random' needs max_trials")
            return RandomSearch(
                max_trials=config.searcher.max_trials,
                max_concurrent_trials=config.searcher.max_concurrent_trials,
            )
        case "grid":
            return GridSearch()
        case "adaptive_asha" | "async_halving":
            return _asha_search(config)
        case other:
            raise ValueError(f"searcher.name: {other!r} is not implemented")
