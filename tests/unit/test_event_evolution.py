"""Schema evolution on the wire: a reader skips fields a newer writer added, and events round-trip unchanged."""

from __future__ import annotations

import msgspec

from schemas import events as ev


def test_current_events_round_trip() -> None:
    decoder = msgspec.json.Decoder(ev.DomainEvent)
    events: list[ev.DomainEvent] = [
        ev.ValidationReported(experiment_id=1, trial_id=2, steps_completed=3, metrics={"x": 1.0}, reported_at=5.0),
        ev.TrialExited(experiment_id=1, trial_id=2, state="COMPLETED"),
        ev.ExperimentKillRequested(experiment_id=1),
    ]
    for event in events:
        assert decoder.decode(msgspec.json.encode(event)) == event


def test_unknown_extra_fields_in_current_events_are_ignored() -> None:
    """A newer writer adds fields; this (older) reader skips them."""
    newer = (
        b'{"type":"ValidationReported","experiment_id":1,"trial_id":2,"steps_completed":30,'
        b'"metrics":{"loss":0.1},"reported_at":9.5,"validator":{"host":"w1","gpu":0},"tags":["a","b"]}'
    )
    expected = ev.ValidationReported(experiment_id=1, trial_id=2, steps_completed=30, metrics={"loss": 0.1},
                                     reported_at=9.5)
    assert msgspec.json.Decoder(ev.DomainEvent).decode(newer) == expected
    metrics = (
        b'{"type":"TrainingMetricsReported","experiment_id":1,"trial_id":2,"batch_id":"b","future":1,'
        b'"points":[{"steps_completed":1,"metrics":{"loss":2.0},"unit":"batches"}]}'
    )
    decoded = msgspec.json.Decoder(ev.MetricEvent).decode(metrics)
    assert decoded.points == [ev.MetricPoint(steps_completed=1, metrics={"loss": 2.0})]
