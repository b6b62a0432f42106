"""The trial → worker link without sockets: the frame codec and what a trial may report."""

from __future__ import annotations

import msgspec
import pytest

from schemas import events as ev
from schemas.trial import (
    FRAME_HEADER,
    MAX_FRAME_BYTES,
    FrameBuffer,
    FrameError,
    Reply,
    Report,
    StopRequested,
    WatchStops,
    decode_frame,
    encode_frame,
    frame_length,
)
from services.worker.link import Identity, refusal, stop_reason

WHO = Identity(experiment_id=3, trial_id=7, allocation_id="7.2")


def _report(event: object, frame_id: int = 1) -> Report:
    return Report(id=frame_id, event=msgspec.Raw(msgspec.msgpack.encode(event)))


def test_frames_round_trip() -> None:
    event = ev.TrialProgressReported(experiment_id=3, trial_id=7, progress=0.25)
    for frame in (_report(event), WatchStops(id=2), Reply(id=3, ok=False, error="no"), StopRequested(reason="r")):
        data = encode_frame(frame)
        assert frame_length(data[: FRAME_HEADER.size]) == len(data) - FRAME_HEADER.size
        back = decode_frame(data[FRAME_HEADER.size:])
        assert type(back) is type(frame)
    got = decode_frame(encode_frame(_report(event))[FRAME_HEADER.size:])
    assert isinstance(got, Report)
    assert msgspec.msgpack.decode(got.event, type=ev.DomainEvent) == event


def test_a_byte_stream_is_cut_into_frames_whatever_the_chunks() -> None:
    frames = [Reply(id=i) for i in range(1, 6)] + [StopRequested(reason="searcher stopped it")]
    data = b"".join(encode_frame(f) for f in frames)
    for chunk in (1, 3, 7, len(data)):
        buf = FrameBuffer()
        got = []
        for i in range(0, len(data), chunk):
            got += buf.feed(data[i:i + chunk])
        assert got == frames


def test_an_oversized_or_undecodable_frame_is_refused() -> None:
    with pytest.raises(FrameError, match="limit"):
        frame_length(FRAME_HEADER.pack(MAX_FRAME_BYTES + 1))
    with pytest.raises(FrameError, match="not a link frame"):
        decode_frame(b"\x81\xa4type\xa7NoSuchX")
    with pytest.raises(FrameError):
        FrameBuffer().feed(FRAME_HEADER.pack(3) + b"\xc1\xc1\xc1")


# --- what a trial may report ---------------------------------------------------------------------

ALLOWED = [
    ev.TrainingMetricsReported(experiment_id=3, trial_id=7, batch_id="7.2:1", points=[]),
    ev.ValidationReported(experiment_id=3, trial_id=7, steps_completed=10, metrics={"loss": 0.5}),
    ev.CheckpointStored(experiment_id=3, trial_id=7, uuid="u", steps_completed=10, storage="s3://kiln/x"),
    ev.TrialProgressReported(experiment_id=3, trial_id=7, progress=0.5),
]


@pytest.mark.parametrize("event", ALLOWED, ids=lambda e: type(e).__name__)
def test_a_trial_may_report_its_own_metrics_validations_checkpoints_progress(event: object) -> None:
    assert refusal(WHO, event) == ""


@pytest.mark.parametrize(("event", "why"), [
    (ev.ValidationReported(experiment_id=3, trial_id=8, steps_completed=1, metrics={}), "trial 8"),
    (ev.CheckpointStored(experiment_id=4, trial_id=7, uuid="u", steps_completed=1, storage="s"), "experiment 4"),
    (ev.TrainingMetricsReported(experiment_id=3, trial_id=7, batch_id="7.1:1", points=[]), "allocation 7.2"),
    (ev.AllocationExited(experiment_id=3, trial_id=7, allocation_id="7.2", worker_id="w", exit_code=0,
                         exited_at=0.0), "may not publish AllocationExited"),
    (ev.TrialExited(experiment_id=3, trial_id=7, state="COMPLETED"), "may not publish TrialExited"),
    (ev.ExperimentKillRequested(experiment_id=3), "may not publish ExperimentKillRequested"),
    (ev.LogsShipped(experiment_id=3, trial_id=7, allocation_id="7.2", lines=[]), "may not publish LogsShipped"),
], ids=lambda x: type(x).__name__ if not isinstance(x, str) else "")
def test_anything_else_is_refused_with_why(event: object, why: str) -> None:
    assert why in refusal(WHO, event)


def test_stop_requests_for_the_trial_and_preemptions_of_this_run_reach_it() -> None:
    assert stop_reason(WHO, ev.TrialStopRequested(experiment_id=3, trial_id=7, reason="done")) == "done"
    preempt = ev.TrialPreemptRequested(experiment_id=3, trial_id=7, allocation_id="7.2", reason="")
    assert stop_reason(WHO, preempt) == "the scheduler needs this trial's slots"
    assert stop_reason(WHO, msgspec.structs.replace(preempt, allocation_id="7.1")) is None  # an earlier run's
    assert stop_reason(WHO, ev.TrialProgressReported(experiment_id=3, trial_id=7, progress=0.1)) is None
