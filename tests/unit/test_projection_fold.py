"""The tracker's fold of domain events over read-model rows: pure, no database."""

from __future__ import annotations

import math
import typing
from typing import Any

import msgspec
import pytest

from schemas import events as ev
from services.tracker.projection import _HANDLERS, Fold, Item

E, T, T2 = 1, 10, 11


def submitted(smaller: bool = True) -> ev.ExperimentSubmitted:
    cfg = {"name": "x", "entrypoint": "python3 train.py",
           "searcher": {"name": "single", "metric": "loss", "smaller_is_better": smaller}}
    return ev.ExperimentSubmitted(experiment_id=E, config=cfg, config_yaml="", context_digest="d", context_size=1,
                                  seed=1, submitted_at=100.0)


def created(trial_id: int = T, hparams: dict[str, Any] | None = None) -> ev.TrialCreated:
    return ev.TrialCreated(experiment_id=E, trial_id=trial_id, request_id=trial_id, hparams=hparams or {}, seed=0)


def assigned(alloc: str = f"{T}.1", worker: str = "w0", node_rank: int = 0,
             nodes: list[ev.AllocationNode] | None = None) -> ev.AllocationAssigned:
    return ev.AllocationAssigned(experiment_id=E, trial_id=T, allocation_id=alloc, worker_id=worker,
                                 slot_ids=["cpu0"], node_rank=node_rank, nodes=nodes or [])


def validated(step: int, value: Any, trial_id: int = T) -> ev.ValidationReported:
    return ev.ValidationReported(experiment_id=E, trial_id=trial_id, steps_completed=step, metrics={"loss": value})


def progress(trial_id: int, value: float) -> ev.TrialProgressReported:
    return ev.TrialProgressReported(experiment_id=E, trial_id=trial_id, progress=value)


def fold(*events: Any) -> Fold:
    f = Fold()
    for i, e in enumerate(events, 1):
        f.apply(Item(seq=i, ts=1000.0 + i, event=e))
    f.finish()
    return f


def test_a_trial_life_sets_its_state_step_by_step() -> None:
    f = fold(submitted(), created(), assigned(),
             ev.TrialStarted(experiment_id=E, trial_id=T, allocation_id=f"{T}.1", worker_id="w0", started_at=5.0))
    t = f.trials[T]
    assert (t["state"], t["allocation_id"], t["worker_id"], t["started_at"].timestamp()) == \
        ("RUNNING", f"{T}.1", "w0", 5.0)
    assert f.allocations[f"{T}.1"]["started_at"].timestamp() == 5.0
    f.apply(Item(seq=9, ts=2000.0, event=ev.TrialExited(experiment_id=E, trial_id=T, state="COMPLETED", exit_code=0)))
    assert (t["state"], t["exit_code"], t["ended_at"].timestamp()) == ("COMPLETED", 0, 2000.0)


@pytest.mark.parametrize(
    ("late", "field", "expected"),
    [
        # Requests after the trial ended change nothing (the SQL guard "ended_at IS NULL").
        (ev.TrialKillRequested(experiment_id=E, trial_id=T), "state", "COMPLETED"),
        (ev.TrialPaused(experiment_id=E, trial_id=T, allocation_id=f"{T}.1", length=1), "state", "COMPLETED"),
        (ev.TrialResumeRequested(experiment_id=E, trial_id=T, max_length=99), "max_length", None),
        # ...but facts that have no such guard still land.
        (ev.TrialStopRequested(experiment_id=E, trial_id=T), "stop_requested", True),
    ],
)
def test_what_an_ended_trial_still_takes(late: Any, field: str, expected: Any) -> None:
    f = fold(submitted(), created(), ev.TrialExited(experiment_id=E, trial_id=T, state="COMPLETED", exit_code=0), late)
    assert f.trials[T][field] == expected


def test_an_event_about_a_row_not_there_yet_is_a_no_op_even_if_it_comes_later() -> None:
    f = fold(submitted(), ev.TrialKillRequested(experiment_id=E, trial_id=T), created())
    assert f.trials[T]["state"] == "QUEUED"


def test_the_first_insert_wins() -> None:
    f = fold(submitted(), created(hparams={"lr": 1}), created(hparams={"lr": 2}))
    assert f.trials[T]["hparams"] == '{"lr":1}'


def test_preemption_is_asked_of_the_current_allocation_only() -> None:
    stale = ev.TrialPreemptRequested(experiment_id=E, trial_id=T, allocation_id=f"{T}.0")
    assert fold(submitted(), created(), assigned(), stale).trials[T]["state"] == "STARTING"
    current = ev.TrialPreemptRequested(experiment_id=E, trial_id=T, allocation_id=f"{T}.1")
    assert fold(submitted(), created(), assigned(), current).trials[T]["state"] == "STOPPING"


@pytest.mark.parametrize(
    ("smaller", "values", "best"),
    [
        (True, [0.5, 0.7, 0.3], 0.3),
        (False, [0.5, 0.7, 0.3], 0.7),
        (True, ["NaN", 0.4, "Infinity"], 0.4),  # non-finite values never become the best
        (True, [float("nan"), "text"], None),
    ],
)
def test_best_metric_follows_smaller_is_better_and_skips_non_finite(smaller: bool, values: list[Any],
                                                                    best: float | None) -> None:
    f = fold(submitted(smaller), created(), *(validated(i + 1, v) for i, v in enumerate(values)))
    assert f.trials[T]["best_metric"] == best
    assert f.trials[T]["steps_completed"] == len(values)


def test_experiment_progress_is_the_mean_of_its_trials_as_of_each_progress_event() -> None:
    f = fold(submitted(), created(T), created(T2), progress(T, 0.5), progress(T2, 0.25))
    assert f.experiments[E]["progress"] == pytest.approx(0.375)
    # A trial created after the last progress event is not in that mean.
    f = fold(submitted(), created(T), progress(T, 0.5), created(T2))
    assert f.experiments[E]["progress"] == 0.5
    # An ended experiment keeps its progress; a completed one is at 1.
    ended = ev.ExperimentEnded(experiment_id=E, state="COMPLETED")
    assert fold(submitted(), created(T), ended, progress(T, 0.2)).experiments[E]["progress"] == 1.0
    assert math.isclose(fold(submitted(), created(T), progress(T, 0.2), ended).experiments[E]["progress"], 1.0)


def test_a_spanning_allocation_is_node_zeros_row_and_ends_with_node_zero_or_a_failure() -> None:
    nodes = [ev.AllocationNode(worker_id="w0", address="a", slot_ids=["cpu0"]),
             ev.AllocationNode(worker_id="w1", address="b", slot_ids=["cpu0"])]
    alloc = f"{T}.1"

    def exited(rank: int, code: int) -> ev.AllocationExited:
        return ev.AllocationExited(experiment_id=E, trial_id=T, allocation_id=alloc, worker_id=f"w{rank}",
                                   exit_code=code, node_rank=rank, exited_at=50.0 + rank)

    base = (submitted(), created(), assigned(nodes=nodes), assigned(worker="w1", node_rank=1, nodes=nodes))
    f = fold(*base)
    assert f.trials[T]["worker_id"] == "w0"  # node 1's assignment does not move the trial
    assert f.allocations[alloc]["nodes"] == ('[{"worker_id":"w0","address":"a","slot_ids":["cpu0"]},'
                                             '{"worker_id":"w1","address":"b","slot_ids":["cpu0"]}]')
    assert fold(*base, exited(1, 0)).allocations[alloc]["ended_at"] is None
    assert fold(*base, exited(1, 0), exited(0, 0)).allocations[alloc]["exit_code"] == 0
    failed = fold(*base, exited(1, 137), exited(0, 1)).allocations[alloc]
    assert (failed["exit_code"], failed["ended_at"].timestamp()) == (1, 50.0)  # node 0's word is final
    assert fold(*base, exited(1, 137)).allocations[alloc]["exit_code"] == 137


def test_only_touched_rows_are_written() -> None:
    f = Fold(experiments={}, trials={T2: {"id": T2, "experiment_id": E, "ended_at": None, "progress": 0.0,
                                          "state": "RUNNING"}})
    f.apply(Item(seq=1, ts=1.0, event=ev.TrialKillRequested(experiment_id=E, trial_id=T)))
    assert f.changed["trials"] == set()
    f.apply(Item(seq=2, ts=2.0, event=ev.TrialKillRequested(experiment_id=E, trial_id=T2)))
    assert f.changed["trials"] == {T2} and f.trials[T2]["state"] == "STOPPING_CANCELED"


def test_every_event_the_tracker_consumes_has_a_handler() -> None:
    consumed = {member for kind in (ev.DomainEvent, ev.MetricEvent, ev.LogEvent, ev.MessageDeadLettered)
                for member in (typing.get_args(kind) or (kind,))}
    assert len(consumed) > 25 and ev.TrainingMetricsReported in consumed and ev.LogsShipped in consumed
    assert consumed <= set(_HANDLERS)


@pytest.mark.parametrize(
    ("config", "columns"),
    [
        # Unset knobs get the config's defaults; a field added by a later version is skipped.
        ({"name": "", "entrypoint": "t:T", "searcher": {"name": "single", "metric": "acc", "smaller_is_better": False},
          "added_later": {"x": 1}},
         ("Experiment", "single", "acc", False, 42, 1.0, None)),
        ({"name": "x", "entrypoint": "t:T", "searcher": {"name": "single", "metric": "m"},
          "resources": {"priority": 7, "weight": 2, "max_slots": 3}},
         ("x", "single", "m", True, 7, 2.0, 3)),
        # Unreadable by this version: the raw config is kept, the columns are the defaults.
        ({"name": "x", "searcher": {"name": "pbt"}}, ("Experiment", "", "", True, 42, 1.0, None)),
    ],
)
def test_experiment_columns_come_from_the_typed_config(config: dict[str, Any], columns: tuple[Any, ...]) -> None:
    event = ev.ExperimentSubmitted(experiment_id=E, config=config, config_yaml="", context_digest="d",
                                   context_size=1, seed=1)
    x = fold(event).experiments[E]
    assert (x["name"], x["searcher_name"], x["searcher_metric"], x["smaller_is_better"], x["priority"], x["weight"],
            x["max_slots"]) == columns
    assert x["config"] == ev_json(config)


def ev_json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def test_an_assignment_from_an_older_log_without_a_spec_folds_like_one_with_it() -> None:
    old = b'{"type":"AllocationAssigned","experiment_id":1,"trial_id":10,"allocation_id":"10.1","worker_id":"w0",' \
          b'"slot_ids":["cpu0"]}'
    decoded = msgspec.json.decode(old, type=ev.DomainEvent)
    assert isinstance(decoded, ev.AllocationAssigned) and decoded.spec is None
    spec = ev.TrialSpec(config={"entrypoint": "t:T"}, context_digest="d", hparams={"lr": 1}, seed=2)
    with_spec = msgspec.structs.replace(decoded, spec=spec)
    assert fold(submitted(), created(), decoded).allocations == fold(submitted(), created(), with_spec).allocations


def test_deleted_checkpoints_are_marked_with_the_first_deletion() -> None:
    f = Fold()
    f.apply(Item(seq=1, ts=5.0, event=ev.CheckpointsDeleted(experiment_id=E, uuids=["a", "b"], reason="retention")))
    f.apply(Item(seq=2, ts=9.0, event=ev.CheckpointsDeleted(experiment_id=E, uuids=["b"], reason="user",
                                                            deleted_by="ann")))
    assert {u: (at.timestamp(), why) for u, (at, why) in f.checkpoints_deleted.items()} == \
        {"a": (5.0, "retention"), "b": (5.0, "retention")}


def test_metadata_changes_rename_redescribe_and_relabel() -> None:
    f = fold(submitted(),
             ev.ExperimentMetadataChanged(experiment_id=E, name="renamed", labels_added=["a", "b", "a"], change_id="1"),
             ev.ExperimentMetadataChanged(experiment_id=E, description="why", labels_added=["b", "c"],
                                          labels_removed=["a"], change_id="2"))
    x = f.experiments[E]
    assert (x["name"], x["description"], msgspec.json.decode(x["labels"])) == ("renamed", "why", ["b", "c"])


def test_an_experiment_submitted_paused_starts_paused() -> None:
    paused = msgspec.structs.replace(submitted(), paused=True)
    assert fold(paused).experiments[E]["state"] == "PAUSED"
    assert fold(submitted()).experiments[E]["state"] == "ACTIVE"


def test_archive_and_unarchive_fold_into_the_archived_column() -> None:
    archived = ev.ExperimentMetadataChanged(experiment_id=E, archived=True, change_id="1")
    assert fold(submitted()).experiments[E]["archived"] is False
    assert fold(submitted(), archived).experiments[E]["archived"] is True
    unarchived = ev.ExperimentMetadataChanged(experiment_id=E, archived=False, change_id="2")
    assert fold(submitted(), archived, unarchived).experiments[E]["archived"] is False
