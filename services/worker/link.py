"""The trial → worker link: one Unix socket per allocation, the trial's only way to report.

The trial process holds no bus credential. It sends ``Report`` frames (schemas.trial) over a socket the
worker serves in the allocation's work dir (a 0700 directory, the socket 0600). The worker stamps the
trial's identity: an event about another experiment, trial or allocation, or of a type a trial does not
report, is refused with an error reply and logged; anything else goes to the outbox and is acknowledged
once it is on disk. Stop and preempt requests come back over the same socket: the worker watches the
trial's subject with its own credential and pushes ``StopRequested`` frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from schemas import events as ev
from schemas.subjects import EVENTS, trial_filter
from schemas.trial import (
    FRAME_HEADER,
    FrameError,
    LinkFrame,
    Reply,
    Report,
    StopRequested,
    WatchStops,
    decode_frame,
    encode_frame,
    frame_length,
)

log = structlog.get_logger(__name__)

# What a trial process reports (kiln.core): everything else about a run is the worker's to say.
TRIAL_REPORTS: tuple[type, ...] = (
    ev.TrainingMetricsReported,
    ev.ValidationReported,
    ev.CheckpointStored,
    ev.TrialProgressReported,
)
# sun_path holds 108 bytes with the terminating NUL.
_MAX_SOCKET_PATH = 107
# How long a closing link waits for a dead trial's last frames (still in the socket buffer).
CLOSE_GRACE_S = 5.0

_ANY_EVENT = msgspec.msgpack.Decoder(ev.DomainEvent | ev.MetricEvent | ev.LogEvent | ev.DeadLetterEvent)

Append = Callable[[Any], Awaitable[object]]
OnStop = Callable[[str], None]


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """Whose link this is: the one run a trial process may report about."""

    experiment_id: int
    trial_id: int
    allocation_id: str


# Runs until cancelled, calling on_stop(reason) for each stop or preempt request addressed to the run.
StopWatcher = Callable[[Identity, OnStop], Awaitable[None]]


def refusal(who: Identity, event: Any) -> str:
    """Why the trial ``who`` may not report ``event``; "" when it may."""
    kind = type(event).__name__
    if not isinstance(event, TRIAL_REPORTS):
        return f"a trial may not publish {kind}"
    if event.experiment_id != who.experiment_id or event.trial_id != who.trial_id:
        return (f"{kind} for experiment {event.experiment_id} trial {event.trial_id}: this link is experiment "
                f"{who.experiment_id} trial {who.trial_id}")
    if isinstance(event, ev.TrainingMetricsReported) and not event.batch_id.startswith(f"{who.allocation_id}:"):
        # The batch id is the dedupe key: one run must not be able to shadow another run's batches.
        return f"metric batch {event.batch_id!r} is not of allocation {who.allocation_id}"
    return ""


def stop_reason(who: Identity, event: Any) -> str | None:
    """The reason to push to the trial if ``event`` asks this run to stop, else None."""
    if isinstance(event, ev.TrialStopRequested):
        return event.reason or "the searcher stopped the trial"
    if isinstance(event, ev.TrialPreemptRequested) and event.allocation_id == who.allocation_id:
        return event.reason or "the scheduler needs this trial's slots"
    return None


def socket_path(alloc_dir: Path) -> Path:
    """Where an allocation's link listens: in its work dir, or a private temp dir if that path is too long."""
    path = alloc_dir / ".kiln-link" / "sock"
    if len(str(path).encode()) <= _MAX_SOCKET_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="kiln-link-")) / "sock"


class TrialLink:
    """Serves one allocation's socket: reports in (checked, then to the outbox), stop requests out."""

    def __init__(self, path: Path, who: Identity, append: Append, watch: StopWatcher) -> None:
        self.path = path
        self.who = who
        self._append = append
        self._watch = watch
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._watchers: set[asyncio.StreamWriter] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._stops: list[str] = []
        self.refused = 0

    async def start(self) -> None:
        """Listen on ``path`` (its directory 0700, the socket 0600)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.parent.chmod(0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        self.path.chmod(0o600)

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Stop listening; let open connections finish what the trial already sent, then end them."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._handlers:
            # The trial has exited: its last frames are in the socket buffer, then EOF.
            await asyncio.wait(set(self._handlers), timeout=grace_s)
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    body = await reader.readexactly(frame_length(await reader.readexactly(FRAME_HEADER.size)))
                except asyncio.IncompleteReadError:
                    return  # the trial closed the link (or exited)
                reply = await self._handle(decode_frame(body), writer)
                writer.write(encode_frame(reply))
                await writer.drain()
        except FrameError as exc:
            log.warning("link.bad_frame", allocation=self.who.allocation_id, error=str(exc))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._watchers.discard(writer)
            self._handlers.discard(task)
            writer.close()

    async def _handle(self, frame: LinkFrame, writer: asyncio.StreamWriter) -> Reply:
        match frame:
            case Report():
                return await self._report(frame)
            case WatchStops():
                self._watchers.add(writer)
                for reason in self._stops:  # seen before this connection asked
                    writer.write(encode_frame(StopRequested(reason=reason)))
                if self._watch_task is None:
                    self._watch_task = asyncio.create_task(self._watch(self.who, self._on_stop))
                return Reply(id=frame.id)
            case Reply() | StopRequested():
                return Reply(id=getattr(frame, "id", 0), ok=False,
                             error=f"{type(frame).__name__} is the worker's frame")

    async def _report(self, frame: Report) -> Reply:
        try:
            event = _ANY_EVENT.decode(frame.event)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.refused += 1
            log.warning("link.refused", allocation=self.who.allocation_id, error=f"undecodable event: {exc}")
            return Reply(id=frame.id, ok=False, error=f"undecodable event: {exc}")
        why = refusal(self.who, event)
        if why:
            self.refused += 1
            log.warning("link.refused", allocation=self.who.allocation_id, kind=type(event).__name__, error=why)
            return Reply(id=frame.id, ok=False, error=why)
        try:
            await self._append(event)
        except Exception as exc:  # noqa: BLE001 - the trial hears why; the worker keeps serving
            log.error("link.append_failed", allocation=self.who.allocation_id, kind=type(event).__name__,
                      error=repr(exc))
            return Reply(id=frame.id, ok=False, error=str(exc))
        return Reply(id=frame.id)

    def _on_stop(self, reason: str) -> None:
        if reason in self._stops:
            return
        self._stops.append(reason)
        data = encode_frame(StopRequested(reason=reason))
        for writer in list(self._watchers):
            with contextlib.suppress(Exception):
                writer.write(data)


def bus_stop_watcher(js: Any) -> StopWatcher:
    """Watch a trial's subject on JetStream with the worker's own credential (an ordered consumer)."""
    decoder = msgspec.json.Decoder(ev.DomainEvent)

    async def watch(who: Identity, on_stop: OnStop) -> None:
        async def on_msg(msg: Any) -> None:
            try:
                event = decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return
            reason = stop_reason(who, event)
            if reason is not None:
                on_stop(reason)

        delay = 0.5
        while True:
            try:
                # From the start of the trial's subject: a stop decided before this run began still counts.
                sub = await js.subscribe(trial_filter(who.experiment_id, who.trial_id), stream=EVENTS.name,
                                         cb=on_msg, ordered_consumer=True)
                break
            except Exception as exc:  # noqa: BLE001 - the bus may be away; keep trying while the run lasts
                log.warning("link.watch_retry", allocation=who.allocation_id, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        try:
            await asyncio.Event().wait()  # until the link closes
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    return watch
