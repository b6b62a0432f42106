"""Subjects and dedupe keys for every event, and the wire contract of the event unions."""

from __future__ import annotations

import re
import typing
from typing import Any

import msgspec
import pytest

from schemas import events as ev
from schemas import subjects

UNIONS = {
    "domain": ev.DomainEvent,
    "metric": ev.MetricEvent,
    "log": ev.LogEvent,
    "deadletter": ev.DeadLetterEvent,
}


def members(union: Any) -> tuple[type, ...]:
    return typing.get_args(union) or (union,)


ALL_EVENT_CLASSES = [cls for union in UNIONS.values() for cls in members(union)]
UNION_OF = {cls: union for union in UNIONS.values() for cls in members(union)}

EXP, TRIAL, WORKER = 3, 17, "gpu-node_1"
MODEL = 5

# One minimal instance of every event; test_samples_cover_every_event keeps this complete.
SAMPLES: dict[type, Any] = {
    ev.ExperimentSubmitted: ev.ExperimentSubmitted(
        experiment_id=EXP, config={"searcher": {"name": "single"}}, config_yaml="", context_digest="sha256:0",
        context_size=0, seed=1,
    ),
    ev.ExperimentKillRequested: ev.ExperimentKillRequested(experiment_id=EXP),
    ev.TrialCreated: ev.TrialCreated(experiment_id=EXP, trial_id=TRIAL, request_id=0, hparams={"lr": 0.1}, seed=5),
    ev.TrialStopRequested: ev.TrialStopRequested(experiment_id=EXP, trial_id=TRIAL),
    ev.ExperimentPauseRequested: ev.ExperimentPauseRequested(experiment_id=EXP, request_id="r1"),
    ev.ExperimentActivateRequested: ev.ExperimentActivateRequested(experiment_id=EXP, request_id="r2"),
    ev.ExperimentResourcesChanged: ev.ExperimentResourcesChanged(experiment_id=EXP, priority=10, change_id="c1"),
    ev.TrialKillRequested: ev.TrialKillRequested(experiment_id=EXP, trial_id=TRIAL),
    ev.TrialPreemptRequested: ev.TrialPreemptRequested(experiment_id=EXP, trial_id=TRIAL, allocation_id=f"{TRIAL}.1"),
    ev.TrialPreempted: ev.TrialPreempted(experiment_id=EXP, trial_id=TRIAL, allocation_id=f"{TRIAL}.1"),
    ev.TrialResumeRequested: ev.TrialResumeRequested(experiment_id=EXP, trial_id=TRIAL, max_length=9),
    ev.TrialPaused: ev.TrialPaused(experiment_id=EXP, trial_id=TRIAL, allocation_id=f"{TRIAL}.1", length=3),
    ev.ExperimentEnded: ev.ExperimentEnded(experiment_id=EXP, state="COMPLETED"),
    ev.AllocationAssigned: ev.AllocationAssigned(
        experiment_id=EXP, trial_id=TRIAL, allocation_id=f"{TRIAL}.1", worker_id=WORKER, slot_ids=["0"]
    ),
    ev.AllocationKillRequested: ev.AllocationKillRequested(
        experiment_id=EXP, trial_id=TRIAL, allocation_id=f"{TRIAL}.1", worker_id=WORKER
    ),
    ev.TrialStarted: ev.TrialStarted(experiment_id=EXP, trial_id=TRIAL, allocation_id=f"{TRIAL}.1", worker_id=WORKER),
    ev.AllocationExited: ev.AllocationExited(
        experiment_id=EXP, trial_id=TRIAL, allocation_id=f"{TRIAL}.1", worker_id=WORKER, exit_code=0
    ),
    ev.WorkerLost: ev.WorkerLost(worker_id=WORKER, last_seen=1000.5),
    ev.AllocationLost: ev.AllocationLost(experiment_id=EXP, trial_id=TRIAL, allocation_id=f"{TRIAL}.1",
                                         worker_id=WORKER),
    ev.TrialRestarting: ev.TrialRestarting(experiment_id=EXP, trial_id=TRIAL, restarts=1),
    ev.TrialExited: ev.TrialExited(experiment_id=EXP, trial_id=TRIAL, state="COMPLETED"),
    ev.ValidationReported: ev.ValidationReported(
        experiment_id=EXP, trial_id=TRIAL, steps_completed=100, metrics={"loss": 0.5, "note": "ok", "nan": None}
    ),
    ev.CheckpointStored: ev.CheckpointStored(
        experiment_id=EXP, trial_id=TRIAL, uuid="c0ffee", steps_completed=100, storage="s3://kiln/ckpt"
    ),
    ev.TrialProgressReported: ev.TrialProgressReported(experiment_id=EXP, trial_id=TRIAL, progress=0.25),
    ev.CheckpointGCPolicyChanged: ev.CheckpointGCPolicyChanged(experiment_id=EXP, save_trial_best=2, change_id="g1"),
    ev.ExperimentMetadataChanged: ev.ExperimentMetadataChanged(experiment_id=EXP, name="renamed", change_id="m1"),
    ev.CheckpointGCRequested: ev.CheckpointGCRequested(
        experiment_id=EXP, checkpoints=[ev.CheckpointRef(uuid="c0ffee", trial_id=TRIAL, storage="s3://kiln/ckpt")]),
    ev.CheckpointsDeleted: ev.CheckpointsDeleted(experiment_id=EXP, uuids=["c0ffee"], reason="retention"),
    ev.ExperimentDeleted: ev.ExperimentDeleted(experiment_id=EXP, deleted_by="alice"),
    ev.ModelCreated: ev.ModelCreated(model_id=MODEL, name="digits", labels=["prod"], created_by="ann"),
    ev.ModelVersionRegistered: ev.ModelVersionRegistered(model_id=MODEL, version=1, checkpoint_uuid="c0ffee",
                                                         experiment_id=EXP, trial_id=TRIAL),
    ev.ModelMetadataChanged: ev.ModelMetadataChanged(model_id=MODEL, description="why", change_id="mm1"),
    ev.ModelVersionDeleted: ev.ModelVersionDeleted(model_id=MODEL, version=1, checkpoint_uuid="c0ffee",
                                                   experiment_id=EXP),
    ev.ModelDeleted: ev.ModelDeleted(model_id=MODEL, name="digits"),
    ev.ExperimentContinued: ev.ExperimentContinued(experiment_id=EXP, config={"searcher": {"name": "single"}},
                                                   config_yaml="", trial_ids=[TRIAL], request_id="k1"),
    ev.TrialContinueRequested: ev.TrialContinueRequested(experiment_id=EXP, trial_id=TRIAL, hparams={"lr": 0.1},
                                                         max_length=10, continuation=1),
    ev.TrainingMetricsReported: ev.TrainingMetricsReported(
        experiment_id=EXP, trial_id=TRIAL, batch_id="17.1-0",
        points=[ev.MetricPoint(steps_completed=1, metrics={"loss": 1.0})],
    ),
    ev.LogsShipped: ev.LogsShipped(
        experiment_id=EXP, trial_id=TRIAL, allocation_id=f"{TRIAL}.1",
        lines=[ev.LogLine(line_no=40, stream="stdout", text="epoch 1", ts=1.0)],
    ),
    ev.MessageDeadLettered: ev.MessageDeadLettered(
        consumer="tracker", stream="KILN_EVENTS", stream_seq=9, subject="kiln.events.3.experiment", error="boom",
        payload=b"\x00\xffnot json",
    ),
}

SAMPLE_IDS = [cls.__name__ for cls in SAMPLES]

EXPERIMENT_EVENTS = {ev.ExperimentSubmitted, ev.ExperimentKillRequested, ev.ExperimentEnded,
                     ev.ExperimentPauseRequested, ev.ExperimentActivateRequested, ev.ExperimentResourcesChanged,
                     ev.CheckpointGCPolicyChanged, ev.CheckpointGCRequested, ev.CheckpointsDeleted,
                     ev.ExperimentMetadataChanged, ev.ExperimentDeleted, ev.ExperimentContinued}
WORKER_COMMANDS = {ev.AllocationAssigned, ev.AllocationKillRequested}
MODEL_EVENTS = {ev.ModelCreated, ev.ModelVersionRegistered, ev.ModelMetadataChanged, ev.ModelVersionDeleted,
                ev.ModelDeleted}
TRIAL_EVENTS = {
    ev.TrialCreated, ev.TrialStopRequested, ev.TrialKillRequested, ev.TrialPreemptRequested, ev.TrialPreempted,
    ev.TrialResumeRequested, ev.TrialPaused, ev.TrialStarted, ev.AllocationExited, ev.AllocationLost,
    ev.TrialRestarting, ev.TrialExited, ev.ValidationReported, ev.CheckpointStored, ev.TrialProgressReported,
    ev.TrialContinueRequested,
}


def test_samples_cover_every_event() -> None:
    assert set(SAMPLES) == set(ALL_EVENT_CLASSES)
    assert set(members(ev.DomainEvent)) == (EXPERIMENT_EVENTS | WORKER_COMMANDS | TRIAL_EVENTS | MODEL_EVENTS
                                            | {ev.WorkerLost})


# Who publishes what (README "Bus"): written out here, not derived from subjects.OWNERS, so a change to the
# table is a deliberate change to this test too.
GATEWAY = {ev.ExperimentSubmitted, ev.ExperimentKillRequested, ev.ExperimentPauseRequested,
           ev.ExperimentActivateRequested, ev.ExperimentResourcesChanged, ev.TrialKillRequested,
           ev.CheckpointGCPolicyChanged, ev.CheckpointsDeleted, ev.ExperimentMetadataChanged,
           ev.ExperimentDeleted, ev.ExperimentContinued} | MODEL_EVENTS
SEARCHER = {ev.TrialCreated, ev.TrialStopRequested, ev.TrialResumeRequested, ev.ExperimentEnded,
            ev.CheckpointGCRequested, ev.TrialContinueRequested}
SCHEDULER = {ev.TrialPreemptRequested, ev.TrialPreempted, ev.TrialPaused, ev.AllocationAssigned,
             ev.AllocationKillRequested, ev.WorkerLost, ev.AllocationLost, ev.TrialRestarting, ev.TrialExited}
WORKER_FACTS = {ev.TrialStarted, ev.AllocationExited, ev.ValidationReported, ev.CheckpointStored,
                ev.TrialProgressReported, ev.TrainingMetricsReported, ev.LogsShipped}
PUBLISHER = "w-" + WORKER  # the sample events are published by worker WORKER


def _token(cls: type) -> str:
    return ("gateway" if cls in GATEWAY else "searcher" if cls in SEARCHER else "scheduler" if cls in SCHEDULER
            else PUBLISHER)


def _subject(event: Any) -> str:
    return subjects.subject_for(event, worker_id=WORKER)


def _expected_subject(event: Any) -> str:
    """The documented subject layout (schemas/subjects.py docstring, README "Bus")."""
    cls = type(event)
    if cls is ev.MessageDeadLettered:
        return "kiln.deadletter.tracker"
    if cls in EXPERIMENT_EVENTS:
        routing = f"kiln.events.{EXP}.experiment"
    elif cls in WORKER_COMMANDS:
        routing = f"kiln.events.{EXP}.worker.{WORKER}"
    elif cls in TRIAL_EVENTS:
        routing = f"kiln.events.{EXP}.trial.{TRIAL}"
    elif cls in MODEL_EVENTS:
        routing = f"kiln.events.registry.model.{MODEL}"
    else:
        routing = {
            ev.WorkerLost: f"kiln.events.cluster.lost.{WORKER}",
            ev.TrainingMetricsReported: f"kiln.metrics.{EXP}.{TRIAL}",
            ev.LogsShipped: f"kiln.logs.{EXP}.{TRIAL}",
        }[cls]
    return f"{routing}.{_token(cls)}"


def _matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: ``*`` is one token, a trailing ``>`` one or more."""
    p, s = pattern.split("."), subject.split(".")
    if p[-1] == ">":
        return len(s) >= len(p) and all(a in ("*", b) for a, b in zip(p[:-1], s, strict=False))
    return len(p) == len(s) and all(a in ("*", b) for a, b in zip(p, s, strict=True))


@pytest.mark.parametrize("event", SAMPLES.values(), ids=SAMPLE_IDS)
def test_subject_follows_the_documented_layout(event: Any) -> None:
    subject = _subject(event)
    assert subject == _expected_subject(event)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", token) for token in subject.split("."))


@pytest.mark.parametrize("event", SAMPLES.values(), ids=SAMPLE_IDS)
def test_every_subject_lands_in_exactly_one_stream(event: Any) -> None:
    subject = _subject(event)
    streams = [s.name for s in subjects.ALL_STREAMS if any(_matches(p, subject) for p in s.subjects)]
    expected = {
        ev.TrainingMetricsReported: "KILN_METRICS", ev.LogsShipped: "KILN_LOGS",
        ev.MessageDeadLettered: "KILN_DEADLETTER",
    }.get(type(event), "KILN_EVENTS")
    assert streams == [expected]


def test_heartbeat_subject_is_outside_every_stream() -> None:
    hb = subjects.heartbeat_subject(WORKER)
    assert _matches(subjects.HEARTBEAT_SUBJECT, hb)
    assert not any(_matches(p, hb) for s in subjects.ALL_STREAMS for p in s.subjects)


def test_filters_select_the_subjects_they_name() -> None:
    assigned = _subject(SAMPLES[ev.AllocationAssigned])
    assert _matches(subjects.worker_filter(WORKER), assigned)
    assert not _matches(subjects.worker_filter("other"), assigned)
    for cls in EXPERIMENT_EVENTS | TRIAL_EVENTS | WORKER_COMMANDS:
        assert _matches(subjects.experiment_filter(EXP), _subject(SAMPLES[cls]))
        assert not _matches(subjects.experiment_filter(EXP + 1), _subject(SAMPLES[cls]))
    for cls in TRIAL_EVENTS:
        assert _matches(subjects.trial_filter(EXP, TRIAL), _subject(SAMPLES[cls]))
        assert not _matches(subjects.trial_filter(EXP, TRIAL + 1), _subject(SAMPLES[cls]))
    for cls in MODEL_EVENTS:  # the registry's subjects: its own filters, and no experiment's
        subject = _subject(SAMPLES[cls])
        assert _matches(subjects.MODEL_FACTS, subject) and _matches(subjects.model_filter(MODEL), subject)
        assert not _matches(subjects.model_filter(MODEL + 1), subject)
        assert not any(_matches(f, subject) for f in (subjects.EXPERIMENT_FACTS, subjects.TRIAL_FACTS,
                                                       subjects.WORKER_COMMANDS, subjects.CLUSTER_FACTS))


BAD_TOKENS = ["node.1", "node 1", "*", ">", "node*", "a>b", "", "node\t1", "gpu/0", "nöde"]


@pytest.mark.parametrize("worker_id", BAD_TOKENS)
def test_worker_ids_that_cannot_be_one_subject_token_are_rejected(worker_id: str) -> None:
    for make in (
        lambda: subjects.subject_for(msgspec.structs.replace(SAMPLES[ev.AllocationAssigned], worker_id=worker_id)),
        lambda: subjects.subject_for(msgspec.structs.replace(SAMPLES[ev.AllocationKillRequested],
                                                             worker_id=worker_id)),
        lambda: subjects.subject_for(ev.WorkerLost(worker_id=worker_id, last_seen=0.0)),
        lambda: subjects.heartbeat_subject(worker_id),
        lambda: subjects.worker_filter(worker_id),
    ):
        with pytest.raises(ValueError, match="worker id"):
            make()


def test_a_worker_id_with_a_trailing_newline_is_rejected() -> None:
    with pytest.raises(ValueError, match="worker id"):
        subjects.heartbeat_subject("node1\n")


@pytest.mark.parametrize("consumer", ["track.er", "a b", "*", ""])
def test_deadletter_consumer_names_are_checked(consumer: str) -> None:
    with pytest.raises(ValueError, match="consumer"):
        subjects.deadletter_subject(consumer)


# --- dedupe keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("event", SAMPLES.values(), ids=SAMPLE_IDS)
def test_the_same_fact_gets_the_same_key(event: Any) -> None:
    key = subjects.dedupe_key(event)
    assert key
    # Rebuilt from its wire form, as a redelivery or a republish after a restart would be.
    again = msgspec.json.decode(msgspec.json.encode(event), type=UNION_OF[type(event)])
    assert subjects.dedupe_key(again) == key


def test_different_event_kinds_never_share_a_key() -> None:
    keys = [subjects.dedupe_key(e) for e in SAMPLES.values()]
    assert len(set(keys)) == len(keys)


def _r(cls: type, **changes: Any) -> Any:
    return msgspec.structs.replace(SAMPLES[cls], **changes)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        # The same fact said again (other incidental fields) is deduplicated...
        (_r(ev.ValidationReported, reported_at=1.0), _r(ev.ValidationReported, reported_at=2.0), True),
        (_r(ev.TrialExited, reason="a"), _r(ev.TrialExited, reason="b"), True),
        (_r(ev.ExperimentKillRequested, requested_by="ann"), _r(ev.ExperimentKillRequested, requested_by="bob"),
         True),
        # ...while a different fact is not.
        (_r(ev.ValidationReported, steps_completed=100), _r(ev.ValidationReported, steps_completed=200), False),
        (_r(ev.TrialCreated, request_id=0), _r(ev.TrialCreated, request_id=1), False),
        (_r(ev.TrialCreated, experiment_id=1), _r(ev.TrialCreated, experiment_id=2), False),
        (_r(ev.ExperimentSubmitted, experiment_id=1), _r(ev.ExperimentSubmitted, experiment_id=2), False),
        (_r(ev.AllocationAssigned, allocation_id="17.1"), _r(ev.AllocationAssigned, allocation_id="17.2"), False),
        (_r(ev.AllocationExited, allocation_id="17.1"), _r(ev.AllocationExited, allocation_id="17.2"), False),
        (SAMPLES[ev.AllocationExited], SAMPLES[ev.AllocationLost], False),
        # A multi-host allocation: one assignment, exit and kill request per host.
        (_r(ev.AllocationAssigned, node_rank=0), _r(ev.AllocationAssigned, node_rank=1, worker_id="w2"), False),
        (_r(ev.AllocationExited, node_rank=0), _r(ev.AllocationExited, node_rank=1, worker_id="w2"), False),
        (_r(ev.AllocationKillRequested, worker_id="w1"), _r(ev.AllocationKillRequested, worker_id="w2"), False),
        (_r(ev.AllocationKillRequested, reason="a"), _r(ev.AllocationKillRequested, reason="b"), True),
        (SAMPLES[ev.AllocationAssigned], SAMPLES[ev.TrialStarted], False),
        (_r(ev.TrialRestarting, restarts=1), _r(ev.TrialRestarting, restarts=2), False),
        (_r(ev.TrialExited, trial_id=1), _r(ev.TrialExited, trial_id=2), False),
        (_r(ev.WorkerLost, last_seen=10.0), _r(ev.WorkerLost, last_seen=20.0), False),
        (_r(ev.WorkerLost, worker_id="a"), _r(ev.WorkerLost, worker_id="b"), False),
        (_r(ev.CheckpointStored, uuid="a"), _r(ev.CheckpointStored, uuid="b"), False),
        # Retention: the same set of checkpoints (in any order) is one decision; another set is another.
        (_r(ev.CheckpointGCRequested, checkpoints=[ev.CheckpointRef(uuid="a", trial_id=1, storage=""),
                                                   ev.CheckpointRef(uuid="b", trial_id=1, storage="")]),
         _r(ev.CheckpointGCRequested, checkpoints=[ev.CheckpointRef(uuid="b", trial_id=1, storage=""),
                                                   ev.CheckpointRef(uuid="a", trial_id=1, storage="")]), True),
        (_r(ev.CheckpointGCRequested, checkpoints=[ev.CheckpointRef(uuid="a", trial_id=1, storage="")]),
         _r(ev.CheckpointGCRequested, checkpoints=[ev.CheckpointRef(uuid="b", trial_id=1, storage="")]), False),
        (_r(ev.CheckpointsDeleted, uuids=["a"]), _r(ev.CheckpointsDeleted, uuids=["b"]), False),
        (_r(ev.CheckpointGCPolicyChanged, change_id="1"), _r(ev.CheckpointGCPolicyChanged, change_id="2"), False),
        (_r(ev.ExperimentMetadataChanged, change_id="1"), _r(ev.ExperimentMetadataChanged, change_id="2"), False),
        # The registry: a version number is taken once (two registrations racing for it are one fact).
        (_r(ev.ModelVersionRegistered, checkpoint_uuid="a"), _r(ev.ModelVersionRegistered, checkpoint_uuid="b"),
         True),
        (_r(ev.ModelVersionRegistered, version=1), _r(ev.ModelVersionRegistered, version=2), False),
        (_r(ev.ModelVersionRegistered, model_id=1), _r(ev.ModelVersionRegistered, model_id=2), False),
        (_r(ev.ModelCreated, model_id=1), _r(ev.ModelCreated, model_id=2), False),
        (_r(ev.ModelMetadataChanged, change_id="1"), _r(ev.ModelMetadataChanged, change_id="2"), False),
        (_r(ev.ModelVersionDeleted, version=1), _r(ev.ModelVersionDeleted, version=2), False),
        (_r(ev.TrialProgressReported, progress=0.25), _r(ev.TrialProgressReported, progress=0.5), False),
        (_r(ev.TrainingMetricsReported, batch_id="x"), _r(ev.TrainingMetricsReported, batch_id="y"), False),
        (_r(ev.LogsShipped, lines=[ev.LogLine(line_no=0, stream="stdout", text="", ts=0.0)]),
         _r(ev.LogsShipped, lines=[ev.LogLine(line_no=1, stream="stdout", text="", ts=0.0)]), False),
        (_r(ev.LogsShipped, allocation_id="17.1"), _r(ev.LogsShipped, allocation_id="17.2"), False),
        (_r(ev.MessageDeadLettered, stream_seq=1), _r(ev.MessageDeadLettered, stream_seq=2), False),
        (_r(ev.MessageDeadLettered, consumer="a"), _r(ev.MessageDeadLettered, consumer="b"), False),
        # After a continue a trial and its experiment end (and restart) again: new facts, not duplicates...
        (_r(ev.TrialExited, continuation=0), _r(ev.TrialExited, continuation=1), False),
        (_r(ev.TrialRestarting, continuation=0), _r(ev.TrialRestarting, continuation=1), False),
        (ev.ExperimentEnded(experiment_id=EXP, state="COMPLETED"),
         ev.ExperimentEnded(experiment_id=EXP, state="COMPLETED", continuation=1), False),
        (_r(ev.TrialContinueRequested, continuation=1), _r(ev.TrialContinueRequested, continuation=2), False),
        (_r(ev.ExperimentContinued, request_id="a"), _r(ev.ExperimentContinued, request_id="b"), False),
        # ...and a kill of the continued experiment is not the kill before it.
        (_r(ev.ExperimentKillRequested, request_id="a"), _r(ev.ExperimentKillRequested, request_id="b"), False),
        (_r(ev.TrialKillRequested, request_id="a"), _r(ev.TrialKillRequested, request_id="b"), False),
    ],
)
def test_dedupe_keys_tell_facts_apart(a: Any, b: Any, same: bool) -> None:
    assert (subjects.dedupe_key(a) == subjects.dedupe_key(b)) is same


# --- wire contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("event", SAMPLES.values(), ids=SAMPLE_IDS)
def test_event_round_trips_through_its_union(event: Any) -> None:
    data = msgspec.json.encode(event)
    assert msgspec.json.decode(data)["type"] == type(event).__name__  # tagged by class name
    decoded = msgspec.json.Decoder(UNION_OF[type(event)]).decode(data)
    assert type(decoded) is type(event)
    assert decoded == event


@pytest.mark.parametrize("event", SAMPLES.values(), ids=SAMPLE_IDS)
def test_unknown_fields_from_a_newer_writer_are_ignored(event: Any) -> None:
    raw = msgspec.to_builtins(event)
    raw["added_in_v2"] = {"nested": [1, 2, 3]}
    decoded = msgspec.json.Decoder(UNION_OF[type(event)]).decode(msgspec.json.encode(raw))
    assert decoded == event


def test_fields_added_with_defaults_are_optional_for_old_writers() -> None:
    # An event written before `restarts`/`latest_checkpoint` existed still decodes.
    old = b'{"type":"AllocationAssigned","experiment_id":3,"trial_id":17,"allocation_id":"17.1",' \
          b'"worker_id":"w","slot_ids":[]}'
    decoded = msgspec.json.Decoder(ev.DomainEvent).decode(old)
    assert decoded == ev.AllocationAssigned(experiment_id=3, trial_id=17, allocation_id="17.1", worker_id="w",
                                            slot_ids=[], restarts=0, latest_checkpoint=None)


def test_heartbeat_ignores_unknown_fields() -> None:
    hb = ev.WorkerHeartbeat(worker_id=WORKER, address="a", resource_pool="default",
                            slots=[ev.Slot(slot_id="0", kind="cuda")], running=[], sent_at=1.0)
    raw = msgspec.to_builtins(hb)
    raw["future"] = True
    raw["slots"][0]["future"] = 1
    assert msgspec.json.decode(msgspec.json.encode(raw), type=ev.WorkerHeartbeat) == hb


# --- publishers ---------------------------------------------------------------------------------


def test_every_event_but_dead_letters_has_exactly_the_documented_owner() -> None:
    assert set(subjects.OWNERS) == set(ALL_EVENT_CLASSES) - {ev.MessageDeadLettered}
    assert {c for c, r in subjects.OWNERS.items() if r == "gateway"} == GATEWAY
    assert {c for c, r in subjects.OWNERS.items() if r == "searcher"} == SEARCHER
    assert {c for c, r in subjects.OWNERS.items() if r == "scheduler"} == SCHEDULER
    assert {c for c, r in subjects.OWNERS.items() if r == "worker"} == WORKER_FACTS
    assert set(subjects.ROUTING_PATTERNS) == set(subjects.OWNERS)


def test_a_worker_fact_needs_the_publishing_worker() -> None:
    with pytest.raises(ValueError, match="worker"):
        subjects.subject_for(SAMPLES[ev.ValidationReported])
    assert subjects.subject_for(SAMPLES[ev.TrialCreated]).endswith(".searcher")  # no worker id needed


@pytest.mark.parametrize("event", [e for e in SAMPLES.values() if type(e) in subjects.OWNERS],
                         ids=[n for n, c in zip(SAMPLE_IDS, SAMPLES, strict=True) if c in subjects.OWNERS])
def test_each_principal_may_publish_exactly_the_event_types_it_owns(event: Any) -> None:
    subject = _subject(event)
    allowed = {role: subjects.publish_allow(role, WORKER if role == "worker" else "") for role in subjects.ROLES}
    may = {role for role, patterns in allowed.items() if any(_matches(p, subject) for p in patterns)}
    assert may == {subjects.OWNERS[type(event)]}
    # Another worker may not publish on this worker's subjects.
    assert not any(_matches(p, subject) for p in subjects.publish_allow("worker", "other"))
    assert subjects.forged(subject, event) is None
    assert subjects.publisher_of(subject) == subjects.OWNERS[type(event)]


@pytest.mark.parametrize("token", ["gateway", "searcher", "scheduler", "w-other", "reader", "x"])
def test_an_event_on_a_subject_of_a_publisher_that_does_not_own_it_is_forged(token: str) -> None:
    for event in SAMPLES.values():
        owner = subjects.OWNERS.get(type(event))
        if owner is None or subjects.role_of_token(token) == owner:
            continue
        routing = _subject(event).rsplit(".", 1)[0]
        assert subjects.forged(f"{routing}.{token}", event) is not None
        assert subjects.forged(routing, event) is not None  # no publisher token at all


def test_consumer_filters_select_every_publisher() -> None:
    for cls in EXPERIMENT_EVENTS:
        assert _matches(subjects.EXPERIMENT_FACTS, _subject(SAMPLES[cls]))
        assert _matches(subjects.experiment_facts_filter(EXP), _subject(SAMPLES[cls]))
    for cls in TRIAL_EVENTS:
        assert _matches(subjects.TRIAL_FACTS, _subject(SAMPLES[cls]))
        assert _matches(subjects.trial_filter(EXP), _subject(SAMPLES[cls]))
    for cls in WORKER_COMMANDS:
        assert _matches(subjects.WORKER_COMMANDS, _subject(SAMPLES[cls]))
    assert _matches(subjects.CLUSTER_FACTS, _subject(SAMPLES[ev.WorkerLost]))
    assert _matches(subjects.metrics_filter(EXP, TRIAL), _subject(SAMPLES[ev.TrainingMetricsReported]))
    assert _matches(subjects.logs_filter(EXP), _subject(SAMPLES[ev.LogsShipped]))
