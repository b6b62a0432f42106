"""The shared service runtime: settings, logging, the bus, consumers with an explicit ack policy.

Every service's ``main.py`` uses this one module and nothing of another service. No I/O at import.
It is the one module that speaks nats-py: the rest of the code publishes, consumes, reads, subscribes and keeps
key-value entries through ``Bus`` (and names NATS failures through ``NATS_UNAVAILABLE`` and friends).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import asyncpg
import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import api as js_api

from schemas import events as ev
from schemas import ports
from schemas.cluster import CLUSTER_BUCKET
from schemas.subjects import ALL_STREAMS, StreamSpec, dedupe_key, forged, subject_for, worker_token

log = structlog.get_logger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)

_ENCODER = msgspec.json.Encoder()
# How many read messages may wait for the reader before the subscription stops taking more.
_READ_BUFFER = 8192
# The key-value buckets: decision services' snapshots (one key each) and the scheduler's cluster view.
SNAPSHOT_BUCKET = "kiln_snapshots"
KV_BUCKETS = (SNAPSHOT_BUCKET, CLUSTER_BUCKET)


# ---------------------------------------------------------------------------------------------
# Settings and logging
# ---------------------------------------------------------------------------------------------


class BusSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How a process reaches NATS: its own user, never a global one."""

    # One URL, or a NATS cluster's servers comma-separated ("nats://a:4222,nats://b:4222"): the client
    # connects to any of them and fails over to another when its server goes away.
    nats_url: str = ports.NATS_URL
    nats_user: str = ""
    nats_password: str = ""
    # A file holding the password instead (a mounted Kubernetes Secret, systemd's LoadCredential=);
    # read once at connect, used when ``nats_password`` is empty.
    nats_password_file: str = ""
    # Replicas of the streams and key-value buckets ``bootstrap`` creates: 3 on a 3-node NATS cluster.
    stream_replicas: int = 1
    # Port of this process's health endpoint (0: none): ``GET /health`` answers 200 while its NATS
    # connection is up and 503 while it is not; ``GET /livez`` answers 200 while the process serves at all.
    health_port: int = 0
    health_host: str = "0.0.0.0"
    # How often the client pings its server; after 3 unanswered it drops the connection and reconnects (to another
    # server of a cluster). Short enough that a cut network is noticed in seconds, not NATS's default minutes.
    ping_interval_s: float = 10.0

    @property
    def servers(self) -> list[str]:
        """The NATS server URLs ``nats_url`` lists."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]

    def password(self) -> str:
        """The password: the setting, else the content of ``nats_password_file`` (one trailing newline dropped)."""
        if self.nats_password or not self.nats_password_file:
            return self.nats_password
        try:
            with open(self.nats_password_file, encoding="utf-8") as fh:
                return fh.read().removesuffix("\n")
        except OSError as exc:
            raise SystemExit(f"cannot read KILN_NATS_PASSWORD_FILE {self.nats_password_file!r}: {exc}") from exc


class S3Settings(msgspec.Struct, frozen=True, kw_only=True):
    """How a process reaches the object store."""

    s3_endpoint: str = ports.S3_ENDPOINT
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "kiln"
    s3_secure: bool = False


def read_settings(cls: type[S], prefix: str = "KILN_", environ: dict[str, str] | None = None) -> S:
    """Build a settings Struct from ``<prefix><FIELD>`` environment variables, once, at startup."""
    env = os.environ if environ is None else environ
    raw = {
        name: env[prefix + name.upper()]
        for name in cls.__struct_fields__
        if prefix + name.upper() in env
    }
    try:
        # strict=False lets "14222" become an int and "true" a bool.
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"bad setting for {cls.__name__} ({prefix}*): {exc}") from exc


def configure_logging(service: str, level: str = "INFO") -> None:
    """JSON logs on stderr, one object per line, tagged with the service name."""
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def stop_on_signals() -> asyncio.Event:
    """An Event set by SIGTERM or SIGINT: the signal → Event → drain shutdown path."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


# ---------------------------------------------------------------------------------------------
# Consumers
# ---------------------------------------------------------------------------------------------


class Transient(Exception):
    """A handler failure worth retrying later (a server is restarting, a row is locked)."""


class ConsumerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A durable pull consumer, with its redelivery policy set on purpose."""

    durable: str
    stream: StreamSpec
    filter_subjects: list[str]
    # Tries of a message whose handler fails for a reason that is not transient, before it is
    # dead-lettered; transient failures are waited out and never count.
    max_deliver: int = 8
    # Waits between those tries (the last one repeats).
    backoff_s: tuple[float, ...] = (0.5, 2.0, 5.0, 15.0, 30.0)
    ack_wait_s: float = 60.0
    max_ack_pending: int = 10_000


class AckPosition(NamedTuple):
    """Where a JetStream message sits, read off its ack subject (no datetime, no dataclass)."""

    stream_seq: int
    timestamp: float  # seconds since the epoch, as the stream stored it
    num_pending: int
    consumer_seq: int = 0  # the consumer's delivery counter: a skipped value means a lost delivery
    delivered: int = 1  # how many times this message has been delivered to the consumer


def ack_position(reply: str) -> AckPosition:
    """Parse ``$JS.ACK.[<domain>.<account>.]<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>``.

    Replay reads tens of thousands of messages a second; nats-py's ``msg.metadata`` builds a dataclass
    and a datetime for each, which cost as much as the read itself.
    """
    tokens = reply.split(".")
    off = 0 if len(tokens) == 9 else 2  # v2 has 11 or 12 tokens
    try:
        if tokens[0] != "$JS" or tokens[1] != "ACK" or not (len(tokens) == 9 or len(tokens) >= 11):
            raise ValueError
        return AckPosition(int(tokens[off + 5]), int(tokens[off + 7]) / 1e9, int(tokens[off + 8]),
                           int(tokens[off + 6]), int(tokens[off + 4]))
    except (ValueError, IndexError):
        raise ValueError(f"not a JetStream ack subject: {reply!r}") from None


class Delivery(Generic[T]):
    """One decoded message with where it sits in its stream."""

    __slots__ = ("event", "msg", "seq", "timestamp")

    def __init__(self, event: T, msg: Msg, seq: int, timestamp: float) -> None:
        self.event = event
        self.msg = msg
        self.seq = seq
        self.timestamp = timestamp  # the stream's time for the message, seconds since the epoch

    @classmethod
    def of(cls, event: T, msg: Msg) -> Delivery[T]:
        """A delivery positioned by the message's ack subject."""
        pos = ack_position(msg.reply)
        return cls(event, msg, pos.stream_seq, pos.timestamp)

    @property
    def num_delivered(self) -> int:
        """How many times JetStream has delivered this message (1 = first time)."""
        return self.msg.metadata.num_delivered

    @property
    def subject(self) -> str:
        """The subject the message was stored under."""
        return self.msg.subject


Handler = Callable[[list[Delivery[T]]], Awaitable[None]]
# A core-NATS subscriber: called with each message's subject and payload.
OnMessage = Callable[[str, bytes], Awaitable[None]]


class Published(NamedTuple):
    """JetStream's answer to a publish: where the message sits, and whether it was stored before (dedupe)."""

    seq: int
    duplicate: bool


class Subscription(Protocol):
    """A live subscription (``Bus.subscribe``); ``unsubscribe`` ends it."""

    async def unsubscribe(self, limit: int = 0) -> None: ...


class Bucket:
    """One key-value bucket (JetStream KV): bytes by key."""

    def __init__(self, kv: Any) -> None:
        self._kv = kv

    async def get(self, key: str) -> bytes | None:
        """The key's value, or None when it has none."""
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        value: bytes | None = entry.value
        return value

    async def put(self, key: str, value: bytes) -> int:
        """Replace the key's value; the revision it got."""
        revision: int = await self._kv.put(key, value)
        return revision


class Bus:
    """A connected NATS client with Kiln's streams, publish and consume conventions."""

    def __init__(self, nc: nats.NATS, service: str, worker_id: str = "") -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.service = service
        # The worker whose facts this connection publishes (its subjects end in w-<worker_id>); a bus that is
        # not a worker's (a test, a benchmark) stands in for a worker named after itself.
        self.worker_id = worker_id or service
        # Bumped each time the connection comes back after an outage: what was heard live (heartbeats)
        # during the gap is missing, and a service that judges silence must start counting afresh.
        self.reconnects = 0

    @property
    def is_connected(self) -> bool:
        """Whether the connection is up now (while it is not, a publish would only be buffered)."""
        return bool(self.nc.is_connected)

    @property
    def max_payload(self) -> int:
        """The largest message the server takes (0 before it said)."""
        return int(self.nc.max_payload or 0)

    async def subscribe(self, subject: str, on_message: OnMessage) -> Subscription:
        """Hear messages on ``subject`` (wildcards allowed) live, over core NATS: stored events as they are
        stored, and heartbeats; nothing from before the subscription."""

        async def cb(msg: Msg) -> None:
            await on_message(msg.subject, msg.data)

        sub: Subscription = await self.nc.subscribe(subject, cb=cb)
        return sub

    async def publish_core(self, subject: str, payload: bytes) -> None:
        """Send a message over core NATS only (a heartbeat): heard by whoever listens now, never stored."""
        await self.nc.publish(subject, payload)

    async def bucket(self, name: str) -> Bucket:
        """A key-value bucket made by ``bootstrap`` (raises when it is missing)."""
        return Bucket(await self.js.key_value(name))

    async def kv_get(self, bucket: str, key: str) -> bytes | None:
        """One key's value; None when the key or the whole bucket is not there (yet)."""
        try:
            return await (await self.bucket(bucket)).get(key)
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
            return None

    async def stream_bounds(self, stream: StreamSpec) -> tuple[int, int] | None:
        """The first and last seq a stream holds now; None when the stream is not there."""
        try:
            info = await self.js.stream_info(stream.name)
        except nats.js.errors.NotFoundError:
            return None
        return int(info.state.first_seq), int(info.state.last_seq)

    async def bootstrap(self, replicas: int = 1) -> None:
        """Create the streams and key-value buckets if missing: the admin's one step before services start.

        Services connect with ``ensure=False``: their NATS users may not create, update or delete streams.
        ``replicas`` > 1 (a NATS cluster) stores each on that many servers; existing ones with fewer are
        raised to it (JetStream copies them over), never lowered.
        """
        await self.ensure_streams(replicas=replicas)
        await self.ensure_buckets(replicas=replicas)

    async def ensure_buckets(self, buckets: Sequence[str] = KV_BUCKETS, replicas: int = 1) -> None:
        """Create the key-value buckets if missing, with direct get (a key in the request's subject, so a
        NATS permission can allow one key of a bucket and not the others)."""
        for bucket in buckets:
            try:
                info = await self.js.stream_info(f"KV_{bucket}")
            except nats.js.errors.NotFoundError:
                await self.js.create_key_value(bucket=bucket, history=1, direct=True, replicas=replicas)
                continue
            if not info.config.allow_direct or (info.config.num_replicas or 1) < replicas:
                # Made before direct get was used, or on fewer servers than now: turn it on, raise the replicas.
                await self.js.update_stream(info.config.evolve(
                    allow_direct=True, num_replicas=max(replicas, info.config.num_replicas or 1)))

    async def ensure_streams(self, specs: Sequence[StreamSpec] = ALL_STREAMS, replicas: int = 1) -> None:
        """Create the streams if missing (idempotent; existing streams are left as they are, but for their
        replicas, raised to ``replicas``)."""
        for spec in specs:
            config = js_api.StreamConfig(
                name=spec.name,
                subjects=spec.subjects,
                storage=js_api.StorageType.FILE,
                retention=js_api.RetentionPolicy.LIMITS,
                max_age=spec.max_age_s or None,
                max_bytes=spec.max_bytes,
                duplicate_window=spec.duplicate_window_s,
                num_replicas=replicas,
            )
            try:
                info = await self.js.stream_info(spec.name)
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(config)
                continue
            if (info.config.num_replicas or 1) < replicas:
                await self.js.update_stream(info.config.evolve(num_replicas=replicas))

    async def publish(self, event: Any, *, msg_id: str | None = None) -> int:
        """Publish one event on its subject with a deterministic ``Nats-Msg-Id``; return its seq.

        A retried publish of the same fact carries the same id, so JetStream drops the duplicate
        inside the stream's dedupe window instead of storing a second event.
        """
        return (await self.publish_ack(event, msg_id=msg_id)).seq

    async def publish_ack(self, event: Any, *, msg_id: str | None = None) -> Published:
        """``publish``, returning JetStream's answer (``duplicate`` says it was already stored)."""
        headers = {"Nats-Msg-Id": msg_id or dedupe_key(event)}
        ack = await self.js.publish(subject_for(event, self.worker_id), _ENCODER.encode(event), headers=headers)
        return Published(seq=ack.seq, duplicate=bool(ack.duplicate))

    async def publish_raw(self, subject: str, payload: bytes, msg_id: str) -> int:
        """Publish a worker's already-encoded fact (an outbox row: its routing subject) with its ``Nats-Msg-Id``.

        The publisher token (``w-<worker id>``) is added here, from the connection's identity, not stored
        in the row: rows an older worker stored are published under its current identity too.
        """
        ack = await self.js.publish(f"{subject}.{worker_token(self.worker_id)}", payload,
                                    headers={"Nats-Msg-Id": msg_id})
        return ack.seq

    async def publish_many(self, events: Sequence[Any]) -> None:
        """Publish events in order, each awaited, so their stream order is their list order."""
        for event in events:
            await self.publish(event)

    async def dead_letter(self, consumer: str, msg: Msg, error: str) -> None:
        """Keep a message a consumer gave up on, with why, in the dead-letter stream."""
        meta = msg.metadata
        letter = ev.MessageDeadLettered(
            consumer=consumer,
            stream=meta.stream,
            stream_seq=meta.sequence.stream,
            subject=msg.subject,
            error=error[:2000],
            payload=msg.data,
        )
        await self.publish(letter, msg_id=f"dl:{consumer}:{meta.stream}:{meta.sequence.stream}")

    async def consume(
        self,
        spec: ConsumerSpec,
        decoder: msgspec.json.Decoder[T],
        handler: Handler[T],
        stop: asyncio.Event,
        *,
        batch: int = 1,
        idle: Callable[[], Awaitable[None]] | None = None,
        fetch_timeout_s: float = 1.0,
        position: Callable[[], Awaitable[int]] | None = None,
        transient: Callable[[BaseException], bool] | None = None,
        prefetch: Callable[[list[Delivery[T]]], None] | None = None,
    ) -> None:
        """Pull, decode and hand batches to ``handler``, in stream order, until ``stop`` is set.

        Ack policy. Success → ack, only after the handler returned (it commits first).
        A transient failure (``is_transient``: a server unreachable, a timeout) retries the same batch
        in this process with backoff for as long as it lasts, keeping the messages' ack leases alive
        and fetching nothing newer meanwhile, so nothing behind it is applied first. Any other failure
        is retried one message at a time; a message that fails ``max_deliver`` times in a row, and an
        undecodable one, is dead-lettered with its reason and the consumer moves on.

        With ``position`` (the seq the consumer's own store says it applied last), the durable consumer
        is recreated to start right after it whenever the process starts or a delivery goes missing (a
        gap in the consumer sequence), so a position can never pass a message that was not applied.

        With ``prefetch``, when a batch came full (a backlog), the next one is fetched and decoded while the
        handler applies this one, and
        ``prefetch(next_deliveries)`` is called with it then (the tracker folds it while Postgres writes the
        current one). It is only a head start: the next batch still goes through the sequence check and the
        handler after this one is acked; if this one took longer than half the ack wait, the head start is
        dropped and the consumer rebinds at its position, so nothing waits out an expired lease.
        """
        if prefetch is not None:
            await self._consume_ahead(spec, decoder, handler, stop, batch=batch, idle=idle,
                                      fetch_timeout_s=fetch_timeout_s, position=position,
                                      classify=transient or is_transient, prefetch=prefetch)
            return
        puller = _Puller(self, spec, position)
        classify = transient or is_transient
        await self._until_done(lambda: puller.bind(), stop, classify, f"bind {spec.durable}")
        log.info("consumer.started", durable=spec.durable, stream=spec.stream.name)
        try:
            while not stop.is_set():
                if puller.lost:
                    await self._until_done(lambda: puller.bind(), stop, classify, f"rebind {spec.durable}")
                try:
                    msgs = await puller.fetch(batch, fetch_timeout_s)
                except nats.errors.ConnectionClosedError:
                    break
                if msgs is None:
                    if idle is not None:
                        await idle()
                    continue
                if not puller.in_order(msgs):
                    log.warning("consumer.gap", durable=spec.durable, action="rebinding at the applied position")
                    await self._until_done(lambda: puller.bind(), stop, classify, f"rebind {spec.durable}")
                    continue
                await self._deliver(spec, decoder, handler, stop, msgs, classify)
        finally:
            await puller.close()
            log.info("consumer.stopped", durable=spec.durable)

    async def _consume_ahead(
        self,
        spec: ConsumerSpec,
        decoder: msgspec.json.Decoder[T],
        handler: Handler[T],
        stop: asyncio.Event,
        *,
        batch: int,
        idle: Callable[[], Awaitable[None]] | None,
        fetch_timeout_s: float,
        position: Callable[[], Awaitable[int]] | None,
        classify: Callable[[BaseException], bool],
        prefetch: Callable[[list[Delivery[T]]], None],
    ) -> None:
        """``consume`` with the next batch fetched, decoded and handed to ``prefetch`` during this one."""
        puller = _Puller(self, spec, position)

        async def fetch() -> tuple[list[Msg], tuple[list[Delivery[T]], list[tuple[Msg, str]]]] | None:
            msgs = await puller.fetch(batch, fetch_timeout_s)
            if msgs is None:
                return None
            decoded = _decoded(spec, decoder, msgs)
            prefetch(decoded[0])
            return msgs, decoded

        async def rebind(why: str) -> None:
            log.warning("consumer.gap", durable=spec.durable, action="rebinding at the applied position", why=why)
            await self._until_done(lambda: puller.bind(), stop, classify, f"rebind {spec.durable}")

        ahead: asyncio.Task[Any] | None = None

        async def drop_ahead() -> None:
            nonlocal ahead
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead
                ahead = None

        await self._until_done(lambda: puller.bind(), stop, classify, f"bind {spec.durable}")
        log.info("consumer.started", durable=spec.durable, stream=spec.stream.name, prefetch=True)
        try:
            while not stop.is_set():
                if puller.lost:
                    await drop_ahead()
                    await self._until_done(lambda: puller.bind(), stop, classify, f"rebind {spec.durable}")
                try:
                    if ahead is not None:
                        got, ahead = await ahead, None
                    else:
                        got = await fetch()
                except nats.errors.ConnectionClosedError:
                    break
                if got is None:
                    if idle is not None:
                        await idle()
                    continue
                msgs, decoded = got
                if not puller.in_order(msgs):
                    await rebind("a delivery went missing")
                    continue
                # A full batch means a backlog: the next one is fetched and decoded while this one is applied.
                # A partial one means the consumer is caught up: fetching now would only split what arrives
                # meanwhile into smaller batches (more transactions for the same points).
                if len(msgs) >= batch:
                    ahead = asyncio.create_task(fetch(), name=f"prefetch-{spec.durable}")
                started = time.monotonic()
                await self._apply(spec, handler, stop, decoded, classify)
                if time.monotonic() - started > spec.ack_wait_s / 2:
                    # Its leases may have run out meanwhile: start again from what is applied.
                    await drop_ahead()
                    await rebind("the batch took longer than half the ack wait")
        finally:
            await drop_ahead()
            await puller.close()
            log.info("consumer.stopped", durable=spec.durable)

    async def _deliver(
        self,
        spec: ConsumerSpec,
        decoder: msgspec.json.Decoder[T],
        handler: Handler[T],
        stop: asyncio.Event,
        msgs: list[Msg],
        classify: Callable[[BaseException], bool],
    ) -> None:
        await self._apply(spec, handler, stop, _decoded(spec, decoder, msgs), classify)

    async def _apply(
        self,
        spec: ConsumerSpec,
        handler: Handler[T],
        stop: asyncio.Event,
        decoded: tuple[list[Delivery[T]], list[tuple[Msg, str]]],
        classify: Callable[[BaseException], bool],
    ) -> None:
        deliveries, refused = decoded
        for msg, why in refused:  # undecodable or forged: dead-lettered before the rest is applied
            await self._until_done(functools.partial(self._give_up, spec, msg, why), stop, classify, "dead-letter")
        if not deliveries:
            return
        error = await self._attempt(spec, handler, deliveries, stop, classify)
        if error is None:
            await _ack_all(deliveries)
            return
        if stop.is_set():
            return
        single = len(deliveries) == 1
        if not single:
            log.warning("consumer.batch_failed", durable=spec.durable, size=len(deliveries), error=repr(error))
        # One at a time, in order: the bad one is found, the others are applied.
        for one in deliveries:
            failures, failed = (1, error) if single else (0, None)
            if not single:
                failed = await self._attempt(spec, handler, [one], stop, classify)
                failures = 0 if failed is None else 1
            while failed is not None and not stop.is_set():
                if failures >= spec.max_deliver:
                    log.error("consumer.poison", durable=spec.durable, seq=one.seq, error=repr(failed))
                    reason = f"handler failed {failures} times: {failed!r}"
                    await self._until_done(functools.partial(self._give_up, spec, one.msg, reason),
                                           stop, classify, "dead-letter")
                    break
                delay = spec.backoff_s[min(failures - 1, len(spec.backoff_s) - 1)]
                log.error("consumer.retry", durable=spec.durable, seq=one.seq, delay=delay, error=repr(failed))
                await _sleep_or_stop(stop, delay)
                failed = await self._attempt(spec, handler, [one], stop, classify)
                failures += 1 if failed is not None else 0
            if failed is None:
                await _ack_all([one])
            elif stop.is_set():
                return

    async def _attempt(
        self,
        spec: ConsumerSpec,
        handler: Handler[T],
        deliveries: list[Delivery[T]],
        stop: asyncio.Event,
        classify: Callable[[BaseException], bool],
    ) -> BaseException | None:
        """Run the handler until it succeeds or fails for a reason that is not transient; None = applied."""
        waits = 0
        while True:
            try:
                await handler(deliveries)
                if waits:
                    log.info("consumer.recovered", durable=spec.durable, seq=deliveries[0].seq, retries=waits)
                return None
            except Exception as exc:  # noqa: BLE001 - classified below
                if not classify(exc):
                    return exc
                if stop.is_set():
                    return exc
                delay = _TRANSIENT_BACKOFF_S[min(waits, len(_TRANSIENT_BACKOFF_S) - 1)]
                if waits % 10 == 0:
                    log.warning("consumer.waiting", durable=spec.durable, seq=deliveries[0].seq, retry_in=delay,
                                error=repr(exc))
                waits += 1
                await _sleep_or_stop(stop, delay)
                # Keep the ack leases: a message waited on is not redelivered to anyone meanwhile.
                for d in deliveries:
                    with contextlib.suppress(Exception):
                        await d.msg.in_progress()

    async def _give_up(self, spec: ConsumerSpec, msg: Msg, reason: str) -> None:
        await self.dead_letter(spec.durable, msg, reason)
        await msg.term()

    async def _until_done(
        self,
        step: Callable[[], Awaitable[object]],
        stop: asyncio.Event,
        classify: Callable[[BaseException], bool],
        what: str,
    ) -> None:
        """Run a bus step (bind, dead-letter) until it succeeds; only a transient failure is retried."""
        waits = 0
        while not stop.is_set():
            try:
                await step()
                return
            except Exception as exc:
                if not classify(exc):
                    raise
                delay = _TRANSIENT_BACKOFF_S[min(waits, len(_TRANSIENT_BACKOFF_S) - 1)]
                if waits % 10 == 0:
                    log.warning("consumer.waiting", step=what, retry_in=delay, error=repr(exc))
                waits += 1
                await _sleep_or_stop(stop, delay)

    async def read(
        self,
        stream: StreamSpec,
        filter_subject: str,
        decoder: msgspec.json.Decoder[T],
        *,
        start_seq: int = 1,
        follow: bool = False,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[Delivery[T], None]:
        """Read a stream in order from ``start_seq`` with an ephemeral consumer (replay, audit).

        Without ``follow`` it ends at the last message present when it started. Undecodable
        messages are skipped with a warning: a reader never blocks on poison.
        """
        try:
            info = await self.js.stream_info(stream.name)
        except nats.js.errors.NotFoundError:
            return
        last = info.state.last_seq
        if not follow and (last == 0 or start_seq > last):
            return
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(start_seq, 1),
            filter_subject=filter_subject,
        )
        # An ordered push consumer streams with flow control. Messages are handed over in batches through
        # a callback: next_msg() per message (a wait_for, a task switch and a metadata dataclass each)
        # capped reads at ~27k/s here, the callback path at ~100k/s (benchmarks/ingest).
        buffer: list[Msg] = []
        arrived = asyncio.Event()
        room = asyncio.Event()
        room.set()

        async def collect(msg: Msg) -> None:
            buffer.append(msg)
            arrived.set()
            if len(buffer) >= _READ_BUFFER:
                # Backpressure: nats-py stops draining, answers no flow control, the server pauses.
                room.clear()
                await room.wait()

        sub = await self.js.subscribe(filter_subject, stream=stream.name, ordered_consumer=True, config=config,
                                      cb=collect, pending_msgs_limit=4 * _READ_BUFFER,
                                      pending_bytes_limit=256 * 1024 * 1024)
        try:
            while stop is None or not stop.is_set():
                if not buffer:
                    arrived.clear()
                    try:
                        await asyncio.wait_for(arrived.wait(), 1.0)
                    except TimeoutError:
                        if follow:
                            continue
                        return  # nothing (more) for this filter
                batch = buffer[:]
                buffer.clear()
                room.set()
                for msg in batch:
                    pos = ack_position(msg.reply)
                    try:
                        event = decoder.decode(msg.data)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        log.warning("reader.undecodable", subject=msg.subject, seq=pos.stream_seq, error=str(exc))
                        event = None
                    if event is not None and forged(msg.subject, event) is not None:
                        # What the consumers dead-letter is not read back as a fact either (replay agrees).
                        log.warning("reader.forged", subject=msg.subject, seq=pos.stream_seq)
                        event = None
                    if event is not None:
                        yield Delivery(event, msg, pos.stream_seq, pos.timestamp)
                    # num_pending: what the consumer still has for this filter after this message.
                    if not follow and (pos.stream_seq >= last or pos.num_pending == 0):
                        return
        finally:
            room.set()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def snapshots(self) -> Snapshots:
        """The key-value bucket decision services keep their state snapshots in (made by ``bootstrap``)."""
        return Snapshots(await self.bucket(SNAPSHOT_BUCKET))


# Waits between retries of a step that failed for a transient reason; the last one repeats.
_TRANSIENT_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 5.0)


def is_transient(exc: BaseException) -> bool:
    """True when a failure says a server is away or slow (worth waiting out), not that the input is bad.

    Looks through ``__cause__``/``__context__`` too, so a handler that wraps a connection error keeps
    it transient.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (Transient, OSError, TimeoutError, NATS_UNAVAILABLE)) or postgres_unavailable(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


# A request NATS did not answer in time (a publish may still have been stored), and a connection closed for good.
NATS_TIMEOUT: type[Exception] = nats.errors.TimeoutError
NATS_CLOSED: type[Exception] = nats.errors.ConnectionClosedError
# NATS failures that mean "not reachable now"; a 4xx API error (a bad request, not found) is not one, and
# neither is a connection closed for good (the process is shutting down).
NATS_UNAVAILABLE: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
    nats.js.errors.NoStreamResponseError,
)
# PostgreSQL failures that mean "not reachable now": refused or dropped connections (OSError, class 08),
# shutdown / starting up (class 57), out of connections or resources (class 53). A bare InterfaceError is a
# connection asyncpg already closed or a pool closing; its subclasses (DataError...) are client misuse, a bug.
_PG_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError, asyncpg.exceptions.InternalClientError,
)


def postgres_unavailable(exc: BaseException) -> bool:
    """Whether an exception out of asyncpg (or its socket) means PostgreSQL cannot be reached now."""
    if isinstance(exc, asyncpg.InterfaceError):
        return type(exc) is asyncpg.InterfaceError
    return isinstance(exc, _PG_UNAVAILABLE)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _ack_all(deliveries: Sequence[Delivery[Any]]) -> None:
    """Ack applied messages. A lost ack only means a redelivery, which the position (or the handler's
    own idempotency) absorbs, so a failing ack is not an error."""
    for d in deliveries:
        try:
            await d.msg.ack()
        except Exception as exc:  # noqa: BLE001
            log.debug("consumer.ack_failed", seq=d.seq, error=repr(exc))


def _decoded(spec: ConsumerSpec, decoder: msgspec.json.Decoder[T],
             msgs: list[Msg]) -> tuple[list[Delivery[T]], list[tuple[Msg, str]]]:
    """The messages decoded, and those refused with why: undecodable, or of a type their subject's publisher
    does not own (schemas.subjects.OWNERS: defense in depth behind the NATS permissions; never applied)."""
    deliveries: list[Delivery[T]] = []
    refused: list[tuple[Msg, str]] = []
    for msg in msgs:
        try:
            event = decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("consumer.undecodable", durable=spec.durable, subject=msg.subject, error=str(exc))
            refused.append((msg, f"undecodable: {exc}"))
            continue
        why = forged(msg.subject, event)
        if why is not None:
            log.warning("consumer.forged", durable=spec.durable, subject=msg.subject, error=why)
            refused.append((msg, why))
            continue
        deliveries.append(Delivery.of(event, msg))
    return deliveries, refused


class _Puller:
    """The pull subscription of one durable consumer, kept in step with the consumer's applied position."""

    def __init__(self, bus: Bus, spec: ConsumerSpec, position: Callable[[], Awaitable[int]] | None) -> None:
        self.bus = bus
        self.spec = spec
        self.position = position
        self.psub: Any = None
        self.next_cseq: int | None = None  # the consumer sequence the next delivery must carry
        self.lost = False  # set when the server no longer knows the consumer

    def _config(self, start_seq: int) -> js_api.ConsumerConfig:
        spec = self.spec
        return js_api.ConsumerConfig(
            durable_name=spec.durable,
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE if start_seq > 1 else js_api.DeliverPolicy.ALL,
            opt_start_seq=start_seq if start_seq > 1 else None,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait_s,
            # Redelivery is this process's business (it retries in place); the server never gives up on one.
            max_deliver=-1,
            filter_subjects=spec.filter_subjects if len(spec.filter_subjects) > 1 else None,
            filter_subject=spec.filter_subjects[0] if len(spec.filter_subjects) == 1 else None,
            max_ack_pending=spec.max_ack_pending,
        )

    async def bind(self) -> None:
        """Subscribe; with a position, recreate the durable to start right after it."""
        await self.close()
        self.lost = False
        js, spec = self.bus.js, self.spec
        if self.position is None:
            self.psub = await js.pull_subscribe(spec.filter_subjects[0], durable=spec.durable, stream=spec.stream.name,
                                                config=self._config(1))
            self.next_cseq = None
            await self._refilter()
            return
        applied = await self.position()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(spec.stream.name, spec.durable)
        await js.add_consumer(spec.stream.name, config=self._config(applied + 1))
        self.psub = await js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream.name)
        self.next_cseq = 1
        log.info("consumer.bound", durable=spec.durable, after_seq=applied)

    async def _refilter(self) -> None:
        """A durable made by an older version with other filters (a worker now also hears WorkerLost): update
        its filters in place, keeping its position (pull_subscribe binds to an existing durable as it is)."""
        info = await self.psub.consumer_info()
        have = set(info.config.filter_subjects or ([info.config.filter_subject] if info.config.filter_subject else []))
        if have == set(self.spec.filter_subjects):
            return
        config = info.config.evolve(filter_subjects=self.spec.filter_subjects if len(self.spec.filter_subjects) > 1
                                    else None,
                                    filter_subject=self.spec.filter_subjects[0] if len(self.spec.filter_subjects) == 1
                                    else None)
        await self.bus.js.add_consumer(self.spec.stream.name, config=config)
        log.info("consumer.refiltered", durable=self.spec.durable, filters=self.spec.filter_subjects)

    async def fetch(self, batch: int, timeout: float) -> list[Msg] | None:
        """The next messages, or None when there were none (or the server is away for now)."""
        try:
            msgs: list[Msg] = await self.psub.fetch(batch, timeout=timeout)
            return msgs
        except (TimeoutError, nats.errors.TimeoutError):
            return None
        except nats.errors.ConnectionClosedError:
            raise  # closed for good (drained at shutdown): the consumer ends
        except Exception as exc:
            if not is_transient(exc) and not isinstance(exc, nats.js.errors.NotFoundError):
                raise
            log.warning("consumer.fetch_failed", durable=self.spec.durable, error=repr(exc))
            await asyncio.sleep(0.5)
            if isinstance(exc, nats.js.errors.NotFoundError):
                self.lost = True  # the consumer is gone (a server that lost its state): bind again
            return None

    def in_order(self, msgs: list[Msg]) -> bool:
        """False when a delivery went missing (its consumer sequence skips), so the consumer must rebind."""
        if self.next_cseq is None:
            return True
        for msg in msgs:
            if ack_position(msg.reply).consumer_seq != self.next_cseq:
                return False
            self.next_cseq += 1
        return True

    async def close(self) -> None:
        """Unsubscribe (a pull subscription left open makes drain() wait for its whole timeout)."""
        if self.psub is not None:
            with contextlib.suppress(Exception):
                await self.psub.unsubscribe()
            self.psub = None


class Snapshots:
    """Serialized state of a decision service with the stream seq it reflects."""

    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket

    async def load(self, key: str) -> tuple[bytes, int] | None:
        """The last saved state and seq, or None on first start."""
        value = await self._bucket.get(key)
        if value is None:
            return None
        header, _, body = value.partition(b"\n")
        return body, int(header)

    async def save(self, key: str, state: bytes, seq: int) -> None:
        """Replace the snapshot (state first, seq in a one-line header)."""
        await self._bucket.put(key, str(seq).encode() + b"\n" + state)


class DecisionCore(Protocol):
    """A pure decision core: events in, events out, state to bytes."""

    def handle(self, event: Any) -> list[Any]: ...

    def snapshot(self) -> bytes: ...


C = TypeVar("C", bound=DecisionCore)


def _handle_with(event: Any, core: Any) -> list[Any]:
    """The decision step for one consumed event: the core's ``handle``."""
    return list(core.handle(event))


class DecisionShell(Generic[C]):
    """Runs a decision core against the bus: fold, publish decisions, snapshot, then ack.

    If publishing fails half way, the core is rolled back to its last snapshot and the message is
    redelivered; deciding again from the same state yields the same events with the same
    ``Nats-Msg-Id``, so whatever did get published is deduplicated, not doubled.
    """

    def __init__(self, bus: Bus, key: str, fresh: Callable[[], C], restore: Callable[[bytes], C]) -> None:
        self.bus = bus
        self.key = key
        self._fresh = fresh
        self._restore = restore
        self.core: C = fresh()
        self.last_seq = 0
        self._saved = self.core.snapshot()
        self._lock = asyncio.Lock()
        self._snapshots: Snapshots | None = None

    async def load(self) -> None:
        """Restore the core from its snapshot, if one exists."""
        self._snapshots = await self.bus.snapshots()
        found = await self._snapshots.load(self.key)
        if found is not None:
            self._saved, self.last_seq = found
            self.core = self._restore(self._saved)
            log.info("decision.restored", key=self.key, seq=self.last_seq)

    async def position(self) -> int:
        """The last stream seq folded into the saved snapshot: the consumer resumes right after it."""
        return self.last_seq

    async def on_events(self, batch: list[Delivery[Any]]) -> None:
        """Consumer handler: each event past the snapshot goes through the core."""
        for d in batch:
            if d.seq <= self.last_seq:
                continue  # already folded into the snapshot
            await self.decide(functools.partial(_handle_with, d.event), seq=d.seq)

    async def decide(self, step: Callable[[C], list[Any]], seq: int | None = None) -> None:
        """Apply one step (an event, a heartbeat, a tick) and publish what it decides."""
        async with self._lock:
            try:
                out = step(self.core)
                await self.bus.publish_many(out)
                if out or seq is not None:
                    self.last_seq = seq if seq is not None else self.last_seq
                    self._saved = self.core.snapshot()
                    assert self._snapshots is not None, "load() first"
                    await self._snapshots.save(self.key, self._saved, self.last_seq)
            except Exception:
                self.core = self._restore(self._saved)
                raise


@contextlib.asynccontextmanager
async def connect_bus(settings: BusSettings, service: str, *, ensure: bool = True,
                      worker_id: str = "") -> AsyncIterator[Bus]:
    """Connect with the process's own credentials, drain on the way out.

    ``ensure`` creates missing streams and buckets: only for the admin's bootstrap and tests, a service's
    user may not. Each user gets its own inbox prefix (``_INBOX_<user>``), the only inbox it may subscribe
    to, so nobody hears replies meant for another.
    """
    options: dict[str, Any] = {
        # Every server of a cluster: the client picks one and, when it goes away, reconnects to another
        # (servers the cluster tells about are added too); JetStream state is replicated among them.
        "servers": settings.servers,
        "name": service,
        "max_reconnect_attempts": -1,  # a restarting server is waited for, not fatal
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        "drain_timeout": 5,
        "ping_interval": settings.ping_interval_s,
        "max_outstanding_pings": 3,
    }
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.password()
        options["inbox_prefix"] = inbox_prefix(settings.nats_user)
    holder: list[Bus] = []

    async def disconnected() -> None:
        log.warning("bus.disconnected", service=service)

    async def reconnected() -> None:
        if holder:
            holder[0].reconnects += 1
        log.info("bus.reconnected", service=service)

    options.update(disconnected_cb=disconnected, reconnected_cb=reconnected)
    nc = await nats.connect(**options)
    bus = Bus(nc, service, worker_id)
    holder.append(bus)
    health = await serve_health(settings, lambda: bus.is_connected) if settings.health_port else None
    try:
        if ensure:
            await bus.bootstrap(settings.stream_replicas)
        yield bus
    finally:
        if health is not None:
            health.close()
        with contextlib.suppress(Exception):
            await nc.drain()


async def serve_health(settings: BusSettings, healthy: Callable[[], bool]) -> asyncio.AbstractServer:
    """A minimal HTTP endpoint for probes (Kubernetes, systemd, a load balancer) on ``health_port``.

    ``/health`` (readiness): 200 ``{"status": "ok"}`` while ``healthy()``, else 503 ``{"status": "degraded"}``;
    ``/livez`` (liveness): 200 while the event loop answers. A process whose NATS is away is not ready but
    alive: restarting it would not bring NATS back. Anything else is a 404. One request per connection.
    """

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/livez":
                status, body = "200 OK", b'{"status":"ok"}'
            elif path == "/health":
                ok = healthy()
                status = "200 OK" if ok else "503 Service Unavailable"
                body = b'{"status":"ok"}' if ok else b'{"status":"degraded","down":["nats"]}'
            else:
                status, body = "404 Not Found", b'{"status":"not found"}'
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (OSError, TimeoutError, UnicodeError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, settings.health_host, settings.health_port)
    log.info("health.serving", port=settings.health_port)
    return server


def inbox_prefix(user: str) -> str:
    """The inbox prefix of a NATS user's connections (its permissions allow subscribing to it alone)."""
    return f"_INBOX_{user}"
