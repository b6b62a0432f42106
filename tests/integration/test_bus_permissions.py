"""Least privilege on the bus: each attack found with the old all-powerful credentials, tried again.

A NATS of its own with the stack's real users and permissions (deploy.stack.nats_users / nats_permissions,
two workers), its streams and buckets made by the admin bootstrap as `kiln up` does. Every attempt below
must be refused (a permissions violation, hence no answer) and change nothing in the streams.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient

from deploy import parts as p
from deploy import stack
from schemas import events as ev
from schemas import subjects
from services import runtime
from services.runtime import Bus, BusSettings, ConsumerSpec, Delivery, connect_bus

pytestmark = pytest.mark.integration

USERS = {user: f"secret-{user}" for user in stack.nats_users(2)}
# What a refused request looks like: no answer (the server drops a publish the user may not make).
REFUSED = (nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError)


class Net:
    """The NATS under test."""

    def __init__(self, cfg: p.PartsConfig) -> None:
        self.url = f"nats://{cfg.host}:{cfg.nats_port}"

    def settings(self, user: str) -> BusSettings:
        return BusSettings(nats_url=self.url, nats_user=user, nats_password=USERS[user])


@pytest.fixture(scope="module")
def net(parts_config_factory: Callable[[Path], p.PartsConfig]) -> Iterator[Net]:
    state_dir = Path(tempfile.mkdtemp(prefix="kiln-perms-"))
    cfg = msgspec.structs.replace(parts_config_factory(state_dir), nats_users=dict(USERS),
                                  nats_permissions=stack.nats_permissions(USERS))
    part = p.start_nats(cfg)
    try:
        n = Net(cfg)

        async def bootstrap() -> None:
            async with connect_bus(n.settings("admin"), "bootstrap", ensure=True) as bus:
                snaps = await bus.snapshots()
                await snaps.save("searcher", b"the searcher's secret state", 1)

        asyncio.run(bootstrap())
        yield n
    finally:
        part.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


def _exp() -> int:
    return 900_000 + uuid.uuid4().int % 90_000


async def _client(net: Net, user: str, errors: list[str]) -> NatsClient:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(net.url, user=user, password=USERS[user], inbox_prefix=runtime.inbox_prefix(user),
                              error_cb=on_error, allow_reconnect=False, connect_timeout=5)


async def _stored(admin: Bus, stream: str, subject: str) -> int:
    info = await admin.js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def _refused_publish(nc: NatsClient, subject: str, event: object, errors: list[str]) -> None:
    with pytest.raises(REFUSED):
        await nc.jetstream().publish(subject, msgspec.json.encode(event), timeout=0.5,
                                     headers={"Nats-Msg-Id": uuid.uuid4().hex})
    await _until(lambda: any("permissions violation" in e.lower() and subject.lower() in e for e in errors),
                 errors=errors)


async def _until(cond: Callable[[], bool], timeout: float = 3.0, errors: list[str] | None = None) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met in time; errors: {errors}")


@pytest.mark.parametrize("user", ["worker-0", "reader", "searcher", "scheduler", "tracker"])
async def test_only_the_gateway_may_publish_user_commands_and_submissions(net: Net, user: str) -> None:
    e = _exp()
    errors: list[str] = []
    nc = await _client(net, user, errors)
    try:
        async with connect_bus(net.settings("admin"), "admin", ensure=False) as admin:
            for event in (ev.ExperimentKillRequested(experiment_id=e),
                          ev.ExperimentSubmitted(experiment_id=e, config={}, config_yaml="", context_digest="x",
                                                 context_size=0, seed=1),
                          ev.TrialKillRequested(experiment_id=e, trial_id=1)):
                routing = subjects.routing_subject(event)
                await _refused_publish(nc, f"{routing}.gateway", event, errors)
                # A subject naming itself it may use where it owns other types on it (a trial's, the searcher's
                # ExperimentEnded): there the consumers refuse the type (test_a_forged_event_...).
                if not isinstance(event, ev.TrialKillRequested) and user != "searcher":
                    for token in ("w-worker-0", user):
                        await _refused_publish(nc, f"{routing}.{token}", event, errors)
            assert await _stored(admin, subjects.EVENTS.name, subjects.experiment_filter(e)) == 0
    finally:
        await nc.close()


async def test_a_worker_may_not_forge_another_workers_or_a_service_s_facts(net: Net) -> None:
    e, t = _exp(), 7
    errors: list[str] = []
    nc = await _client(net, "worker-1", errors)
    try:
        async with connect_bus(net.settings("admin"), "admin", ensure=False) as admin:
            report = ev.ValidationReported(experiment_id=e, trial_id=t, steps_completed=10, metrics={"loss": 0.0})
            for subject in (subjects.subject_for(report, worker_id="worker-0"),  # another worker's trial
                            f"{subjects.routing_subject(report)}.searcher"):
                await _refused_publish(nc, subject, report, errors)
            stop = ev.TrialStopRequested(experiment_id=e, trial_id=t)
            await _refused_publish(nc, subjects.subject_for(stop), stop, errors)
            assigned = ev.AllocationAssigned(experiment_id=e, trial_id=t, allocation_id=f"{t}.1", worker_id="worker-1",
                                             slot_ids=["0"])
            await _refused_publish(nc, subjects.subject_for(assigned), assigned, errors)
            batch = ev.TrainingMetricsReported(experiment_id=e, trial_id=t, batch_id="b", points=[])
            await _refused_publish(nc, subjects.subject_for(batch, worker_id="worker-0"), batch, errors)
            # Its own heartbeat subject only.
            await nc.publish(subjects.heartbeat_subject("worker-0"), b"{}")
            await nc.flush()
            await _until(lambda: any("kiln.heartbeat.worker-0" in x for x in errors))
            assert await _stored(admin, subjects.EVENTS.name, subjects.experiment_filter(e)) == 0
            assert await _stored(admin, subjects.METRICS.name, subjects.metrics_filter(e)) == 0
    finally:
        await nc.close()


async def test_a_worker_publishes_its_own_facts(net: Net) -> None:
    """The same permissions let a worker do its job: its trial's facts on its own subjects."""
    e, t = _exp(), 3
    async with connect_bus(net.settings("worker-0"), "worker-0", ensure=False, worker_id="worker-0") as bus, \
            connect_bus(net.settings("admin"), "admin", ensure=False) as admin:
        await bus.publish(ev.ValidationReported(experiment_id=e, trial_id=t, steps_completed=10, metrics={"x": 1}))
        await bus.publish_raw(subjects.routing_subject(ev.TrainingMetricsReported(
            experiment_id=e, trial_id=t, batch_id="b", points=[])), b'{"type":"TrainingMetricsReported",'
            b'"experiment_id":%d,"trial_id":%d,"batch_id":"b","points":[]}' % (e, t), "m1")
        assert await _stored(admin, subjects.EVENTS.name, f"kiln.events.{e}.trial.{t}.w-worker-0") == 1
        assert await _stored(admin, subjects.METRICS.name, f"kiln.metrics.{e}.{t}.w-worker-0") == 1


@pytest.mark.parametrize("user", ["worker-0", "reader", "scheduler", "gateway"])
async def test_nobody_reads_the_searcher_s_snapshot(net: Net, user: str) -> None:
    errors: list[str] = []
    nc = await _client(net, user, errors)
    try:
        bucket = runtime.SNAPSHOT_BUCKET
        by_body = b'{"last_by_subj": "$KV.%s.searcher"}' % bucket.encode()
        for subject, body in ((f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.searcher", b""),
                              (f"$JS.API.STREAM.MSG.GET.KV_{bucket}", by_body),
                              (f"$JS.API.DIRECT.GET.KV_{bucket}", by_body)):
            with pytest.raises(REFUSED):
                await nc.request(subject, body, timeout=0.5)
        # Nor hears the next save as it happens.
        heard: list[bytes] = []

        async def on_msg(msg: object) -> None:
            heard.append(msg.data)  # type: ignore[attr-defined]

        await nc.subscribe(f"$KV.{bucket}.>", cb=on_msg)
        await nc.flush()
        async with connect_bus(net.settings("searcher"), "searcher", ensure=False) as searcher:
            await (await searcher.snapshots()).save("searcher", b"newer secret", 2)
        await asyncio.sleep(0.3)
        assert heard == []
        await _until(lambda: any("subscription to \"$kv." in x.lower() for x in errors), errors=errors)
    finally:
        await nc.close()


async def test_each_decision_service_reads_and_writes_its_own_snapshot_only(net: Net) -> None:
    async with connect_bus(net.settings("scheduler"), "scheduler", ensure=False) as bus:
        snaps = await bus.snapshots()
        await snaps.save("scheduler", b"mine", 5)
        assert await snaps.load("scheduler") == (b"mine", 5)
        with pytest.raises(REFUSED):
            await snaps.load("searcher")
        with pytest.raises(REFUSED):
            await snaps.save("searcher", b"overwritten", 99)
    async with connect_bus(net.settings("admin"), "admin", ensure=False) as admin:
        found = await (await admin.snapshots()).load("searcher")
        assert found is not None and found[0] != b"overwritten"


@pytest.mark.parametrize("user", ["worker-0", "reader", "gateway", "searcher", "scheduler", "tracker"])
async def test_no_service_creates_deletes_or_purges_a_stream(net: Net, user: str) -> None:
    errors: list[str] = []
    nc = await _client(net, user, errors)
    try:
        js = nc.jetstream(timeout=0.5)
        with pytest.raises(REFUSED):
            await js.add_stream(name="EVIL", subjects=["evil.>"])
        for name in (subjects.EVENTS.name, f"KV_{runtime.SNAPSHOT_BUCKET}"):
            with pytest.raises(REFUSED):
                await js.purge_stream(name)
            with pytest.raises(REFUSED):
                await js.delete_stream(name)
        with pytest.raises(REFUSED):
            await js.update_stream(nats.js.api.StreamConfig(name=subjects.EVENTS.name, subjects=["kiln.events.>"],
                                                            max_msgs=1))
    finally:
        await nc.close()
    async with connect_bus(net.settings("admin"), "admin", ensure=False) as admin:
        with pytest.raises(nats.js.errors.NotFoundError):
            await admin.js.stream_info("EVIL")
        info = await admin.js.stream_info(subjects.EVENTS.name)
        assert info.config.max_msgs in (None, -1)
        await admin.js.stream_info(f"KV_{runtime.SNAPSHOT_BUCKET}")


@pytest.mark.parametrize("user", ["reader", "worker-0", "gateway"])
async def test_nobody_hears_replies_meant_for_another(net: Net, user: str) -> None:
    errors: list[str] = []
    spy = await _client(net, user, errors)
    heard: list[str] = []

    async def on_msg(msg: object) -> None:
        heard.append(msg.subject)  # type: ignore[attr-defined]

    try:
        for pattern in ("_INBOX.>", "_INBOX_searcher.>", ">", "*.>"):
            await spy.subscribe(pattern, cb=on_msg)
        await spy.flush()
        # Another client's requests and JetStream answers: a publish ack, a stream info.
        async with connect_bus(net.settings("searcher"), "searcher", ensure=False) as searcher:
            await searcher.publish(ev.TrialCreated(experiment_id=_exp(), trial_id=1, request_id=0, hparams={},
                                                   seed=1))
            await searcher.js.stream_info(subjects.EVENTS.name)
        await asyncio.sleep(0.3)
        assert heard == []
        await _until(lambda: sum("violation for subscription" in x.lower() for x in errors) >= 4, errors=errors)
    finally:
        await spy.close()


async def test_a_forged_event_is_dead_lettered_by_the_consumer_not_applied(net: Net) -> None:
    """Defense in depth: a stop request on a worker's subject (say, permissions set up wrong) is not believed."""
    e, t = _exp(), 11
    durable = f"forged-{e}"
    applied: list[object] = []
    async with connect_bus(net.settings("admin"), "admin", ensure=False) as admin:
        forged = ev.TrialStopRequested(experiment_id=e, trial_id=t, reason="forged")
        await admin.js.publish(f"{subjects.routing_subject(forged)}.w-worker-0", msgspec.json.encode(forged),
                               headers={"Nats-Msg-Id": durable})
        await admin.publish(ev.TrialStopRequested(experiment_id=e, trial_id=t + 1, reason="real"))
        stop = asyncio.Event()

        async def handle(batch: list[Delivery[object]]) -> None:
            applied.extend(d.event for d in batch)
            stop.set()

        spec = ConsumerSpec(durable=durable, stream=subjects.EVENTS, filter_subjects=[subjects.experiment_filter(e)])
        await asyncio.wait_for(admin.consume(spec, msgspec.json.Decoder(ev.DomainEvent), handle, stop), 20)
        assert [x.reason for x in applied] == ["real"]  # type: ignore[attr-defined]
        sub = await admin.js.subscribe(subjects.deadletter_subject(durable), ordered_consumer=True)
        msg = await sub.next_msg(timeout=5)
        letter = msgspec.json.decode(msg.data, type=ev.MessageDeadLettered)
        assert letter.error.startswith("forged:") and letter.subject.endswith(".w-worker-0")
        await sub.unsubscribe()
