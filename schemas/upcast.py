"""Older event versions, kept decodable: each retired shape and the function that lifts it to today's event.

A breaking change to a wire event is a new tag (STYLE.md 6); events already in a stream keep their old
tag forever (KILN_EVENTS is never rewritten). A reader that must accept them decodes with
``decoder_with_upcasts(union)``: the old shape is decoded by its own Struct and converted, so everything
downstream only ever sees current events. Adding an upcast does not touch ``schemas.events``.
No I/O at import.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

from schemas import events as ev

T = TypeVar("T")


class Upcast(msgspec.Struct, frozen=True, kw_only=True):
    """One retired shape (``legacy``, decodable by its old tag) and how it becomes ``current``."""

    legacy: type[msgspec.Struct]
    current: type[ev.Event]
    convert: Callable[[Any], ev.Event]


# ---------------------------------------------------------------------------------------------
# Retired shapes. Frozen like every wire event; tagged with the tag they were published under.
# ---------------------------------------------------------------------------------------------


class TrialValidatedV1(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="TrialValidated"):
    """v1 of ``ValidationReported``: published as ``TrialValidated``, its step count named ``step``."""

    experiment_id: int
    trial_id: int
    step: int
    metrics: dict[str, ev.MetricValue]


def _trial_validated_v1(old: TrialValidatedV1) -> ev.ValidationReported:
    # v1 had no report time: 0.0 is the current event's own "unknown" default.
    return ev.ValidationReported(
        experiment_id=old.experiment_id,
        trial_id=old.trial_id,
        steps_completed=old.step,
        metrics=old.metrics,
    )


UPCASTS: tuple[Upcast, ...] = (
    Upcast(legacy=TrialValidatedV1, current=ev.ValidationReported, convert=_trial_validated_v1),
)


class UpcastingDecoder(Generic[T]):
    """Decodes a stream union and its retired shapes in one pass; returns only current events."""

    def __init__(self, union: Any, upcasts: tuple[Upcast, ...] = UPCASTS) -> None:
        members = typing.get_args(union) or (union,)
        # Only the upcasts that end in this union (the legacy shapes of other streams stay unknown tags).
        relevant = [u for u in upcasts if u.current in members]
        self._convert: dict[type, Callable[[Any], ev.Event]] = {u.legacy: u.convert for u in relevant}
        # One tagged union of current and legacy Structs: msgspec dispatches on the tag, so a current event
        # costs nothing extra, and a legacy tag reused by a current event fails here, at construction.
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
            typing.Union[(*members, *(u.legacy for u in relevant))]  # noqa: UP007 - built at runtime
        )

    def decode(self, data: bytes | bytearray | memoryview | str) -> T:
        """Decode one message; a legacy shape comes back converted to the current event."""
        event: Any = self._decoder.decode(data)
        convert = self._convert.get(type(event))
        # Legacy shapes convert straight to current events, never to another legacy shape.
        return typing.cast(T, convert(event) if convert is not None else event)


def decoder_with_upcasts(union: Any) -> UpcastingDecoder[Any]:
    """A decoder for ``union`` (e.g. ``ev.DomainEvent``) that also accepts every retired shape of its events."""
    return UpcastingDecoder(union)
