"""Outside subscribers: the read-only ``reader`` credential and examples/subscribe_metrics.py, on a real NATS.

The shared ``parts`` NATS has no restricted user, so this module starts its own NATS (only NATS) from
``parts_config_factory`` with the stack's real ``reader`` permissions (deploy.stack.user_permissions).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from deploy import parts as p
from deploy import stack
from schemas import events as ev
from schemas import subjects
from services.runtime import Bus, BusSettings, connect_bus

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "subscribe_metrics.py"
USERS = {"writer": "writer-secret", "reader": "reader-secret-\"$'"}


class ReaderNats:
    """A NATS with a full-rights ``writer`` and the stack's read-only ``reader``."""

    def __init__(self, cfg: p.PartsConfig) -> None:
        self.cfg = cfg
        self.url = f"nats://{cfg.host}:{cfg.nats_port}"

    def settings(self, user: str) -> BusSettings:
        return BusSettings(nats_url=self.url, nats_user=user, nats_password=USERS[user])


@pytest.fixture(scope="module")
def reader_nats(parts_config_factory: Callable[[Path], p.PartsConfig]) -> Iterator[ReaderNats]:
    state_dir = Path(tempfile.mkdtemp(prefix="kiln-subscribers-"))
    cfg = msgspec.structs.replace(
        parts_config_factory(state_dir),
        nats_users=dict(USERS),
        nats_permissions={"reader": stack.user_permissions("reader")},
    )
    part = p.start_nats(cfg)
    try:
        yield ReaderNats(cfg)
    finally:
        part.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


def _exp() -> int:
    return 600_000 + uuid.uuid4().int % 300_000


async def _reader(rn: ReaderNats, errors: list[str]) -> NatsClient:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(rn.url, user="reader", password=USERS["reader"], error_cb=on_error,
                              allow_reconnect=False, connect_timeout=5)


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def _stored(bus: Bus, stream: str, subject: str) -> int:
    info = await bus.js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


def _batches(e: int, t: int, n_batches: int, per_batch: int) -> list[ev.TrainingMetricsReported]:
    return [
        ev.TrainingMetricsReported(
            experiment_id=e, trial_id=t, batch_id=f"run0-{b}",
            points=[ev.MetricPoint(steps_completed=b * per_batch + i, metrics={"loss": 1.0 / (1 + b * per_batch + i)},
                                   reported_at=1000.0 + b * per_batch + i)
                    for i in range(per_batch)],
        )
        for b in range(n_batches)
    ]


async def test_the_reader_credential_is_refused_when_it_publishes(reader_nats: ReaderNats) -> None:
    """Core and JetStream publishes by the reader are refused and never land in a stream."""
    e = _exp()
    event = _batches(e, 1, 1, 3)[0]
    subject = subjects.subject_for(event, worker_id="worker-0")
    errors: list[str] = []
    async with connect_bus(reader_nats.settings("writer"), "test-writer") as writer:
        reader = await _reader(reader_nats, errors)
        try:
            await reader.publish(subject, msgspec.json.encode(event))
            await reader.flush()
            await _until(lambda: any("permissions violation for publish" in m.lower() for m in errors))
            assert subject in " ".join(errors)

            # A JetStream publish is a request to the stream's subject: refused, so no ack ever comes.
            js = reader.jetstream(timeout=1.0)
            with pytest.raises(nats.errors.TimeoutError):
                await js.publish(subject, msgspec.json.encode(event),
                                 headers={"Nats-Msg-Id": subjects.dedupe_key(event)})
            # Nor can it reach the JetStream API (every $JS.API call is a publish): no stream edits, no deletes.
            with pytest.raises(nats.errors.TimeoutError):
                await js.delete_stream(subjects.METRICS.name)
            domain = ev.ExperimentKillRequested(experiment_id=e)
            await reader.publish(subjects.subject_for(domain), msgspec.json.encode(domain))
            await reader.flush()

            # Subscribing outside metrics and domain events is refused too.
            await reader.subscribe(f"kiln.logs.{e}.>")
            await reader.flush()
            await _until(lambda: any("permissions violation for subscription" in m.lower() for m in errors))
            assert reader.is_connected, "a refused publish does not cost the reader its connection"
        finally:
            await reader.close()
        await asyncio.sleep(0.2)
        assert await _stored(writer, subjects.METRICS.name, f"kiln.metrics.{e}.>") == 0
        assert await _stored(writer, subjects.EVENTS.name, f"kiln.events.{e}.>") == 0
        # The same publish by a writer does land: the refusal is the credential, not the message.
        await writer.publish(event)
        assert await _stored(writer, subjects.METRICS.name, f"kiln.metrics.{e}.>") == 1


async def test_the_reader_receives_every_point_of_a_trial_in_order(reader_nats: ReaderNats) -> None:
    """Live core subscriptions see each stored batch as it is published, nothing lost, nothing reordered."""
    e, t, other = _exp(), 7, 8
    got: list[ev.MetricPoint] = []
    validations: list[ev.ValidationReported] = []
    metric_decoder = msgspec.json.Decoder(ev.MetricEvent)
    event_decoder = msgspec.json.Decoder(ev.DomainEvent)

    async def on_metrics(msg: Msg) -> None:
        batch = metric_decoder.decode(msg.data)
        assert (batch.experiment_id, batch.trial_id) == (e, t)
        got.extend(batch.points)

    async def on_event(msg: Msg) -> None:
        event = event_decoder.decode(msg.data)
        if isinstance(event, ev.ValidationReported):
            validations.append(event)

    errors: list[str] = []
    reader = await _reader(reader_nats, errors)
    try:
        await reader.subscribe(subjects.metrics_filter(e, t), cb=on_metrics)
        await reader.subscribe(subjects.trial_filter(e, t), cb=on_event)
        await reader.flush()
        mine, theirs = _batches(e, t, 40, 25), _batches(e, other, 40, 25)
        async with connect_bus(reader_nats.settings("writer"), "test-writer") as writer:
            for a, b in zip(mine, theirs, strict=True):  # another trial interleaved: filtered out by subject
                await writer.publish(a)
                await writer.publish(b)
            await writer.publish(ev.ValidationReported(experiment_id=e, trial_id=t, steps_completed=999,
                                                       metrics={"accuracy": 0.9}))
            await _until(lambda: len(got) >= 1000 and len(validations) >= 1)
            assert await _stored(writer, subjects.METRICS.name, subjects.metrics_filter(e, t)) == 40
        await asyncio.sleep(0.2)
        assert [pt.steps_completed for pt in got] == list(range(1000))
        assert got == [pt for batch in mine for pt in batch.points]
        assert [v.steps_completed for v in validations] == [999]
        assert errors == []
    finally:
        await reader.close()


async def _example(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    # Points are live: publish only once the script says its subscriptions are in place.
    ready = await asyncio.wait_for(proc.stderr.readline(), timeout=20)
    assert b"listening on" in ready, ready
    return proc


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


async def test_the_example_script_prints_every_point_of_a_trial(reader_nats: ReaderNats) -> None:
    """examples/subscribe_metrics.py with the reader credential from the environment prints N lines in order."""
    e, t = _exp(), 3
    env = _env(KILN_NATS_URL=reader_nats.url, KILN_NATS_USER="reader", KILN_NATS_PASSWORD=USERS["reader"])
    proc = await _example(env, "--experiment", str(e), "--trial", str(t), "--count", "60")
    async with connect_bus(reader_nats.settings("writer"), "test-writer") as writer:
        await writer.publish_many(_batches(e, t + 1, 2, 10))  # another trial: not printed
        await writer.publish_many(_batches(e, t, 6, 10))
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 60
    for step, text in enumerate(lines):
        assert text == f"experiment {e} trial {t} training step {step} loss={1.0 / (1 + step)}"


async def test_the_example_script_reads_a_stack_state_dir_and_skips_what_it_cannot_decode(
    reader_nats: ReaderNats, tmp_path: Path
) -> None:
    """--state-dir takes the reader credential from credentials.json; --json prints one object per point;
    a message of a type it does not know is skipped, not fatal."""
    e, t = _exp(), 5
    cfg = reader_nats.cfg
    (tmp_path / "credentials.json").write_text(json.dumps({
        "nats": {"reader": USERS["reader"], "writer": "not-used"}, "pg_password": "x", "s3_access_key": "x",
        "s3_secret_key": "x",
    }))
    (tmp_path / "stack.json").write_text(json.dumps({"host": cfg.host, "nats_port": cfg.nats_port}))
    proc = await _example(_env(), "--state-dir", str(tmp_path), "--experiment", str(e), "--count", "4", "--json")
    async with connect_bus(reader_nats.settings("writer"), "test-writer") as writer:
        await writer.publish_many(_batches(e, t, 1, 3))
        unknown = {"type": "TrialValidated", "experiment_id": e, "trial_id": t, "step": 3, "metrics": {"acc": 0.1}}
        await writer.js.publish(f"kiln.events.{e}.trial.{t}.w-worker-0", json.dumps(unknown).encode())
        validation = ev.ValidationReported(experiment_id=e, trial_id=t, steps_completed=3, metrics={"acc": 0.5})
        await writer.js.publish(f"kiln.events.{e}.trial.{t}.w-worker-0", msgspec.json.encode(validation))
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    assert "skipping undecodable message" in err.decode() and "TrialValidated" in err.decode()
    rows = [json.loads(row) for row in out.decode().splitlines()]
    assert [(r["kind"], r["steps_completed"]) for r in rows] == [
        ("training", 0), ("training", 1), ("training", 2), ("validation", 3)
    ]
    assert rows[3] == {"experiment_id": e, "trial_id": t, "kind": "validation", "steps_completed": 3,
                       "metrics": {"acc": 0.5}, "reported_at": 0.0}
    assert rows[0]["reported_at"] == 1000.0
