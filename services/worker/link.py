"""The trial → worker link: one Unix socket per allocation, the trial's only way to report.

The trial process holds no bus credential. It sends ``Report`` frames (schemas.trial) over a socket the
worker serves in the allocation's work dir (a 0700 directory, the socket 0600). The worker stamps the
trial's identity: an event about another experiment, trial or allocation, or of a type a trial does not
report, is refused with an error reply and logged; anything else goes to the outbox and is acknowledged
once it is on disk. Stop and preempt requests come back over the same socket: the worker watches the
trial's subject with its own credential and pushes ``StopRequested`` frames.

The trial holds no store credential either: it asks for a presigned URL per object (``PresignRequest``; a big
file goes up in parts, each step of the multipart upload presigned the same way, checked as a PUT) or
for the keys under a checkpoint (``ListRequest``). The worker checks the key against the trial's
``StoreGrant`` (its own experiment's checkpoint prefix for PUT and GET; its own trial's TensorBoard prefix for
PUT; read-only, the Delta table its experiment's ``data`` block names; nothing else) and presigns with its own key,
for a few minutes. Nothing lets a trial delete an object or list outside what it may read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog

from schemas import events as ev
from schemas.data import TableLocation
from schemas.subjects import EVENTS, trial_filter
from schemas.trial import (
    CHECKPOINTS,
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
    checkpoint_prefix,
    encode_frame,
    key_refusal,
    tensorboard_prefix,
)

if TYPE_CHECKING:
    from services.runtime import Bus

log = structlog.get_logger(__name__)

# What a trial process reports (kiln.core): everything else about a run is the worker's to say.
TRIAL_REPORTS = (
    ev.TrainingMetricsReported,
    ev.ValidationReported,
    ev.CheckpointStored,
    ev.TrialProgressReported,
)
# Reports the worker stamps with the allocation they come from.
_STAMPED = (ev.ValidationReported, ev.CheckpointStored, ev.TrialProgressReported)
# sun_path holds 108 bytes with the terminating NUL.
_MAX_SOCKET_PATH = 107
# How long a closing link waits for a dead trial's last frames (still in the socket buffer).
CLOSE_GRACE_S = 5.0
# Bytes read from a trial's socket at once: every frame that has arrived is handled in one go.
READ_CHUNK = 1 << 20
# How long a presigned URL is good for: the trial asks right before each object, so minutes are plenty
# (an upload that has started finishes even if the URL expires meanwhile).
PRESIGN_EXPIRY_S = 300
# Keys per ListRequest answer: a checkpoint has a handful of files; a frame stays far below its limit.
MAX_LISTED_KEYS = 10_000
# The steps of an S3 multipart upload a trial may have presigned (writes, like PUT): the HTTP method and query.
MULTIPART_METHODS = {
    "CREATE_MULTIPART": "POST",
    "UPLOAD_PART": "PUT",
    "COMPLETE_MULTIPART": "POST",
    "ABORT_MULTIPART": "DELETE",
}
# S3's limit on the parts of one upload.
MAX_PARTS = 10_000
# A checkpoint id is one plain key segment (kiln.core makes UUIDs).
_STORAGE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")

_ANY_EVENT = msgspec.msgpack.Decoder(ev.DomainEvent | ev.MetricEvent | ev.LogEvent | ev.DeadLetterEvent)

Append = Callable[[Any], Awaitable[object]]
OnStop = Callable[[str], None]


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """Whose link this is: the one run a trial process may report about."""

    experiment_id: int
    trial_id: int
    allocation_id: str


# Runs until cancelled, calling on_stop(reason) for each stop or preempt request addressed to the run.
StopWatcher = Callable[[Identity, OnStop], Coroutine[Any, Any, None]]


def refusal(who: Identity, event: Any) -> str:
    """Why the trial ``who`` may not report ``event``; "" when it may."""
    kind = type(event).__name__
    if not isinstance(event, TRIAL_REPORTS):
        return f"a trial may not publish {kind}"
    if event.experiment_id != who.experiment_id or event.trial_id != who.trial_id:
        return (f"{kind} for experiment {event.experiment_id} trial {event.trial_id}: this link is experiment "
                f"{who.experiment_id} trial {who.trial_id}")
    claimed = getattr(event, "allocation_id", "")
    if claimed not in ("", who.allocation_id):
        return f"{kind} of allocation {claimed}: this link is allocation {who.allocation_id}"
    if isinstance(event, ev.TrainingMetricsReported) and not event.batch_id.startswith(f"{who.allocation_id}:"):
        # The batch id is the dedupe key: one run must not be able to shadow another run's batches.
        return f"metric batch {event.batch_id!r} is not of allocation {who.allocation_id}"
    if isinstance(event, ev.CheckpointStored):
        # The uuid becomes a key segment (resume, download): it must not be able to name another path.
        if not _STORAGE_ID.match(event.uuid) or event.uuid == "..":
            return f"checkpoint id {event.uuid!r} is not one plain key segment"
        bucket_path = event.storage.removeprefix("s3://").partition("/")[2].strip("/")
        own = checkpoint_prefix(who.experiment_id)
        if event.storage.startswith("s3://") and bucket_path.split("/")[0] == CHECKPOINTS and bucket_path != own:
            return f"checkpoint storage {event.storage!r} is not this experiment's ({own})"
    return ""


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` (Linux /proc); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return 0
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def descends_from(pid: int, root: int) -> bool:
    """Whether ``pid`` is ``root`` or one of its descendants. A process cannot make itself another's
    descendant (an orphan is adopted by init or a subreaper), so this names the trial's own processes."""
    for _ in range(256):
        if pid == root:
            return True
        if pid <= 1:
            return False
        pid = parent_pid(pid)
    return False


class StoreGrant(msgspec.Struct, frozen=True, kw_only=True):
    """The object keys one trial may reach through its link: prefixes, each ending in "/"."""

    write: tuple[str, ...]
    read: tuple[str, ...]
    # Read-only prefixes in other buckets of the store: (bucket, prefix ending in "/"), a data table's.
    elsewhere: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, experiment_id: int, sources: tuple[str, ...] = (), trial_id: int | None = None) -> StoreGrant:
        """Its own experiment's checkpoints (read and write; the checkpoint it resumes from is among them),
        plus read-only checkpoint prefixes ``sources`` (e.g. another experiment's checkpoint a config names),
        plus, given ``trial_id``, its own trial's TensorBoard files (write only: nothing reads them back)."""
        own = checkpoint_prefix(experiment_id) + "/"
        board = () if trial_id is None else (tensorboard_prefix(experiment_id, trial_id) + "/",)
        return cls(write=(own, *board), read=(own, *(p.rstrip("/") + "/" for p in sources)))

    def with_table(self, table: TableLocation | None, cluster_bucket: str) -> StoreGrant:
        """Plus reading the Delta table an experiment's ``data`` block names (its whole prefix: the log and the
        data files of every version; the trial reads the pinned one). A local table needs no grant."""
        if table is None or table.kind != "s3":
            return self
        prefix = table.prefix.strip("/") + "/"
        if table.bucket == cluster_bucket:
            return msgspec.structs.replace(self, read=(*self.read, prefix))
        return msgspec.structs.replace(self, elsewhere=(*self.elsewhere, (table.bucket, prefix)))


def store_refusal(grant: StoreGrant, method: str, key: str, bucket: str = "") -> str:
    """Why a trial with ``grant`` may not ``method`` (GET, PUT or LIST) ``key`` (in ``bucket``, "" for the
    cluster's); "" when it may."""
    why = key_refusal(key)
    if why:
        return why
    if bucket:
        allowed = tuple(p for b, p in grant.elsewhere if b == bucket)
        if method not in ("GET", "LIST"):
            return f"method {method!r} in bucket {bucket!r}: a trial may only read other buckets (GET, LIST)"
        if not allowed:
            return f"{method} {key!r}: this trial may read nothing in bucket {bucket!r}"
    elif method == "PUT" or method in MULTIPART_METHODS:
        allowed = grant.write
    elif method in ("GET", "LIST"):
        allowed = grant.read
    else:
        return f"method {method!r}: a trial may GET, PUT or LIST"
    if method == "LIST" and not key.endswith("/"):
        return f"list prefix {key!r} must end in '/'"
    if not any((key.startswith(p) and len(key) > len(p)) or (method == "LIST" and key == p) for p in allowed):
        may = "read" if method in ("GET", "LIST") else "write"
        return f"{method} {key!r}: outside what this trial may {may} ({', '.join(allowed)})"
    return ""


class Store(Protocol):
    """The worker's side of the store: presigns and lists with the worker's own credential (``bucket`` "": the
    cluster's, ``Store.bucket``)."""

    bucket: str

    async def presign(self, method: str, key: str, bucket: str = "", upload_id: str = "",
                      part_number: int = 0) -> str: ...

    async def list(self, prefix: str, bucket: str = "") -> list[str]: ...


class MinioStore:
    """A Store over a minio client (the worker's key); URLs good for ``expiry_s``."""

    def __init__(self, client: Any, bucket: str, expiry_s: int = PRESIGN_EXPIRY_S) -> None:
        self.client = client
        self.bucket = bucket
        self.expiry = timedelta(seconds=expiry_s)

    async def presign(self, method: str, key: str, bucket: str = "", upload_id: str = "",
                      part_number: int = 0) -> str:
        """A presigned URL for one object: GET, PUT, or a step of a multipart upload (``MULTIPART_METHODS``)."""
        query: dict[str, str] = {}
        if method == "CREATE_MULTIPART":
            query = {"uploads": ""}
        elif method == "UPLOAD_PART":
            query = {"partNumber": str(part_number), "uploadId": upload_id}
        elif method in MULTIPART_METHODS:
            query = {"uploadId": upload_id}
        http = MULTIPART_METHODS.get(method, method)
        return str(await asyncio.to_thread(self.client.get_presigned_url, http, bucket or self.bucket, key,
                                           expires=self.expiry, extra_query_params=query or None))

    async def list(self, prefix: str, bucket: str = "") -> list[str]:
        """The keys under ``prefix`` (at most MAX_LISTED_KEYS)."""
        def keys() -> list[str]:
            out = []
            for obj in self.client.list_objects(bucket or self.bucket, prefix=prefix, recursive=True):
                out.append(str(obj.object_name))
                if len(out) >= MAX_LISTED_KEYS:
                    break
            return out

        return await asyncio.to_thread(keys)


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

    def __init__(self, path: Path, who: Identity, append: Append, watch: StopWatcher, store: Store | None = None,
                 grant: StoreGrant | None = None, owner: tuple[int, int] | None = None,
                 check_peer: bool = False) -> None:
        self.path = path
        self.who = who
        self._append = append
        self._watch = watch
        self._store = store
        self.grant = grant or StoreGrant.of(who.experiment_id, trial_id=who.trial_id)
        # (uid, gid) the trial runs as when that is not the worker's: the socket and its directory are its.
        self._owner = owner
        # Trials of a host share one OS user, so the socket's mode alone would let one trial use another's
        # link: with check_peer, only the trial's process and its descendants (admit) are served.
        self._check_peer = check_peer
        self._root_pid: int | None = None
        self._root_known = asyncio.Event()
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
        if self._owner is not None:
            os.chown(self.path.parent, *self._owner)
            os.chown(self.path, *self._owner)

    def admit(self, pid: int) -> None:
        """Serve only process ``pid`` (the trial's) and its descendants (torchrun's workers...)."""
        self._root_pid = pid
        self._root_known.set()

    async def _peer_refusal(self, writer: asyncio.StreamWriter) -> str:
        """Why the process at the other end may not use this link; "" when it may."""
        if not self._check_peer:
            return ""
        try:
            await asyncio.wait_for(self._root_known.wait(), 30.0)
        except TimeoutError:
            return "the trial's process is not known"
        sock = writer.get_extra_info("socket")
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0]
        except OSError as exc:
            return f"cannot tell which process connected: {exc}"
        assert self._root_pid is not None
        if not descends_from(pid, self._root_pid):
            return f"process {pid} is not of this trial (not a descendant of process {self._root_pid})"
        return ""

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
            why = await self._peer_refusal(writer)
            if why:
                self.refused += 1
                log.warning("link.peer_refused", allocation=self.who.allocation_id, error=why)
                return
            frames = FrameBuffer()
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    return  # the trial closed the link (or exited)
                todo = frames.feed(data)
                while todo:
                    # Reports that arrived together are handled together: their outbox appends share one
                    # commit. Replies still go out in frame order.
                    reports: list[Report] = []
                    for f in todo:
                        if not isinstance(f, Report):
                            break
                        reports.append(f)
                    replies: list[Reply | Presigned | Listed]
                    if reports:
                        replies = list(await asyncio.gather(*(self._report(f) for f in reports)))
                        todo = todo[len(reports):]
                    else:
                        replies = [await self._handle(todo.pop(0), writer)]
                    writer.write(b"".join(encode_frame(r) for r in replies))
                await writer.drain()
        except FrameError as exc:
            log.warning("link.bad_frame", allocation=self.who.allocation_id, error=str(exc))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._watchers.discard(writer)
            self._handlers.discard(task)
            writer.close()

    async def _handle(self, frame: LinkFrame, writer: asyncio.StreamWriter) -> Reply | Presigned | Listed:
        match frame:
            case Report():
                return await self._report(frame)
            case PresignRequest():
                return await self._presign(frame)
            case ListRequest():
                return await self._list(frame)
            case WatchStops():
                self._watchers.add(writer)
                for reason in self._stops:  # seen before this connection asked
                    writer.write(encode_frame(StopRequested(reason=reason)))
                if self._watch_task is None:
                    self._watch_task = asyncio.create_task(self._watch(self.who, self._on_stop))
                return Reply(id=frame.id)
            case Reply() | StopRequested() | Presigned() | Listed():
                return Reply(id=getattr(frame, "id", 0), ok=False,
                             error=f"{type(frame).__name__} is the worker's frame")

    def _bucket(self, bucket: str) -> str:
        """"" for the cluster's bucket, however the trial named it."""
        return "" if self._store is None or bucket == self._store.bucket else bucket

    def _store_refused(self, frame_id: int, method: str, key: str, bucket: str = "") -> Reply | None:
        why = store_refusal(self.grant, method, key, bucket) if self._store is not None else "this worker has no store"
        if not why:
            return None
        self.refused += 1
        log.warning("link.store_refused", allocation=self.who.allocation_id, method=method, key=key, bucket=bucket,
                    error=why)
        return Reply(id=frame_id, ok=False, error=why)

    async def _presign(self, frame: PresignRequest) -> Reply | Presigned:
        bucket = self._bucket(frame.bucket)
        refused = self._store_refused(frame.id, frame.method, frame.key, bucket)
        if refused is not None:
            return refused
        assert self._store is not None
        try:
            if frame.method in MULTIPART_METHODS and frame.method != "CREATE_MULTIPART" and not frame.upload_id:
                return Reply(id=frame.id, ok=False, error=f"{frame.method} {frame.key!r} needs the upload_id")
            if frame.method == "UPLOAD_PART" and not 1 <= frame.part_number <= MAX_PARTS:
                return Reply(id=frame.id, ok=False,
                             error=f"part number {frame.part_number}: S3 numbers parts 1..{MAX_PARTS}")
            url = await self._store.presign(frame.method, frame.key, bucket, frame.upload_id, frame.part_number)
            return Presigned(id=frame.id, url=url)
        except Exception as exc:  # noqa: BLE001 - the trial hears why; the worker keeps serving
            log.error("link.presign_failed", allocation=self.who.allocation_id, key=frame.key, error=repr(exc))
            return Reply(id=frame.id, ok=False, error=f"could not presign {frame.key!r}: {exc}")

    async def _list(self, frame: ListRequest) -> Reply | Listed:
        bucket = self._bucket(frame.bucket)
        refused = self._store_refused(frame.id, "LIST", frame.prefix, bucket)
        if refused is not None:
            return refused
        assert self._store is not None
        try:
            return Listed(id=frame.id, keys=await self._store.list(frame.prefix, bucket))
        except Exception as exc:  # noqa: BLE001 - the trial hears why; the worker keeps serving
            log.error("link.list_failed", allocation=self.who.allocation_id, prefix=frame.prefix, error=repr(exc))
            return Reply(id=frame.id, ok=False, error=f"could not list {frame.prefix!r}: {exc}")

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
        if isinstance(event, _STAMPED):
            # Which run reported it: what the fencing of a run declared lost goes by (schemas.events).
            event = msgspec.structs.replace(event, allocation_id=self.who.allocation_id)
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


def bus_stop_watcher(bus: Bus) -> StopWatcher:
    """Watch a trial's subject on JetStream with the worker's own credential (``Bus.read``, following)."""
    decoder = msgspec.json.Decoder(ev.DomainEvent)

    async def watch(who: Identity, on_stop: OnStop) -> None:
        delay = 0.5
        while True:  # until the link closes (cancelled)
            try:
                # From the start of the trial's subject: a stop decided before this run began still counts. The
                # reader skips what does not decode and stops its publisher may not issue (schemas.subjects.OWNERS).
                trail = bus.read(EVENTS, trial_filter(who.experiment_id, who.trial_id), decoder, follow=True)
                async with contextlib.aclosing(trail) as events:
                    async for d in events:
                        reason = stop_reason(who, d.event)
                        if reason is not None:
                            on_stop(reason)  # a stop heard again after a retry is ignored by the link
            except Exception as exc:  # noqa: BLE001 - the bus may be away; keep trying while the run lasts
                log.warning("link.watch_retry", allocation=who.allocation_id, error=repr(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    return watch
