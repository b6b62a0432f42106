"""Schema evolution: retired event shapes still decode (upcast), and readers skip fields they do not know."""

from __future__ import annotations

import msgspec
import pytest

from schemas import events as ev
from schemas.upcast import UPCASTS, TrialValidatedV1, Upcast, UpcastingDecoder, decoder_with_upcasts

# Bytes exactly as a v1 writer published them: old tag, old field name, no reported_at.
V1_BYTES = b'{"type":"TrialValidated","experiment_id":7,"trial_id":42,"step":1200,"metrics":{"loss":0.25,"acc":0.9}}'


def test_old_bytes_decode_into_the_current_event() -> None:
    event = decoder_with_upcasts(ev.DomainEvent).decode(V1_BYTES)
    assert event == ev.ValidationReported(
        experiment_id=7, trial_id=42, steps_completed=1200, metrics={"loss": 0.25, "acc": 0.9}, reported_at=0.0
    )


def test_the_current_union_alone_rejects_the_old_tag() -> None:
    """Why the upcast exists: the rename was breaking, a plain decoder refuses the old message."""
    with pytest.raises(msgspec.ValidationError, match="TrialValidated"):
        msgspec.json.Decoder(ev.DomainEvent).decode(V1_BYTES)


def test_current_events_decode_unchanged() -> None:
    decoder = decoder_with_upcasts(ev.DomainEvent)
    events: list[ev.DomainEvent] = [
        ev.ValidationReported(experiment_id=1, trial_id=2, steps_completed=3, metrics={"x": 1.0}, reported_at=5.0),
        ev.TrialExited(experiment_id=1, trial_id=2, state="COMPLETED"),
        ev.ExperimentKillRequested(experiment_id=1),
    ]
    for event in events:
        assert decoder.decode(msgspec.json.encode(event)) == event


def test_unknown_extra_fields_in_current_events_are_ignored() -> None:
    """A newer writer adds fields; this (older) reader skips them, through the upcasting decoder or not."""
    newer = (
        b'{"type":"ValidationReported","experiment_id":1,"trial_id":2,"steps_completed":30,'
        b'"metrics":{"loss":0.1},"reported_at":9.5,"validator":{"host":"w1","gpu":0},"tags":["a","b"]}'
    )
    expected = ev.ValidationReported(experiment_id=1, trial_id=2, steps_completed=30, metrics={"loss": 0.1},
                                     reported_at=9.5)
    assert decoder_with_upcasts(ev.DomainEvent).decode(newer) == expected
    assert msgspec.json.Decoder(ev.DomainEvent).decode(newer) == expected
    metrics = (
        b'{"type":"TrainingMetricsReported","experiment_id":1,"trial_id":2,"batch_id":"b","future":1,'
        b'"points":[{"steps_completed":1,"metrics":{"loss":2.0},"unit":"batches"}]}'
    )
    decoded = decoder_with_upcasts(ev.MetricEvent).decode(metrics)
    assert decoded.points == [ev.MetricPoint(steps_completed=1, metrics={"loss": 2.0})]


def test_a_legacy_shape_is_only_accepted_by_the_union_it_upcasts_into() -> None:
    with pytest.raises(msgspec.ValidationError):
        decoder_with_upcasts(ev.MetricEvent).decode(V1_BYTES)


def test_garbage_still_fails_to_decode() -> None:
    decoder = decoder_with_upcasts(ev.DomainEvent)
    for bad in (b'{"type":"NoSuchEvent"}', b'{"type":"TrialValidated","experiment_id":1}', b"not json"):
        with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
            decoder.decode(bad)


def test_every_upcast_targets_a_current_event_under_a_retired_tag() -> None:
    current_tags = {cls.__name__ for cls in ev.DomainEvent.__args__}  # type: ignore[attr-defined]
    for upcast in UPCASTS:
        assert upcast.current.__name__ in current_tags
        assert upcast.legacy.__struct_config__.tag not in current_tags


def test_a_legacy_tag_clashing_with_a_current_tag_is_refused_at_construction() -> None:
    class Clash(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="ValidationReported"):
        step: int

    clash = Upcast(legacy=Clash, current=ev.ValidationReported, convert=lambda old: old)
    with pytest.raises(TypeError, match="unique `tag`"):
        UpcastingDecoder(ev.DomainEvent, (clash,))


def test_v1_shape_round_trips_as_published() -> None:
    """The legacy Struct is the v1 wire format itself: encoding it gives the bytes a v1 writer sent."""
    old = msgspec.json.decode(V1_BYTES, type=TrialValidatedV1)
    assert msgspec.json.decode(msgspec.json.encode(old)) == msgspec.json.decode(V1_BYTES)
