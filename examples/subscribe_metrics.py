"""Print a Kiln stack's metrics live, as an outside system would read them: read-only, from the bus.

Connects with the ``reader`` NATS credential (it may subscribe to ``kiln.metrics.>`` and
``kiln.events.>`` and publish nothing), subscribes to

    kiln.metrics.<experiment|*>.<trial|*>.*          TrainingMetricsReported: batches of training points
    kiln.events.<experiment|*>.trial.<trial|*>.*     ValidationReported (and the trial's other facts)

(the last token names the publisher: ``w-<worker id>`` for a trial's facts) and prints one line per metric
point, skipping any event its subject's publisher may not publish (``schemas.subjects.forged``).
Messages are decoded with the event definitions in ``schemas``
(JSON Schema for other languages: ``schemas/json/``). These are live core-NATS subscriptions: points
published before it starts are not replayed (the gateway's HTTP API serves history).

Credentials: ``--state-dir`` (a local stack's ``.kiln``: ``credentials.json`` and ``stack.json``), else
``KILN_NATS_URL``/``KILN_NATS_USER``/``KILN_NATS_PASSWORD``, else ``$KILN_STATE_DIR`` or ``./.kiln``.

    python examples/subscribe_metrics.py --state-dir .kiln --experiment 3 --count 100
    python examples/subscribe_metrics.py --json | jq .
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec
import nats

from schemas import events as ev
from schemas import ports
from schemas.subjects import forged

READER_USER = "reader"


class Point(msgspec.Struct, frozen=True, kw_only=True):
    """One printed line: a training or validation metric point of one trial."""

    experiment_id: int
    trial_id: int
    kind: str  # "training" | "validation"
    steps_completed: int
    metrics: dict[str, ev.MetricValue]
    reported_at: float


def connection(args: argparse.Namespace) -> tuple[str, str, str]:
    """(url, user, password): from --state-dir, else the KILN_NATS_* environment, else the default state dir."""
    if args.state_dir is None and os.environ.get("KILN_NATS_USER"):
        url = os.environ.get("KILN_NATS_URL", ports.NATS_URL)
        return url, os.environ["KILN_NATS_USER"], os.environ.get("KILN_NATS_PASSWORD", "")
    state_dir = Path(args.state_dir or os.environ.get("KILN_STATE_DIR", ".kiln"))
    creds_path = state_dir / "credentials.json"
    try:
        password = json.loads(creds_path.read_text())["nats"][READER_USER]
    except FileNotFoundError:
        raise SystemExit(f"no {creds_path}: pass --state-dir of a running stack or set KILN_NATS_*") from None
    except KeyError:
        raise SystemExit(f"{creds_path} has no {READER_USER!r} user: restart the stack (kiln down; kiln up)") from None
    stack_path = state_dir / "stack.json"
    stack = json.loads(stack_path.read_text()) if stack_path.exists() else {}
    host, port = stack.get("host", ports.HOST), stack.get("nats_port", ports.NATS_PORT)
    url = os.environ.get("KILN_NATS_URL") or f"nats://{host}:{port}"
    return url, READER_USER, password


def subjects(experiment: int | None, trial: int | None) -> tuple[str, str]:
    """The metrics and trial-event subjects for an experiment/trial filter (None: every one)."""
    exp = "*" if experiment is None else str(experiment)
    tri = "*" if trial is None else str(trial)
    return f"kiln.metrics.{exp}.{tri}.*", f"kiln.events.{exp}.trial.{tri}.*"


def points(event: Any) -> list[Point]:
    """The metric points an event carries (none for the trial's other facts)."""
    match event:
        case ev.TrainingMetricsReported():
            return [
                Point(experiment_id=event.experiment_id, trial_id=event.trial_id, kind="training",
                      steps_completed=p.steps_completed, metrics=p.metrics, reported_at=p.reported_at)
                for p in event.points
            ]
        case ev.ValidationReported():
            return [Point(experiment_id=event.experiment_id, trial_id=event.trial_id, kind="validation",
                          steps_completed=event.steps_completed, metrics=event.metrics,
                          reported_at=event.reported_at)]
        case _:
            return []


def line(point: Point, as_json: bool) -> str:
    """One output line for a point."""
    if as_json:
        return msgspec.json.encode(point).decode()
    values = " ".join(f"{k}={v}" for k, v in sorted(point.metrics.items()))
    return (f"experiment {point.experiment_id} trial {point.trial_id} {point.kind} "
            f"step {point.steps_completed} {values}")


async def run(args: argparse.Namespace) -> int:
    """Subscribe, print points until --count is reached or a signal arrives."""
    url, user, password = connection(args)
    metrics_subject, events_subject = subjects(args.experiment, args.trial)
    # One decoder per stream, reused.
    metric_decoder = msgspec.json.Decoder(ev.MetricEvent)
    event_decoder = msgspec.json.Decoder(ev.DomainEvent)
    # Both subscriptions feed one queue, so lines come out in the order messages arrived.
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def on_msg(msg: Any) -> None:
        await queue.put((msg.subject, msg.data))

    async def on_error(exc: Exception) -> None:
        print(f"nats: {exc}", file=sys.stderr, flush=True)

    # The reader may subscribe to its own inbox prefix only (no one hears another's replies).
    nc = await nats.connect(servers=[url], user=user, password=password, name="subscribe_metrics",
                            inbox_prefix=f"_INBOX_{user}", error_cb=on_error, max_reconnect_attempts=-1,
                            connect_timeout=5)
    try:
        await nc.subscribe(metrics_subject, cb=on_msg)
        await nc.subscribe(events_subject, cb=on_msg)
        await nc.flush()  # the server has both subscriptions: every point published from now on arrives
        print(f"listening on {metrics_subject} and {events_subject} as {user!r}", file=sys.stderr, flush=True)
        printed = 0
        stopping = asyncio.ensure_future(stop.wait())
        while args.count is None or printed < args.count:
            getting = asyncio.ensure_future(queue.get())
            await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                break
            subject, data = getting.result()
            decoder = metric_decoder if subject.startswith("kiln.metrics.") else event_decoder
            try:
                event = decoder.decode(data)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                # A newer event type than this script knows, or garbage: skip it, never stop.
                print(f"skipping undecodable message on {subject}: {exc}", file=sys.stderr, flush=True)
                continue
            why = forged(subject, event)
            if why is not None:
                print(f"skipping {why}", file=sys.stderr, flush=True)
                continue
            for point in points(event):
                print(line(point, args.json), flush=True)
                printed += 1
                if args.count is not None and printed >= args.count:
                    break
        stopping.cancel()
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and print live metric points."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, help="a local stack's state dir (reads the reader credential)")
    parser.add_argument("--experiment", type=int, help="only this experiment (default: all)")
    parser.add_argument("--trial", type=int, help="only this trial (default: all)")
    parser.add_argument("--count", type=int, help="stop after this many points (default: run until Ctrl-C)")
    parser.add_argument("--json", action="store_true", help="one JSON object per point instead of text")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
