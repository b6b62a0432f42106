"""Reading a JetStream message's position off its ack subject, as replay and the tracker do."""

from __future__ import annotations

import pytest

from services.runtime import AckPosition, ack_position


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        # v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>
        ("$JS.ACK.KILN_EVENTS.c1.1.42.7.1795520256562308681.99", AckPosition(42, 1795520256.5623088, 99)),
        # v2 adds a domain and an account hash, and may end with a random token
        ("$JS.ACK.hub.ACCHASH.KILN_EVENTS.c1.3.42.7.1795520256000000000.0.tok",
         AckPosition(42, 1795520256.0, 0)),
        ("$JS.ACK.hub.ACCHASH.KILN_EVENTS.c1.3.43.8.1795520257000000000.5",
         AckPosition(43, 1795520257.0, 5)),
    ],
)
def test_positions_from_v1_and_v2_ack_subjects(reply: str, expected: AckPosition) -> None:
    got = ack_position(reply)
    assert got.stream_seq == expected.stream_seq
    assert got.num_pending == expected.num_pending
    assert got.timestamp == pytest.approx(expected.timestamp, abs=1e-6)


@pytest.mark.parametrize("reply", ["_INBOX.abc", "$JS.ACK.too.short", "a.b.c.d.e.f.g.h.i.j.k", "$JS.ACK.S.c.1.x.7.1.0"])
def test_a_subject_that_is_not_an_ack_is_refused(reply: str) -> None:
    with pytest.raises(ValueError, match="not a JetStream ack subject"):
        ack_position(reply)


def test_the_consumer_sequence_and_delivery_count_are_read_too() -> None:
    got = ack_position("$JS.ACK.KILN_EVENTS.c1.3.42.7.1795520256562308681.99")
    assert (got.delivered, got.stream_seq, got.consumer_seq) == (3, 42, 7)
    got = ack_position("$JS.ACK.hub.ACCHASH.KILN_EVENTS.c1.2.43.8.1795520257000000000.5")
    assert (got.delivered, got.stream_seq, got.consumer_seq) == (2, 43, 8)
