"""Play a whole search in memory: a method against simulated trials. Pure, no I/O, deterministic.

The trials train one at a time, in the order they were created (or resumed). A trial reports a
validation every ``period`` units of the searcher's time metric, and at the length it was asked to
train to, with the value ``curve(request_id, time)``; it ends when the method stops it, when it reaches
the searcher's full length, or, given a :class:`Fault`, when it crashes. A trial that reaches a shorter
length (promotion-based ASHA) pauses until the method resumes or closes it, as Kiln's scheduler does;
one promoted by its own validation trains on at once. Exits reach the method right after the decisions
that caused them.

``kiln preview-search --simulate``, the benchmarks and the unit tests use it::

    records = simulate(config, seed=1, curve=lambda rid, t: 1.0 / (1 + t), period=10)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal, assert_never

import msgspec

from schemas.config import ExperimentConfig
from services.searcher.methods import (
    ContinueTrial,
    CreateTrial,
    Decision,
    ExitKind,
    MethodState,
    ResumeTrial,
    SearchContext,
    Shutdown,
    StopTrial,
    new_method,
)

Curve = Callable[[int, int], float]
"""``curve(request_id, time)``: the searcher metric a trial reports after ``time`` units."""

TrialStatus = Literal["queued", "running", "paused", "exited"]

_ENCODER = msgspec.msgpack.Encoder()
_DECODER: msgspec.msgpack.Decoder[MethodState] = msgspec.msgpack.Decoder(MethodState)


class Fault(msgspec.Struct, frozen=True, kw_only=True):
    """Make a trial end on its own at ``at`` units (before any validation at ``at``) with ``kind``."""

    kind: ExitKind
    at: int = 0


class TrialRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What happened to one simulated trial."""

    request_id: int
    hparams: dict[str, Any]
    seed: int
    lengths_trained: list[int]  # the lengths it was asked to train to: at creation, then each resume
    stop_length: int  # how far it trained, in units of the time metric
    stopped_early: bool  # it ended (or was left) short of the searcher's full length
    exit_kind: ExitKind | None  # None: never exited (still paused when the search ended)
    validations: list[tuple[int, float]]  # (time, raw metric) as reported


class _Trial:
    """A simulated trial's mutable state (the record is built from it at the end)."""

    def __init__(self, create: CreateTrial, full_length: int) -> None:
        self.create = create
        self.target = create.max_length if create.max_length is not None else full_length
        self.lengths = [self.target]
        self.progress = 0
        self.status: TrialStatus = "queued"
        self.stop_requested = False
        self.exit_kind: ExitKind | None = None
        self.validations: list[tuple[int, float]] = []


class Simulation:
    """A search in progress: the method, its context, the simulated trials and every decision made.

    ``round_trip=True`` encodes and decodes the method state with msgpack before every call, as a
    searcher restarted from its snapshot would: the decisions must not change.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        seed: int,
        curve: Curve,
        period: int,
        *,
        faults: Mapping[int, Fault] | None = None,
        round_trip: bool = False,
        max_calls: int = 1_000_000,
    ) -> None:
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.ctx = SearchContext(config, seed)
        self.full_length = self.ctx.full_length()
        self.method: MethodState = new_method(config)
        self.curve = curve
        self.period = period
        self.faults = dict(faults or {})
        self.round_trip = round_trip
        self.max_calls = max_calls
        self.calls = 0
        self.decisions: list[Decision] = []
        self.shutdown = False
        self.trials: dict[int, _Trial] = {}
        self._run_queue: deque[int] = deque()
        self._exits: deque[tuple[int, ExitKind]] = deque()
        self._draining = False

    def run(self) -> list[TrialRecord]:
        """Play the search until no trial can run any more; the records in creation order."""
        self._apply(self._call(lambda m: m.initial_trials(self.ctx)))
        while self._run_queue:
            request_id = self._run_queue.popleft()
            if self.trials[request_id].status == "queued":
                self._train(request_id)
        return self.records()

    def records(self) -> list[TrialRecord]:
        """Every trial so far, in creation order."""
        return [self._record(request_id, t) for request_id, t in self.trials.items()]

    def snapshot(self) -> bytes:
        """The method state as the searcher would snapshot it."""
        return _ENCODER.encode(self.method)

    # -- the trial loop -------------------------------------------------------------------------

    def _train(self, request_id: int) -> None:
        """Run one trial until it stops, pauses, crashes or reaches its target."""
        trial = self.trials[request_id]
        trial.status = "running"
        fault = self.faults.get(request_id)
        while True:
            if trial.stop_requested:
                self._exit(request_id, "completed")
                return
            step = min((trial.progress // self.period + 1) * self.period, trial.target)
            if fault is not None and fault.at <= step:
                trial.progress = max(trial.progress, fault.at)
                self._exit(request_id, fault.kind)
                return
            trial.progress = step
            metric = self.curve(request_id, step)
            trial.validations.append((step, metric))
            # _call runs the lambda at once: the loop variables cannot change under it.
            self._apply(self._call(lambda m: m.validation_reported(self.ctx, request_id, metric, step)))  # noqa: B023
            if trial.progress >= trial.target:
                if trial.stop_requested or trial.target >= self.full_length:
                    self._exit(request_id, "completed")
                else:
                    trial.status = "paused"  # Kiln keeps it, checkpointed, until resumed or closed
                return

    def _exit(self, request_id: int, kind: ExitKind) -> None:
        trial = self.trials[request_id]
        trial.status = "exited"
        trial.exit_kind = kind
        self._exits.append((request_id, kind))
        self._drain_exits()

    def _drain_exits(self) -> None:
        """Tell the method of every queued exit, oldest first. Exits its answers queue join the same loop (one
        drain at a time): closing hundreds of paused trials at once must not nest a call per exit."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._exits:
                request_id, kind = self._exits.popleft()
                self._apply(self._call(lambda m: m.trial_exited(self.ctx, request_id, kind)))  # noqa: B023 - run now
        finally:
            self._draining = False

    # -- decisions ------------------------------------------------------------------------------

    def _call(self, fn: Callable[[MethodState], list[Decision]]) -> list[Decision]:
        self.calls += 1
        if self.calls > self.max_calls:
            raise RuntimeError(f"the search did not end within {self.max_calls} method calls")
        if self.round_trip:
            self.method = _DECODER.decode(_ENCODER.encode(self.method))
        decisions = fn(self.method)
        self.decisions.extend(decisions)
        return decisions

    def _apply(self, decisions: list[Decision]) -> None:
        """What Kiln's searcher core and scheduler do with each decision, in memory."""
        for d in decisions:
            match d:
                case CreateTrial():
                    if self.shutdown or d.request_id in self.trials:
                        continue
                    self.trials[d.request_id] = _Trial(d, self.full_length)
                    self._run_queue.append(d.request_id)
                case StopTrial():
                    trial = self.trials.get(d.request_id)
                    if trial is None or trial.status == "exited":
                        continue
                    trial.stop_requested = True
                    if trial.status == "paused":
                        trial.status = "exited"  # closing a paused trial ends it at once
                        trial.exit_kind = "completed"
                        self._exits.append((d.request_id, "completed"))
                case ResumeTrial():
                    trial = self.trials.get(d.request_id)
                    if trial is None or trial.status == "exited" or trial.stop_requested:
                        continue
                    if d.max_length > trial.target:
                        trial.target = d.max_length
                        trial.lengths.append(d.max_length)
                    if trial.status == "paused":
                        trial.status = "queued"
                        self._run_queue.append(d.request_id)
                case ContinueTrial():
                    continue  # a user's continue of an ended experiment: no simulated search asks for one
                case Shutdown():
                    self.shutdown = True
                case _:
                    assert_never(d)
        self._drain_exits()

    def _record(self, request_id: int, trial: _Trial) -> TrialRecord:
        return TrialRecord(
            request_id=request_id,
            hparams=trial.create.hparams,
            seed=trial.create.seed,
            lengths_trained=list(trial.lengths),
            stop_length=trial.progress,
            stopped_early=trial.progress < self.full_length,
            exit_kind=trial.exit_kind,
            validations=list(trial.validations),
        )


def simulate(
    config: ExperimentConfig,
    seed: int,
    curve: Curve,
    period: int,
    *,
    faults: Mapping[int, Fault] | None = None,
) -> list[TrialRecord]:
    """Play the whole search ``config`` describes and return every trial's record, in creation order.

    ``curve(request_id, time)`` gives the metric a trial reports; it validates every ``period`` units
    of the time metric and at each length it is asked to reach. The config needs a searcher length
    (``max_time`` or legacy ``max_length``). Same arguments, same records.
    """
    return Simulation(config, seed, curve, period, faults=faults).run()
