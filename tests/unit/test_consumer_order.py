"""The consumer's pure checks: which failures are waited out, and when a delivery went missing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import nats.errors
import nats.js.errors
import pytest

from schemas import subjects
from services.runtime import ConsumerSpec, Transient, _Puller, is_transient


def _msg(cseq: int, sseq: int | None = None, delivered: int = 1) -> Any:
    return SimpleNamespace(reply=f"$JS.ACK.KILN_EVENTS.c.{delivered}.{sseq or cseq}.{cseq}.1795520256000000000.0")


def _puller(next_cseq: int | None) -> _Puller:
    p = _Puller(None, ConsumerSpec(durable="c", stream=subjects.EVENTS, filter_subjects=["kiln.events.>"]),  # type: ignore[arg-type]
                None)
    p.next_cseq = next_cseq
    return p


def test_contiguous_deliveries_are_in_order_across_fetches() -> None:
    p = _puller(1)
    assert p.in_order([_msg(1), _msg(2), _msg(3)])
    assert p.in_order([_msg(4, sseq=40)])
    assert p.next_cseq == 5


def test_a_skipped_consumer_sequence_is_a_lost_delivery() -> None:
    p = _puller(1)
    assert p.in_order([_msg(1)])
    assert not p.in_order([_msg(3)])  # delivery 2 never reached us


def test_a_redelivery_counts_in_the_consumer_sequence() -> None:
    """A redelivered message gets a new consumer sequence: it is in order when nothing was skipped."""
    p = _puller(5)
    assert p.in_order([_msg(5, sseq=2, delivered=2)])


def test_without_a_position_there_is_no_gap_check() -> None:
    assert _puller(None).in_order([_msg(9), _msg(3)])


@pytest.mark.parametrize("exc", [
    Transient("db restarting"), ConnectionRefusedError(), TimeoutError(), nats.errors.TimeoutError(),
    nats.errors.NoRespondersError(), nats.errors.ConnectionReconnectingError(),
    nats.js.errors.ServiceUnavailableError(),
])
def test_server_trouble_is_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [KeyError("row"), ValueError("bad"), AssertionError(), nats.js.errors.BadRequestError(),
                                 nats.errors.ConnectionClosedError()])
def test_bugs_and_bad_input_are_not(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_a_wrapped_connection_error_stays_transient() -> None:
    try:
        try:
            raise ConnectionResetError("peer went away")
        except ConnectionResetError as inner:
            raise RuntimeError("projecting failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)


def test_postgres_away_is_transient_but_client_misuse_is_not() -> None:
    import asyncpg

    assert is_transient(asyncpg.exceptions.CannotConnectNowError("starting up"))
    assert is_transient(asyncpg.exceptions.AdminShutdownError("terminating connection"))
    assert is_transient(asyncpg.InterfaceError("connection is closed"))
    assert not is_transient(asyncpg.exceptions.DataError("invalid input for query argument $1"))
    assert not is_transient(asyncpg.exceptions.UniqueViolationError("duplicate key"))
