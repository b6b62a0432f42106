"""The real parts deploy/parts.py starts: credentials enforced, data round trips, restarts keep data."""

from __future__ import annotations

import io
import os
import signal
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import nats
import nats.errors
import pytest
from minio.error import S3Error
from nats.aio.client import Client as NatsClient
from nats.js import api as js_api

from deploy import parts as p

pytestmark = pytest.mark.integration

RunningParts = p.RunningParts
ConfigFactory = Callable[[Path], p.PartsConfig]


async def _nats(parts: RunningParts, password: str | None = None) -> NatsClient:
    user, configured = next(iter(parts.cfg.nats_users.items()))
    return await nats.connect(
        parts.nats_url,
        user=user,
        password=configured if password is None else password,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=5,
    )


async def test_jetstream_publish_and_pull_consume(parts: RunningParts) -> None:
    nc = await _nats(parts)
    try:
        js = nc.jetstream()
        await js.add_stream(name="PARTS_RT", subjects=["parts.rt.>"])
        ack = await js.publish("parts.rt.a", b"hello")
        assert ack.stream == "PARTS_RT"
        sub = await js.pull_subscribe("parts.rt.>", durable="rt", stream="PARTS_RT")
        [msg] = await sub.fetch(1, timeout=5)
        assert msg.data == b"hello"
        await msg.ack_sync()
    finally:
        await nc.close()


async def test_nats_wrong_password_refused(parts: RunningParts) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await _nats(parts, password="wrong")


async def test_postgres_role_creates_and_reads_a_table(parts: RunningParts) -> None:
    conn = await asyncpg.connect(parts.pg_dsn, password=parts.cfg.pg_password)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS parts_rt (id int PRIMARY KEY, name text)")
        await conn.execute("INSERT INTO parts_rt VALUES (1, 'one') ON CONFLICT DO NOTHING")
        assert await conn.fetchval("SELECT name FROM parts_rt WHERE id = 1") == "one"
        assert await conn.fetchval("SELECT current_user") == parts.cfg.pg_user
    finally:
        await conn.close()


async def test_postgres_wrong_password_refused(parts: RunningParts) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(parts.pg_dsn, password="wrong")


def test_s3_put_get_and_buckets(parts: RunningParts) -> None:
    client = p.s3_client(parts.cfg)
    assert {b.name for b in client.list_buckets()} >= set(parts.cfg.s3_buckets)
    client.put_object("kiln", "parts/rt.txt", io.BytesIO(b"payload"), 7)
    resp = client.get_object("kiln", "parts/rt.txt")
    try:
        assert resp.read() == b"payload"
    finally:
        resp.close()
        resp.release_conn()


def test_s3_wrong_credentials_refused(parts: RunningParts) -> None:
    with pytest.raises(S3Error) as bad_secret:
        p.s3_client(parts.cfg, secret_key="wrong").list_buckets()
    assert bad_secret.value.code == "SignatureDoesNotMatch"
    with pytest.raises(S3Error) as bad_key:
        p.s3_client(parts.cfg, access_key="nobody").list_objects("kiln").__next__()
    assert bad_key.value.code == "InvalidAccessKeyId"


def test_starting_a_running_part_reuses_it(parts: RunningParts) -> None:
    again = p.start_nats(parts.cfg, timeout=10)
    assert again.pid == parts.nats.pid
    assert p.read_pid(parts.cfg.state_dir, "nats") == parts.nats.pid


def test_port_in_use_is_a_clear_error(tmp_path: Path, parts_config_factory: ConfigFactory) -> None:
    cfg = parts_config_factory(tmp_path)
    with socket.socket() as blocker:
        blocker.bind((cfg.host, cfg.nats_port))
        blocker.listen()
        with pytest.raises(p.PartError, match=str(cfg.nats_port)):
            p.start_nats(cfg, timeout=5)
    assert p.read_pid(tmp_path, "nats") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="the fallback only applies when postgres runs as another user")
def test_pg_data_dir_falls_back_when_state_dir_is_unreachable(
    tmp_path: Path, parts_config_factory: ConfigFactory
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    cfg = parts_config_factory(locked / "state")
    data_dir = p.postgres_data_dir(cfg)
    assert data_dir.parent == Path("/tmp")
    assert data_dir.name.startswith("kiln-pg-")
    assert p.postgres_data_dir(cfg) == data_dir  # stable: named after the state dir


async def _write_data(parts: RunningParts, stream: str) -> str:
    """One JetStream stream with 3 messages, a Postgres row and an S3 object, all tagged with a token."""
    token = uuid.uuid4().hex
    nc = await _nats(parts)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"], storage=js_api.StorageType.FILE)
        for i in range(3):
            await js.publish(f"{stream}.x", f"{token}-{i}".encode())
    finally:
        await nc.close()
    conn = await asyncpg.connect(parts.pg_dsn, password=parts.cfg.pg_password)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS parts_restart (token text)")
        await conn.execute("INSERT INTO parts_restart VALUES ($1)", token)
    finally:
        await conn.close()
    p.s3_client(parts.cfg).put_object("kiln", f"restart/{token}", io.BytesIO(token.encode()), len(token))
    return token


async def _check_data(parts: RunningParts, stream: str, token: str) -> None:
    nc = await _nats(parts)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        assert info.state.messages == 3
        sub = await js.pull_subscribe(f"{stream}.>", durable="check", stream=stream)
        msgs = await sub.fetch(3, timeout=5)
        assert [m.data.decode() for m in msgs] == [f"{token}-{i}" for i in range(3)]
    finally:
        await nc.close()
    conn = await asyncpg.connect(parts.pg_dsn, password=parts.cfg.pg_password)
    try:
        assert await conn.fetchval("SELECT count(*) FROM parts_restart WHERE token = $1", token) == 1
    finally:
        await conn.close()
    resp = p.s3_client(parts.cfg).get_object("kiln", f"restart/{token}")
    try:
        assert resp.read() == token.encode()
    finally:
        resp.close()
        resp.release_conn()


def _restart(parts: RunningParts) -> None:
    old = {"nats": parts.nats.pid, "postgres": parts.postgres.pid, "s3": parts.s3.pid}
    parts.nats = p.start_nats(parts.cfg)
    parts.postgres = p.start_postgres(parts.cfg)
    parts.s3 = p.start_s3(parts.cfg)
    assert not any(part.reused for part in (parts.nats, parts.postgres, parts.s3))
    assert all(getattr(parts, name).pid != pid for name, pid in old.items())


async def test_stop_and_restart_keeps_data(parts: RunningParts) -> None:
    token = await _write_data(parts, "PARTS_RESTART")
    parts.nats.stop()
    # Postgres the way `kiln down` does it: from the pid file alone.
    pg_pid = p.read_pid(parts.cfg.state_dir, "postgres")
    assert pg_pid == parts.postgres.pid
    p.stop_pid(pg_pid)
    parts.s3.stop()
    _restart(parts)
    await _check_data(parts, "PARTS_RESTART", token)


async def test_sigkill_and_immediate_restart_keeps_data(parts: RunningParts) -> None:
    token = await _write_data(parts, "PARTS_KILLED")
    # A crash, not a shutdown: postgres must recover from WAL, and its leftover lock files and
    # still-exiting backends must not block the restart.
    for part in (parts.nats, parts.postgres, parts.s3):
        os.kill(part.pid, signal.SIGKILL)
    _restart(parts)
    await _check_data(parts, "PARTS_KILLED", token)
