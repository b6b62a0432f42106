"""A 3-server NATS cluster (deploy.parts, as `kiln up --nats-cluster 3` starts it): streams and buckets on all
three, clients that fail over when the server they use dies, and nothing acknowledged lost; the health endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from deploy import parts as p
from deploy.ports import free_port_block
from schemas import events as ev
from schemas import subjects
from services.runtime import KV_BUCKETS, BusSettings, ConsumerSpec, Delivery, connect_bus, serve_health

pytestmark = pytest.mark.integration

USERS = {"admin": "admin-secret", "writer": "writer-secret"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[p.PartsConfig]:
    """Three NATS servers with JetStream, routes authenticated, streams and buckets made with 3 replicas."""
    state = Path(tempfile.mkdtemp(prefix="kiln-natscluster-"))
    base, routes = free_port_block(2), free_port_block(9)
    cfg = p.PartsConfig(state_dir=state, nats_port=base, nats_monitor_port=base + 1, nats_cluster=3,
                        nats_cluster_ports_base=routes, nats_route_password="route pw/with:odd@chars",
                        nats_users=dict(USERS), pg_password="unused", s3_access_key="unused", s3_secret_key="unused")
    try:
        p.start_nats(cfg)

        async def bootstrap() -> None:
            while True:
                try:
                    async with connect_bus(_settings(cfg, "admin", stream_replicas=3), "bootstrap", ensure=True):
                        return
                except Exception:  # noqa: BLE001 - a fresh cluster elects its JetStream leader first
                    await asyncio.sleep(0.5)

        asyncio.run(asyncio.wait_for(bootstrap(), 60))
        yield cfg
    finally:
        p.stop_all(state)
        shutil.rmtree(state, ignore_errors=True)


def _settings(cfg: p.PartsConfig, user: str, **extra: object) -> BusSettings:
    return msgspec.convert({"nats_url": ",".join(p.nats_urls(cfg)), "nats_user": user,
                            "nats_password": USERS[user], **extra}, BusSettings)


def _stream_messages(cfg: p.PartsConfig, node: int, stream: str) -> int | None:
    """How many messages server ``node`` itself holds of ``stream`` (its monitoring endpoint), None if none."""
    url = f"http://{cfg.host}:{p.nats_node_ports(cfg, node)[1]}/jsz?accounts=true&streams=true"
    with urllib.request.urlopen(url, timeout=2) as resp:
        jsz = json.loads(resp.read())
    for account in jsz.get("account_details") or []:
        for s in account.get("stream_detail") or []:
            if s["name"] == stream:
                return int(s["state"]["messages"])
    return None


async def test_streams_and_buckets_are_kept_on_all_three_servers(cluster: p.PartsConfig) -> None:
    async with connect_bus(_settings(cluster, "writer"), "test", ensure=False) as bus:
        for spec in subjects.ALL_STREAMS:
            info = await bus.js.stream_info(spec.name)
            assert info.config.num_replicas == 3, spec.name
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2  # two followers
        for bucket in KV_BUCKETS:
            assert (await bus.js.stream_info(f"KV_{bucket}")).config.num_replicas == 3


async def test_killing_the_server_a_client_uses_loses_nothing_acknowledged(cluster: p.PartsConfig) -> None:
    """A publisher and a durable consumer keep going when the server the publisher is connected to is
    killed (-9): every event is stored once (retries carry the same Nats-Msg-Id), the consumer gets every one
    in order, and the restarted server catches up on what it missed."""
    total, kill_after = 240, 80
    experiment = 900
    got: list[int] = []
    done = asyncio.Event()

    async def on_batch(batch: list[Delivery[ev.DomainEvent]]) -> None:
        for d in batch:
            assert isinstance(d.event, ev.TrialProgressReported)
            got.append(d.event.trial_id)
        if len(got) >= total:
            done.set()

    async with connect_bus(_settings(cluster, "writer"), "publisher", ensure=False, worker_id="w1") as pub, \
            connect_bus(_settings(cluster, "writer"), "consumer", ensure=False) as sub:
        before = (await pub.js.stream_info(subjects.EVENTS.name)).state.last_seq
        spec = ConsumerSpec(durable="cluster-failover", stream=subjects.EVENTS,
                            filter_subjects=[subjects.trial_filter(experiment)])
        consumer = asyncio.create_task(sub.consume(spec, msgspec.json.Decoder(ev.DomainEvent), on_batch, done,
                                                   batch=16))
        victim = None
        for trial in range(1, total + 1):
            if trial == kill_after + 1:
                port = int(pub.nc.connected_url.port)
                victim = [i for i in range(3) if p.nats_node_ports(cluster, i)[0] == port][0]
                name = p.nats_node_names(cluster)[victim]
                pid = p.read_pid(cluster.state_dir, name)
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
            event = ev.TrialProgressReported(experiment_id=experiment, trial_id=trial, progress=0.5)
            for _ in range(200):  # as the worker outbox does: retry the same fact until it is acknowledged
                try:
                    await pub.publish(event)
                    break
                except Exception:  # noqa: BLE001 - the server went away mid-request; same id next time
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"event {trial} never acknowledged")
        assert victim is not None and pub.nc.connected_url.port != p.nats_node_ports(cluster, victim)[0]
        await asyncio.wait_for(done.wait(), 60)
        consumer.cancel()
        info = await pub.js.stream_info(subjects.EVENTS.name)
    assert got == list(range(1, total + 1))  # every one, once, in order
    assert info.state.last_seq - before == total  # stored once each: no duplicate from the retries
    # The killed server comes back and holds the whole stream again (it was a replica of every stream).
    p.start_nats_node(cluster, victim)
    deadline = asyncio.get_running_loop().time() + 30
    while _stream_messages(cluster, victim, subjects.EVENTS.name) != info.state.messages:
        assert asyncio.get_running_loop().time() < deadline, "the restarted server did not catch up"
        await asyncio.sleep(0.2)
    assert {_stream_messages(cluster, n, subjects.EVENTS.name) for n in range(3)} == {info.state.messages}


async def test_health_endpoint_says_ready_only_while_the_bus_is_connected(cluster: p.PartsConfig) -> None:
    port = free_port_block(1)

    def get(path: str, at: int = port) -> tuple[int, dict[str, object]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{at}{path}", timeout=2) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    settings = _settings(cluster, "writer", health_port=port, health_host="127.0.0.1")
    async with connect_bus(settings, "probed", ensure=False):
        assert await asyncio.to_thread(get, "/health") == (200, {"status": "ok"})
        assert await asyncio.to_thread(get, "/livez") == (200, {"status": "ok"})
        assert (await asyncio.to_thread(get, "/nothing-here"))[0] == 404
    # A process whose bus is away: not ready (503 naming NATS), still alive.
    other = free_port_block(1)
    server = await serve_health(BusSettings(health_port=other, health_host="127.0.0.1"), lambda: False)
    try:
        assert await asyncio.to_thread(get, "/health", other) == (503, {"status": "degraded", "down": ["nats"]})
        assert (await asyncio.to_thread(get, "/livez", other))[0] == 200
    finally:
        server.close()
