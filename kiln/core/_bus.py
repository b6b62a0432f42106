"""The trial process's link to its worker: frames over the allocation's Unix socket, no bus credential.

The worker serves a socket per allocation (``ClusterInfo.link_path``); every report goes there, the worker
checks it is about this trial, stores it in its outbox and replies (schemas.trial frames). Training code
is synchronous, so the client is plain blocking sockets and two daemon threads: one reads replies and stop
requests, one sends training points in batches (every 1 s or 500 points, and at close), so reporting a
point never waits on anything. Batches go out without waiting for each reply (a few in flight); the worker
handles one connection's frames in order, so a reply to frame n means every earlier frame was handled.

The trial holds no store credential either: ``presign`` asks the worker for a short-lived URL for one object
of the cluster's store, ``list_keys`` for the keys of a checkpoint; the worker grants only the trial's own
experiment's checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from schemas import events as ev
from schemas.trial import (
    FrameBuffer,
    FrameError,
    LinkFrame,
    Listed,
    ListRequest,
    Presigned,
    PresignRequest,
    Reply,
    Report,
    StopRequested,
    WatchStops,
    encode_frame,
)

log = logging.getLogger("kiln.core")

FLUSH_POINTS = 500
FLUSH_SECONDS = 1.0
# Metric batches sent and not yet acknowledged before the sender waits (memory stays bounded).
MAX_IN_FLIGHT = 8
# A batch whose JSON is bigger than this is split: a bus message holds at most 1 MiB.
MAX_BATCH_BYTES = 512 * 1024
JSON_GROWTH = 6
# How long a report may wait for the worker's "stored" before it is an error.
REPLY_TIMEOUT_S = 120.0


def _report_frame(event: msgspec.Raw, frame_id: int) -> Report:
    return Report(id=frame_id, event=event)


class LinkError(RuntimeError):
    """The worker refused a report, or the link to it is gone."""


class TrialBus:
    """Publishes a trial's events through its worker and hears the requests addressed to it."""

    def __init__(self, link_path: str, experiment_id: int, trial_id: int, allocation_id: str) -> None:
        self.experiment_id = experiment_id
        self.trial_id = trial_id
        self.allocation_id = allocation_id
        self._encoder = msgspec.msgpack.Encoder()
        self._json = msgspec.json.Encoder()
        self._points: list[ev.MetricPoint] = []
        self._points_lock = threading.Lock()
        self._batch_lock = threading.Lock()  # taking points and sending them is one step: batch ids stay in order
        self._batches = 0
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._sent = 0  # id of the last frame sent
        self._replied = 0  # id of the last reply (replies come in frame order)
        self._awaited: dict[int, str | None] = {}  # ids a caller waits on -> error text once replied
        self._results: dict[int, Presigned | Listed] = {}  # answers to presign and list requests
        self._broken = ""
        self._closing = False
        self._on_stop: Callable[[str], None] | None = None
        self._kick = threading.Event()
        self._sock = _connect(link_path)
        self._reader = threading.Thread(target=self._read_forever, name="kiln-link-reader", daemon=True)
        self._reader.start()
        self._flusher = threading.Thread(target=self._flush_forever, name="kiln-link-flusher", daemon=True)
        self._flusher.start()

    # -- frames ---------------------------------------------------------------------------------

    def _send(self, make: Callable[[int], LinkFrame], awaited: bool) -> int:
        with self._send_lock:
            with self._cond:
                if self._broken:
                    raise LinkError(self._broken)
                frame_id = self._sent + 1
                if awaited:
                    self._awaited[frame_id] = None
            data = encode_frame(make(frame_id))
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._fail(f"link to the worker lost: {exc}")
                raise LinkError(self._broken) from exc
            with self._cond:
                self._sent = frame_id
        return frame_id

    def _wait(self, frame_id: int, timeout: float = REPLY_TIMEOUT_S) -> None:
        """Until the worker replied to ``frame_id``; LinkError if it refused it or the link broke."""
        try:
            self._wait_through(frame_id, timeout)
        finally:
            with self._cond:
                error = self._awaited.pop(frame_id, None)
        if error:
            raise LinkError(error)

    def _read_forever(self) -> None:
        frames = FrameBuffer()
        try:
            while True:
                data = self._sock.recv(1 << 16)
                if not data:
                    break
                for frame in frames.feed(data):
                    self._on_frame(frame)
        except (OSError, FrameError) as exc:
            if not self._closing:
                self._fail(f"link to the worker lost: {exc}")
                return
        self._fail("the worker closed the link")

    def _on_frame(self, frame: LinkFrame) -> None:
        match frame:
            case Reply():
                with self._cond:
                    self._replied = max(self._replied, frame.id)
                    if frame.id in self._awaited:
                        self._awaited[frame.id] = "" if frame.ok else (frame.error or "refused")
                    elif not frame.ok:
                        log.error("the worker refused a report: %s", frame.error)
                    self._cond.notify_all()
            case Presigned() | Listed():
                with self._cond:
                    self._replied = max(self._replied, frame.id)
                    if frame.id in self._awaited:
                        self._awaited[frame.id] = ""
                        self._results[frame.id] = frame
                    self._cond.notify_all()
            case StopRequested():
                if self._on_stop is not None:
                    self._on_stop(frame.reason)
            case _:
                log.warning("unexpected frame from the worker: %s", type(frame).__name__)

    def _fail(self, why: str) -> None:
        with self._cond:
            if not self._broken:
                self._broken = why
            self._cond.notify_all()

    # -- the reporter interface kiln.core uses ----------------------------------------------------

    def publish(self, event: Any) -> None:
        """Send one event and wait until the worker has stored it (LinkError if it refused it)."""
        payload = msgspec.Raw(self._encoder.encode(event))
        self._wait(self._send(lambda i: Report(id=i, event=payload), awaited=True))

    def _ask(self, make: Callable[[int], LinkFrame]) -> Presigned | Listed:
        frame_id = self._send(make, awaited=True)
        try:
            self._wait(frame_id)
        finally:
            with self._cond:
                result = self._results.pop(frame_id, None)
        if result is None:
            raise LinkError("the worker answered without a result")
        return result

    def presign(self, method: str, key: str, bucket: str = "", upload_id: str = "", part_number: int = 0) -> str:
        """A short-lived URL to GET or PUT ``key`` in the cluster's store (``bucket`` "": the cluster's bucket), or
        for a step of a multipart upload of it (schemas.trial.PresignRequest); LinkError if the worker refuses."""
        result = self._ask(lambda i: PresignRequest(id=i, method=method, key=key,  # type: ignore[arg-type]
                                                    bucket=bucket, upload_id=upload_id, part_number=part_number))
        assert isinstance(result, Presigned)
        return result.url

    def list_keys(self, prefix: str, bucket: str = "") -> list[str]:
        """The keys under ``prefix`` (a checkpoint or data table this trial may read); LinkError if the worker
        refuses."""
        result = self._ask(lambda i: ListRequest(id=i, prefix=prefix, bucket=bucket))
        assert isinstance(result, Listed)
        return list(result.keys)

    def add_point(self, point: ev.MetricPoint) -> None:
        """Buffer a training point; a full buffer is sent by the sender thread, without waiting."""
        with self._points_lock:
            self._points.append(point)
            full = len(self._points) >= FLUSH_POINTS
        if full:
            self._kick.set()

    def _send_points(self) -> int:
        """Send the buffered points as batches (a few in flight at most); the last frame id, 0 if none."""
        with self._batch_lock:
            with self._points_lock:
                points, self._points = self._points, []
            last = 0
            for i in range(0, len(points), FLUSH_POINTS):
                for chunk in self._fitting(points[i:i + FLUSH_POINTS]):
                    with self._cond:
                        while self._sent - self._replied >= MAX_IN_FLIGHT and not self._broken:
                            self._cond.wait(1.0)
                    last = self._send(functools.partial(_report_frame, chunk), awaited=False)
            return last

    def _fitting(self, points: list[ev.MetricPoint]) -> list[msgspec.Raw]:
        """``points`` as encoded batches, cut so each fits one bus message.

        The bus carries JSON, at most JSON_GROWTH times the msgpack size (a control character in a text
        metric: 1 byte -> 6), so only a large batch is measured as JSON too.
        """
        batch = ev.TrainingMetricsReported(experiment_id=self.experiment_id, trial_id=self.trial_id,
                                           batch_id=f"{self.allocation_id}:{self._batches + 1}", points=points)
        payload = self._encoder.encode(batch)
        if (len(points) <= 1 or len(payload) * JSON_GROWTH <= MAX_BATCH_BYTES
                or len(self._json.encode(batch)) <= MAX_BATCH_BYTES):
            self._batches += 1
            return [msgspec.Raw(payload)]
        mid = len(points) // 2
        return self._fitting(points[:mid]) + self._fitting(points[mid:])

    def _flush_forever(self) -> None:
        while not self._closing:
            self._kick.wait(FLUSH_SECONDS)
            self._kick.clear()
            if self._closing:
                return
            try:
                self._send_points()
            except LinkError as exc:
                log.error("training metrics not sent: %s", exc)
                return

    def flush(self) -> None:
        """Send buffered points and wait until the worker stored them (before a validation, so order holds)."""
        self._send_points()
        with self._cond:
            through = self._sent
        if through:
            self._wait_through(through)

    def _wait_through(self, frame_id: int, timeout: float = REPLY_TIMEOUT_S) -> None:
        """Until the worker replied to every frame up to ``frame_id``; LinkError if the link broke."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._replied < frame_id:
                if self._broken:
                    raise LinkError(self._broken)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LinkError(f"no reply from the worker in {timeout:.0f} s")
                self._cond.wait(left)

    def watch_stop(self, on_stop: Callable[[str], None]) -> None:
        """Call ``on_stop(reason)`` (from the reader thread) when the platform asks this trial to stop."""
        self._on_stop = on_stop
        self._wait(self._send(lambda i: WatchStops(id=i), awaited=True))

    def close(self) -> None:
        """Send what is buffered, wait until it is stored, and close the link."""
        if self._closing:
            return
        try:
            self.flush()
        except LinkError as exc:
            log.error("training metrics not stored at close: %s", exc)
        finally:
            self._closing = True
            self._kick.set()
            self._flusher.join(timeout=5.0)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._reader.join(timeout=5.0)


def _connect(path: str, timeout: float = 10.0) -> socket.socket:
    """Connect to the worker's socket (it listens before the trial starts; retry briefly anyway)."""
    if not path:
        raise LinkError("no link to the worker in the cluster info (a worker older than this kiln?)")
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise LinkError(f"cannot reach the worker at {path}: {exc}") from exc
            time.sleep(0.1)
