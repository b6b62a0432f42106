"""The searcher's pure core: domain events in, domain events out, state that snapshots to bytes.

``SearcherCore.handle(event)`` is deterministic: replaying the same events from the same snapshot gives
the same decisions with the same trial ids, so a restarted searcher republishes byte-identical events
(which JetStream's dedupe window drops) instead of new ones.
"""

from __future__ import annotations

import math
from typing import Any, Literal, assert_never

import msgspec

from schemas import events as ev
from schemas.config import ConfigError, ExperimentConfig, config_from_wire
from schemas.retention import CheckpointFact, RetentionPolicy, to_collect
from schemas.trial import INVALID_HP_EXIT_CODE
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
from services.searcher.preview import preview


class TrialEntry(msgspec.Struct, kw_only=True):
    """A trial as the searcher knows it."""

    trial_id: int
    request_id: int
    exited: bool = False
    state: str = ""
    # The furthest validation seen: a restarted trial re-reporting a step must not count twice.
    validated_steps: int = -1
    # How the method counted its exit (an ExitKind); "" when it did not see it (the experiment was being killed).
    counted: str = ""
    # Its runs declared lost (AllocationLost): their late validations are fenced, never decided on.
    lost_allocations: list[str] = []


class StoredCheckpoint(msgspec.Struct, kw_only=True):
    """A checkpoint as retention knows it (from CheckpointStored)."""

    uuid: str
    trial_id: int
    steps_completed: int
    storage: str
    order: int


class Retention(msgspec.Struct, kw_only=True):
    """An experiment's checkpoints, their validations and its retention policy (services on ``schemas.retention``)."""

    policy: RetentionPolicy | None = None  # None: the config's checkpoint_storage (read when first needed)
    checkpoints: dict[str, StoredCheckpoint] = {}  # live ones: neither requested for collection nor deleted
    # trial id -> steps -> the searcher metric of the validation at that step
    metrics: dict[int, dict[int, float]] = {}
    next_order: int = 0
    # Hook for the model registry: checkpoints registered as model versions are never collected.
    protected: set[str] = set()


class RegisteredVersion(msgspec.Struct, kw_only=True):
    """A model version as retention needs it: the checkpoint it takes out of its experiment's collection."""

    model_id: int
    version: int
    experiment_id: int
    checkpoint_uuid: str


class ExperimentSearch(msgspec.Struct, kw_only=True):
    """One experiment's search: its method state and its trials."""

    experiment_id: int
    config: dict[str, Any]  # as ExperimentSubmitted carries it; read through schemas.config.config_from_wire
    seed: int
    method: MethodState
    trials: dict[int, TrialEntry] = {}  # by request id
    request_of: dict[int, int] = {}  # trial id -> request id
    next_request_id: int = 0
    shutdown: bool = False
    canceled: bool = False
    ended: bool = False
    retention: Retention = msgspec.field(default_factory=Retention)
    continuations: int = 0  # ExperimentContinued applied so far: numbers the ends and reruns that follow


class SearcherState(msgspec.Struct, kw_only=True):
    """Everything the searcher service knows; serialised whole into its snapshot."""

    experiments: dict[int, ExperimentSearch] = {}
    next_trial_id: int = 1
    # The model registry, as far as retention cares: live models (id -> the highest version number they ever had),
    # their names (a name is one live model's), and their versions ("<model>:<version>" -> what it names). The
    # tracker's projection keeps registrations by the same rules (a live model, a version number above every
    # earlier one), so what the read model shows registered is exactly what is never collected.
    models: dict[int, int] = {}
    model_names: dict[str, int] = {}
    registered: dict[str, RegisteredVersion] = {}


_SNAPSHOT_ENCODER = msgspec.msgpack.Encoder()
_SNAPSHOT_DECODER = msgspec.msgpack.Decoder(SearcherState)


def _planned_trials(config: dict[str, Any]) -> int:
    """How many trials the search plans in all: what experiment progress is measured against."""
    try:
        return preview(config_from_wire(config)).trials
    except (ConfigError, ValueError):
        return 0


class SearcherCore:
    """Folds domain events into search state and answers with the events it decides."""

    def __init__(self, state: SearcherState | None = None) -> None:
        self.state = state or SearcherState()
        self._contexts: dict[int, SearchContext] = {}  # rebuilt from state; never serialised

    def snapshot(self) -> bytes:
        """The whole state as bytes."""
        return _SNAPSHOT_ENCODER.encode(self.state)

    @classmethod
    def restore(cls, data: bytes) -> SearcherCore:
        """A core from a snapshot."""
        return cls(_SNAPSHOT_DECODER.decode(data))

    def handle(self, event: ev.DomainEvent) -> list[ev.DomainEvent]:
        """Apply one domain event; return the events the searcher decides because of it."""
        match event:
            case ev.ExperimentSubmitted():
                return self._submitted(event)
            case ev.TrialCreated():
                return self._created(event)
            case ev.ValidationReported():
                return self._validation(event)
            case ev.TrialExited():
                return self._exited(event)
            case ev.ExperimentKillRequested():
                return self._kill(event)
            case ev.ExperimentEnded():
                exp = self.state.experiments.get(event.experiment_id)
                if exp is None:
                    return []
                exp.ended = True
                return self._collect(exp, "experiment ended")
            case ev.CheckpointStored():
                return self._checkpoint(event)
            case ev.AllocationLost():
                self._fence(event)
                return []
            case ev.CheckpointGCPolicyChanged():
                return self._gc_policy(event)
            case ev.CheckpointsDeleted():
                exp = self.state.experiments.get(event.experiment_id)
                if exp is not None:
                    for uuid in event.uuids:
                        exp.retention.checkpoints.pop(uuid, None)
                return []
            case ev.ModelCreated() | ev.ModelVersionRegistered() | ev.ModelVersionDeleted() | ev.ModelDeleted():
                self._registry(event)
                return []  # protection changes no decision now: a checkpoint unregistered waits for the next one
            case ev.ExperimentContinued():
                return self._continued(event)
            case _:
                return []  # facts the searcher does not decide on

    # -- event handlers -----------------------------------------------------------------------

    def _submitted(self, event: ev.ExperimentSubmitted) -> list[ev.DomainEvent]:
        if event.experiment_id in self.state.experiments:
            return []  # redelivered
        try:
            config = config_from_wire(event.config)
            method = new_method(config)
        except (ConfigError, ValueError) as exc:
            # The gateway validated the config, so this is a version skew: end it loudly.
            return [ev.ExperimentEnded(experiment_id=event.experiment_id, state="ERROR", reason=str(exc))]
        exp = ExperimentSearch(
            experiment_id=event.experiment_id, config=event.config, seed=event.seed, method=method
        )
        self.state.experiments[event.experiment_id] = exp
        return self._apply(exp, method.initial_trials(self._context(exp, config)))

    def _created(self, event: ev.TrialCreated) -> list[ev.DomainEvent]:
        exp = self.state.experiments.get(event.experiment_id)
        if exp is None or event.trial_id in exp.request_of:
            return []  # our own decision coming back through the stream
        self._register(exp, event.trial_id, event.request_id)
        return self._apply(exp, exp.method.trial_created(self._context(exp), event.request_id))

    def _fence(self, event: ev.AllocationLost) -> None:
        exp = self.state.experiments.get(event.experiment_id)
        if exp is None or event.trial_id not in exp.request_of:
            return
        entry = exp.trials[exp.request_of[event.trial_id]]
        if event.allocation_id not in entry.lost_allocations:
            entry.lost_allocations.append(event.allocation_id)

    def _validation(self, event: ev.ValidationReported) -> list[ev.DomainEvent]:
        exp = self.state.experiments.get(event.experiment_id)
        if exp is None or event.trial_id not in exp.request_of:
            return []
        if event.allocation_id and event.allocation_id in exp.trials[exp.request_of[event.trial_id]].lost_allocations:
            return []  # fenced: a run declared lost reported it after it was restarted elsewhere
        ctx = self._context(exp)
        searcher = ctx.config.searcher
        value = event.metrics.get(searcher.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return []  # the trial did not report the searcher metric: nothing to decide on
        # Retention rates the checkpoint at this step by it (whenever the checkpoint comes).
        exp.retention.metrics.setdefault(event.trial_id, {})[event.steps_completed] = float(value)
        if exp.ended:
            return []
        time_value = _time_value(ctx.config, event)
        request_id = exp.request_of[event.trial_id]
        entry = exp.trials[request_id]
        if event.steps_completed <= entry.validated_steps:
            return []
        entry.validated_steps = event.steps_completed
        return self._apply(exp, exp.method.validation_reported(ctx, request_id, float(value), time_value))

    def _exited(self, event: ev.TrialExited) -> list[ev.DomainEvent]:
        exp = self.state.experiments.get(event.experiment_id)
        if exp is None or event.trial_id not in exp.request_of:
            return []
        entry = exp.trials[exp.request_of[event.trial_id]]
        if entry.exited:
            return []
        entry.exited = True
        entry.state = event.state
        decisions: list[Decision] = []
        if not exp.canceled:
            kind = _exit_kind(event)
            entry.counted = kind
            decisions = exp.method.trial_exited(self._context(exp), entry.request_id, kind)
        return self._apply(exp, decisions) + self._collect(exp, f"trial {event.trial_id} exited")

    def _kill(self, event: ev.ExperimentKillRequested) -> list[ev.DomainEvent]:
        exp = self.state.experiments.get(event.experiment_id)
        if exp is None or exp.ended:
            return []
        exp.canceled = True
        exp.shutdown = True
        return self._maybe_end(exp)

    def _continued(self, event: ev.ExperimentContinued) -> list[ev.DomainEvent]:
        """Reopen an ended search for the trials a user continued: each is asked to train again
        (``TrialContinueRequested``); the experiment ends again once they have exited. An experiment that has
        not ended (a second continue sent in a race) is left alone, as the scheduler and tracker leave it."""
        exp = self.state.experiments.get(event.experiment_id)
        if exp is None or not exp.ended:
            return []
        try:
            config = config_from_wire(event.config)
        except ConfigError:
            return []  # the gateway validated it: a config this version cannot read changes nothing
        entries = [exp.trials[exp.request_of[t]] for t in event.trial_ids if t in exp.request_of]
        entries = [e for e in entries if e.exited]
        if not entries:
            return []
        exp.config = event.config
        self._contexts.pop(exp.experiment_id, None)
        ctx = self._context(exp, config)
        exp.ended = exp.shutdown = exp.canceled = False
        exp.continuations += 1
        decisions: list[Decision] = []
        for entry in entries:
            counted: Any = entry.counted or None
            entry.exited, entry.state, entry.counted = False, "", ""
            decisions += exp.method.trial_continued(ctx, entry.request_id, counted)
        return self._apply(exp, decisions)

    def _checkpoint(self, event: ev.CheckpointStored) -> list[ev.DomainEvent]:
        exp = self.state.experiments.get(event.experiment_id)
        if exp is None or event.trial_id not in exp.request_of:
            return []
        r = exp.retention
        if event.uuid not in r.checkpoints:
            r.checkpoints[event.uuid] = StoredCheckpoint(uuid=event.uuid, trial_id=event.trial_id,
                                                         steps_completed=event.steps_completed,
                                                         storage=event.storage, order=r.next_order)
            r.next_order += 1
        entry = exp.trials[exp.request_of[event.trial_id]]
        # A checkpoint reported after its trial exited (a late outbox flush) is judged now.
        return self._collect(exp, f"trial {event.trial_id} exited") if entry.exited else []

    def _gc_policy(self, event: ev.CheckpointGCPolicyChanged) -> list[ev.DomainEvent]:
        exp = self.state.experiments.get(event.experiment_id)
        if exp is None:
            return []
        exp.retention.policy = self._policy(exp).changed(event.save_experiment_best, event.save_trial_best,
                                                         event.save_trial_latest)
        return self._collect(exp, "gc policy changed")

    # -- the model registry: registered checkpoints are protected from retention --------------------

    def _registry(self, event: ev.ModelCreated | ev.ModelVersionRegistered | ev.ModelVersionDeleted
                  | ev.ModelDeleted) -> None:
        state = self.state
        touched: set[int] = set()  # experiments whose protected checkpoints change
        match event:
            case ev.ModelCreated():
                if event.model_id in state.models or event.name in state.model_names:
                    return  # redelivered, or the name is a live model's: the first one keeps it
                state.models[event.model_id] = 0
                state.model_names[event.name] = event.model_id
            case ev.ModelVersionRegistered():
                last = state.models.get(event.model_id)
                if last is None or event.version <= last:
                    return  # a deleted model, or a version number taken already: the projection ignores it too
                state.models[event.model_id] = event.version
                state.registered[f"{event.model_id}:{event.version}"] = RegisteredVersion(
                    model_id=event.model_id, version=event.version, experiment_id=event.experiment_id,
                    checkpoint_uuid=event.checkpoint_uuid)
                touched.add(event.experiment_id)
            case ev.ModelVersionDeleted():
                gone = state.registered.pop(f"{event.model_id}:{event.version}", None)
                if gone is not None:
                    touched.add(gone.experiment_id)
            case ev.ModelDeleted():
                state.models.pop(event.model_id, None)
                for name, model_id in list(state.model_names.items()):
                    if model_id == event.model_id:
                        del state.model_names[name]
                for key, version in list(state.registered.items()):
                    if version.model_id == event.model_id:
                        del state.registered[key]
                        touched.add(version.experiment_id)
            case _:
                assert_never(event)
        for experiment_id in touched:
            exp = state.experiments.get(experiment_id)
            if exp is not None:
                exp.retention.protected = {v.checkpoint_uuid for v in state.registered.values()
                                           if v.experiment_id == experiment_id}

    # -- retention ----------------------------------------------------------------------------

    def _policy(self, exp: ExperimentSearch) -> RetentionPolicy:
        """The experiment's retention policy: as last changed, else its config's ``checkpoint_storage``."""
        if exp.retention.policy is not None:
            return exp.retention.policy
        storage = self._context(exp).config.checkpoint_storage
        if storage is None:
            return RetentionPolicy()
        return RetentionPolicy(save_experiment_best=storage.save_experiment_best,
                               save_trial_best=storage.save_trial_best, save_trial_latest=storage.save_trial_latest)

    def _collect(self, exp: ExperimentSearch, reason: str) -> list[ev.DomainEvent]:
        """Ask for the checkpoints retention no longer keeps (of finished trials) to be collected.

        Requested ones leave the live set at once: a decision is made once, and replaying the same events
        from the same snapshot makes the same request (same dedupe key), which JetStream drops.
        """
        r = exp.retention
        if not r.checkpoints:
            return []
        finished = {t.trial_id for t in exp.trials.values() if t.exited or exp.ended}
        facts = [CheckpointFact(uuid=c.uuid, trial_id=c.trial_id, steps_completed=c.steps_completed, order=c.order,
                                metric=r.metrics.get(c.trial_id, {}).get(c.steps_completed))
                 for c in r.checkpoints.values()]
        uuids = to_collect(facts, self._policy(exp), self._context(exp).config.searcher.smaller_is_better,
                           finished, r.protected)
        if not uuids:
            return []
        refs = [ev.CheckpointRef(uuid=u, trial_id=r.checkpoints[u].trial_id, storage=r.checkpoints[u].storage)
                for u in uuids]
        for u in uuids:
            del r.checkpoints[u]
        return [ev.CheckpointGCRequested(experiment_id=exp.experiment_id, checkpoints=refs, reason=reason)]

    # -- decisions -> events --------------------------------------------------------------------

    def _apply(self, exp: ExperimentSearch, decisions: list[Decision]) -> list[ev.DomainEvent]:
        """Turn method decisions into events: the one place they are handled, a match over the closed union."""
        out: list[ev.DomainEvent] = []
        for d in decisions:
            match d:
                case CreateTrial():
                    if exp.shutdown or exp.canceled:
                        continue
                    trial_id = self.state.next_trial_id
                    self._register(exp, trial_id, d.request_id)
                    out.append(
                        ev.TrialCreated(
                            experiment_id=exp.experiment_id,
                            trial_id=trial_id,
                            request_id=d.request_id,
                            hparams=d.hparams,
                            seed=d.seed,
                            max_length=d.max_length,
                            planned_trials=_planned_trials(exp.config),
                        )
                    )
                case StopTrial():
                    entry = exp.trials.get(d.request_id)
                    if entry is not None and not entry.exited:
                        out.append(ev.TrialStopRequested(experiment_id=exp.experiment_id, trial_id=entry.trial_id))
                case ResumeTrial():
                    entry = exp.trials.get(d.request_id)
                    if entry is not None and not entry.exited and not exp.canceled:
                        out.append(ev.TrialResumeRequested(experiment_id=exp.experiment_id, trial_id=entry.trial_id,
                                                           max_length=d.max_length))
                case ContinueTrial():
                    entry = exp.trials.get(d.request_id)
                    if entry is not None and not entry.exited:
                        out.append(ev.TrialContinueRequested(
                            experiment_id=exp.experiment_id, trial_id=entry.trial_id, hparams=d.hparams,
                            max_length=d.max_length, continuation=exp.continuations))
                case Shutdown():
                    exp.shutdown = True
                case _:
                    assert_never(d)
        return out + self._maybe_end(exp)

    def _maybe_end(self, exp: ExperimentSearch) -> list[ev.DomainEvent]:
        """End the experiment once the search is over and every trial has exited."""
        if exp.ended or not exp.shutdown or any(not t.exited for t in exp.trials.values()):
            return []
        exp.ended = True
        state: Literal["COMPLETED", "ERROR", "CANCELED"]
        if exp.canceled:
            state, reason = "CANCELED", "killed by user"
        elif exp.trials and all(t.state == "ERROR" for t in exp.trials.values()):
            state, reason = "ERROR", "every trial errored"
        else:
            state, reason = "COMPLETED", ""
        return [ev.ExperimentEnded(experiment_id=exp.experiment_id, state=state, reason=reason,
                                   continuation=exp.continuations)]

    def _register(self, exp: ExperimentSearch, trial_id: int, request_id: int) -> None:
        exp.trials[request_id] = TrialEntry(trial_id=trial_id, request_id=request_id)
        exp.request_of[trial_id] = request_id
        exp.next_request_id = max(exp.next_request_id, request_id + 1)
        self.state.next_trial_id = max(self.state.next_trial_id, trial_id + 1)

    def _context(self, exp: ExperimentSearch, config: ExperimentConfig | None = None) -> SearchContext:
        ctx = self._contexts.get(exp.experiment_id)
        if ctx is None:
            if config is None:
                config = config_from_wire(exp.config)
            ctx = SearchContext(config, exp.seed)
            self._contexts[exp.experiment_id] = ctx
        return ctx


def _exit_kind(event: ev.TrialExited) -> ExitKind:
    """How the method should count an exit."""
    if event.state == "CANCELED":
        return "canceled"
    if event.exit_code == INVALID_HP_EXIT_CODE:
        return "invalid_hp"
    if event.state == "ERROR":
        return "errored"
    return "completed"


def _time_value(config: ExperimentConfig, event: ev.ValidationReported) -> int:
    """How far the trial is, in the searcher's units.

    ``time_metric`` names a reported metric. With the legacy ``max_length: {batches: N}`` it is
    ``steps_completed``; with ``{epochs: N}`` or ``{records: N}`` the trial reports ``epochs`` or
    ``records`` with its validation metrics (steps are batches, not epochs).
    """
    searcher = config.searcher
    name = searcher.time_metric
    if name is None and searcher.max_length is not None and not isinstance(searcher.max_length, int):
        name = None if searcher.max_length.unit == "batches" else searcher.max_length.unit
    raw = event.metrics.get(name) if name else None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return int(raw)
    return event.steps_completed
