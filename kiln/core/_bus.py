"""The trial process's link to the bus: a private event loop in a daemon thread.

Training code is synchronous; nats-py is asyncio. Calls hop onto the loop with
``run_coroutine_threadsafe``. Training metrics are buffered and sent in batches (by size and time, and
at close), so reporting a point never waits on the network.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import nats

from schemas import events as ev
from schemas.subjects import EVENTS, dedupe_key, subject_for, trial_filter

FLUSH_POINTS = 500
FLUSH_SECONDS = 1.0


class TrialBus:
    """Publishes a trial's events and watches for requests addressed to it."""

    def __init__(self, url: str, user: str, password: str, experiment_id: int, trial_id: int,
                 allocation_id: str) -> None:
        self.experiment_id = experiment_id
        self.trial_id = trial_id
        self.allocation_id = allocation_id
        self._encoder = msgspec.json.Encoder()
        self._points: list[ev.MetricPoint] = []
        self._batches = 0
        self._points_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kiln-bus", daemon=True)
        self._thread.start()
        self._nc: Any = None
        self._flusher: Any = None
        self._call(self._connect(url, user, password))

    def _call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _connect(self, url: str, user: str, password: str) -> None:
        options: dict[str, Any] = {"servers": [url], "name": f"trial-{self.trial_id}",
                                   "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5}
        if user:
            options.update(user=user, password=password)
        self._nc = await nats.connect(**options)
        self._js = self._nc.jetstream()
        self._flusher = asyncio.ensure_future(self._flush_periodically())

    async def _publish(self, event: Any) -> None:
        await self._js.publish(subject_for(event), self._encoder.encode(event),
                               headers={"Nats-Msg-Id": dedupe_key(event)})

    def publish(self, event: Any) -> None:
        """Publish one event and wait for JetStream's ack."""
        self._call(self._publish(event))

    def add_point(self, point: ev.MetricPoint) -> None:
        """Buffer a training point; a full buffer is sent without waiting."""
        with self._points_lock:
            self._points.append(point)
            full = len(self._points) >= FLUSH_POINTS
        if full:
            asyncio.run_coroutine_threadsafe(self._flush(), self._loop)

    async def _flush(self) -> None:
        with self._points_lock:
            points, self._points = self._points, []
            if not points:
                return
            self._batches += 1
            batch_id = f"{self.allocation_id}:{self._batches}"
        await self._publish(ev.TrainingMetricsReported(experiment_id=self.experiment_id, trial_id=self.trial_id,
                                                       batch_id=batch_id, points=points))

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self._flush()

    def flush(self) -> None:
        """Send buffered points now (before a validation, so the order on the read side holds)."""
        self._call(self._flush())

    def watch_stop(self, on_stop: Callable[[str], None]) -> None:
        """Call ``on_stop(reason)`` when a stop request for this trial appears on the bus."""
        decoder = msgspec.json.Decoder(ev.DomainEvent)

        async def on_msg(msg: Any) -> None:
            try:
                event = decoder.decode(msg.data)
            except msgspec.DecodeError:
                return
            if isinstance(event, ev.TrialStopRequested):
                on_stop(event.reason)
            elif isinstance(event, ev.TrialPreemptRequested) and event.allocation_id == self.allocation_id:
                on_stop(event.reason or "the scheduler needs this trial's slots")

        async def subscribe() -> None:
            # Ordered (ephemeral, flow-controlled) consumer over this trial's facts, from the start:
            # a stop decided before this run started must still be seen.
            await self._js.subscribe(trial_filter(self.experiment_id, self.trial_id), stream=EVENTS.name,
                                     cb=on_msg, ordered_consumer=True)

        self._call(subscribe())

    async def _shutdown(self) -> None:
        await self._nc.drain()
        # nats-py leaves helper tasks (flow control, activity checks) behind; end them quietly.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def close(self) -> None:
        """Flush, drain and stop the loop thread."""
        if self._nc is None:
            return
        try:
            if self._flusher is not None:
                self._loop.call_soon_threadsafe(self._flusher.cancel)
            self._call(self._flush())
            self._call(self._shutdown(), timeout=15.0)
        finally:
            self._nc = None
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5.0)


def now() -> float:
    """Timestamp for reports."""
    return time.time()
