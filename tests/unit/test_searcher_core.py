"""The searcher's pure core: domain events in, decided events out, state that snapshots to bytes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import msgspec
import pytest

from schemas import events as ev
from schemas.config import config_to_dict, parse_config
from schemas.trial import INVALID_HP_EXIT_CODE
from services.searcher.core import SearcherCore

SINGLE_YAML = """\
entrypoint: model_def:Trial
hyperparameters:
  global_batch_size: 64
  lr: {type: double, minval: 0.001, maxval: 0.1}
  layers: {type: int, minval: 2, maxval: 5}
  optimizer:
    name: adam
    betas: [0.9, 0.999]
searcher:
  name: single
  metric: validation_loss
  max_length: {batches: 300}
"""

RANDOM_YAML = """\
entrypoint: model_def:Trial
searcher: {name: random, metric: validation_loss, max_trials: 4}
"""


def submitted(experiment_id: int, yaml: str = SINGLE_YAML, seed: int = 7) -> ev.ExperimentSubmitted:
    """An ExperimentSubmitted carrying the validated config as plain data, as the gateway sends it."""
    cfg, _ = parse_config(yaml)
    return ev.ExperimentSubmitted(
        experiment_id=experiment_id,
        config=config_to_dict(cfg),
        config_yaml=yaml,
        context_digest="sha256:00",
        context_size=0,
        seed=seed,
    )


def encode(events: Sequence[ev.DomainEvent]) -> bytes:
    return msgspec.json.encode(list(events))


def exited(created: ev.TrialCreated, state: str, exit_code: int | None = None) -> ev.TrialExited:
    return ev.TrialExited(
        experiment_id=created.experiment_id,
        trial_id=created.trial_id,
        state=state,  # type: ignore[arg-type]
        exit_code=exit_code,
    )


def validation(created: ev.TrialCreated, step: int, loss: float) -> ev.ValidationReported:
    return ev.ValidationReported(
        experiment_id=created.experiment_id,
        trial_id=created.trial_id,
        steps_completed=step,
        metrics={"validation_loss": loss},
    )


def start(core: SearcherCore, experiment_id: int = 1, seed: int = 7) -> ev.TrialCreated:
    """Submit a single-search experiment, echo its TrialCreated back, and return it."""
    out = core.handle(submitted(experiment_id, seed=seed))
    assert len(out) == 1 and isinstance(out[0], ev.TrialCreated)
    assert core.handle(out[0]) == []
    return out[0]


# --- an in-memory bus that plays whole experiments --------------------------------------------

TrialScript = Callable[[ev.TrialCreated], list[ev.DomainEvent]]


def trains_and_completes(created: ev.TrialCreated) -> list[ev.DomainEvent]:
    """A trial that validates twice, improving, then exits cleanly."""
    return [validation(created, 100, 0.9), validation(created, 300, 0.4), exited(created, "COMPLETED", 0)]


def crashes(created: ev.TrialCreated) -> list[ev.DomainEvent]:
    """A trial that validates once, then fails for good (the scheduler gave up restarting it)."""
    return [validation(created, 100, 0.9), exited(created, "ERROR", 1)]


def play(
    core: SearcherCore,
    first: Sequence[ev.DomainEvent],
    trial: TrialScript = trains_and_completes,
    restart_after: int | None = None,
) -> list[ev.DomainEvent]:
    """Run experiments to the end on an in-memory bus; return the stream as the bus saw it.

    The core's decisions are appended to the bus after the event that caused them and fed back to it
    in stream order, like JetStream would; each created trial then reports what ``trial`` says.
    With ``restart_after=k`` the core is replaced by one restored from its snapshot after k events.
    """
    stream: list[ev.DomainEvent] = []
    pending: deque[ev.DomainEvent] = deque(first)
    while pending:
        event = pending.popleft()
        stream.append(event)
        pending.extend(core.handle(event))
        if isinstance(event, ev.TrialCreated):
            pending.extend(trial(event))
        if restart_after is not None and len(stream) == restart_after:
            core = SearcherCore.restore(core.snapshot())
        assert len(stream) < 1000, "the search never ended"
    return stream


def ended(stream: Sequence[ev.DomainEvent]) -> list[ev.ExperimentEnded]:
    return [e for e in stream if isinstance(e, ev.ExperimentEnded)]


# --- single search -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 7, 42, 2**31 - 1, 123456789])
def test_single_search_creates_one_trial_drawn_from_the_space(seed: int) -> None:
    out = SearcherCore().handle(submitted(1, seed=seed))
    assert len(out) == 1
    created = out[0]
    assert isinstance(created, ev.TrialCreated)
    assert (created.experiment_id, created.trial_id, created.request_id) == (1, 1, 0)
    assert created.max_length == 300
    hp = created.hparams
    assert set(hp) == {"global_batch_size", "lr", "layers", "optimizer"}
    assert hp["global_batch_size"] == 64
    assert hp["optimizer"] == {"name": "adam", "betas": [0.9, 0.999]}
    assert isinstance(hp["lr"], float) and 0.001 <= hp["lr"] <= 0.1
    assert isinstance(hp["layers"], int) and 2 <= hp["layers"] <= 5


def test_the_seed_drives_the_draw() -> None:
    draws = {encode(SearcherCore().handle(submitted(1, seed=seed))) for seed in range(8)}
    assert len(draws) > 1


def test_own_trial_created_coming_back_is_a_no_op() -> None:
    core = SearcherCore()
    created = core.handle(submitted(1))[0]
    before = core.snapshot()
    assert core.handle(created) == []
    assert core.snapshot() == before


def test_validation_of_a_single_trial_decides_nothing() -> None:
    core = SearcherCore()
    created = start(core)
    assert core.handle(validation(created, 100, 0.5)) == []


@pytest.mark.parametrize(
    ("trial_state", "exit_code", "experiment_state"),
    [
        ("COMPLETED", 0, "COMPLETED"),
        ("ERROR", 1, "ERROR"),
        ("ERROR", INVALID_HP_EXIT_CODE, "ERROR"),
        ("ERROR", None, "ERROR"),  # never started, restarts exhausted
    ],
)
def test_trial_exit_ends_the_experiment(trial_state: str, exit_code: int | None, experiment_state: str) -> None:
    core = SearcherCore()
    created = start(core)
    out = core.handle(exited(created, trial_state, exit_code))
    assert len(out) == 1
    end = out[0]
    assert isinstance(end, ev.ExperimentEnded)
    assert (end.experiment_id, end.state) == (1, experiment_state)


@pytest.mark.parametrize("trial_state", ["CANCELED", "COMPLETED", "ERROR"])
def test_kill_waits_for_the_trial_then_ends_canceled(trial_state: str) -> None:
    core = SearcherCore()
    created = start(core)
    assert core.handle(ev.ExperimentKillRequested(experiment_id=1)) == []
    # Still running: a validation changes nothing and ends nothing.
    assert core.handle(validation(created, 100, 0.5)) == []
    out = core.handle(exited(created, trial_state))
    assert [(type(e), e.state) for e in out] == [(ev.ExperimentEnded, "CANCELED")]  # type: ignore[attr-defined]


def test_kill_after_the_end_changes_nothing() -> None:
    core = SearcherCore()
    created = start(core)
    end = core.handle(exited(created, "COMPLETED", 0))
    core.handle(end[0])
    before = core.snapshot()
    assert core.handle(ev.ExperimentKillRequested(experiment_id=1)) == []
    assert core.snapshot() == before


def test_events_of_unknown_experiments_and_trials_are_ignored() -> None:
    core = SearcherCore()
    created = start(core)
    before = core.snapshot()
    stranger = ev.TrialCreated(experiment_id=9, trial_id=99, request_id=0, hparams={}, seed=1)
    assert core.handle(exited(stranger, "COMPLETED", 0)) == []
    assert core.handle(validation(stranger, 10, 0.1)) == []
    assert core.handle(ev.ExperimentKillRequested(experiment_id=9)) == []
    other_trial = ev.TrialExited(experiment_id=1, trial_id=created.trial_id + 5, state="COMPLETED")
    assert core.handle(other_trial) == []
    assert core.snapshot() == before


def test_two_experiments_get_distinct_global_trial_ids() -> None:
    core = SearcherCore()
    first = core.handle(submitted(1))[0]
    second = core.handle(submitted(2))[0]
    assert isinstance(first, ev.TrialCreated) and isinstance(second, ev.TrialCreated)
    assert (first.trial_id, second.trial_id) == (1, 2)
    # Request ids are per experiment; trial ids are global.
    assert first.request_id == second.request_id == 0


def test_a_config_this_searcher_cannot_read_ends_the_experiment_with_an_error_naming_it() -> None:
    """Version skew (a newer gateway accepted a method this searcher lacks): ERROR, not a hang."""
    event = submitted(3, yaml=RANDOM_YAML)
    skewed = msgspec.structs.replace(event, config={**event.config,
                                                    "searcher": {**event.config["searcher"], "name": "pbt"}})
    core = SearcherCore()
    (end,) = core.handle(skewed)
    assert isinstance(end, ev.ExperimentEnded)
    assert (end.experiment_id, end.state) == (3, "ERROR")
    assert "pbt" in end.reason
    before = core.snapshot()
    again = core.handle(skewed)
    assert core.snapshot() == before
    assert all(encode([e]) == encode([end]) for e in again)


def test_a_config_that_no_longer_validates_ends_the_experiment_with_an_error() -> None:
    # Version skew: the gateway accepted a value this searcher cannot read.
    event = submitted(4)
    bad = msgspec.structs.replace(event, config={**event.config, "max_restarts": "many"})
    out = SearcherCore().handle(bad)
    assert [(type(e), e.state) for e in out] == [(ev.ExperimentEnded, "ERROR")]  # type: ignore[attr-defined]
    assert "max_restarts" in out[0].reason  # type: ignore[attr-defined]


def test_a_config_field_added_by_a_later_version_is_skipped_and_the_search_runs() -> None:
    """Wire data is read leniently: a newer gateway's extra field does not end the experiment."""
    event = submitted(4)
    newer = msgspec.structs.replace(event, config={**event.config, "no_such_field": 1,
                                                   "searcher": {**event.config["searcher"], "new_knob": True}})
    plain, skewed = SearcherCore().handle(event), SearcherCore().handle(newer)
    assert [type(e) for e in skewed] == [ev.TrialCreated]
    assert encode(skewed) == encode(plain)


# --- idempotency, determinism, snapshots -------------------------------------------------------

SCENARIOS: dict[str, tuple[list[ev.DomainEvent], TrialScript]] = {
    "completes": ([submitted(1)], trains_and_completes),
    "errors": ([submitted(1)], crashes),
    "two experiments": ([submitted(1, seed=3), submitted(2, seed=4)], trains_and_completes),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_runner_plays_a_whole_experiment(name: str) -> None:
    first, trial = SCENARIOS[name]
    stream = play(SearcherCore(), first, trial)
    created = [e for e in stream if isinstance(e, ev.TrialCreated)]
    exits = [e for e in stream if isinstance(e, ev.TrialExited)]
    ends = ended(stream)
    experiments = {e.experiment_id for e in first}  # type: ignore[attr-defined]
    assert {e.experiment_id for e in created} == experiments  # one trial per single search
    assert len(created) == len(experiments)
    assert sorted(e.trial_id for e in exits) == sorted(e.trial_id for e in created)
    assert sorted(e.experiment_id for e in ends) == sorted(experiments)
    expected = "COMPLETED" if trial is trains_and_completes else "ERROR"
    assert {e.state for e in ends} == {expected}
    # Each experiment ends after its last trial exits, never before.
    for end in ends:
        last_exit = max(i for i, e in enumerate(stream) if isinstance(e, ev.TrialExited)
                        and e.experiment_id == end.experiment_id)
        assert stream.index(end) > last_exit


@pytest.mark.parametrize("name", SCENARIOS)
def test_same_events_twice_from_fresh_cores_give_identical_output(name: str) -> None:
    first, trial = SCENARIOS[name]
    assert encode(play(SearcherCore(), first, trial)) == encode(play(SearcherCore(), first, trial))


@pytest.mark.parametrize("name", SCENARIOS)
def test_redelivery_of_any_event_changes_nothing(name: str) -> None:
    first, trial = SCENARIOS[name]
    stream = play(SearcherCore(), first, trial)
    core = SearcherCore()
    for event in stream:
        core.handle(event)
        before = core.snapshot()
        assert core.handle(event) == [], type(event).__name__
        assert core.snapshot() == before, type(event).__name__


@pytest.mark.parametrize("name", SCENARIOS)
def test_late_redelivery_after_the_end_changes_nothing(name: str) -> None:
    # JetStream may redeliver an old message after later ones were handled (nak, ack timeout).
    first, trial = SCENARIOS[name]
    stream = play(SearcherCore(), first, trial)
    core = SearcherCore()
    for event in stream:
        core.handle(event)
    before = core.snapshot()
    for event in stream:
        assert core.handle(event) == [], type(event).__name__
    assert core.snapshot() == before


@pytest.mark.parametrize("name", SCENARIOS)
def test_snapshot_restore_snapshot_is_byte_equal_at_every_point(name: str) -> None:
    first, trial = SCENARIOS[name]
    core = SearcherCore()
    for event in play(SearcherCore(), first, trial):
        core.handle(event)
        data = core.snapshot()
        assert SearcherCore.restore(data).snapshot() == data


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_restored_core_decides_like_the_original(name: str) -> None:
    first, trial = SCENARIOS[name]
    uninterrupted = encode(play(SearcherCore(), first, trial))
    length = len(play(SearcherCore(), first, trial))
    for k in range(1, length + 1):
        assert encode(play(SearcherCore(), first, trial, restart_after=k)) == uninterrupted, k


def test_restore_then_replay_from_the_snapshot_point_republishes_the_same_bytes() -> None:
    # A searcher that crashed after deciding but before acking sees the event again from its
    # snapshot: it must say exactly what it said before, so JetStream's dedupe drops it.
    core = SearcherCore()
    saved = core.snapshot()
    first = core.handle(submitted(1))
    assert encode(SearcherCore.restore(saved).handle(submitted(1))) == encode(first)
