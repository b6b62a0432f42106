"""Worker agent: heartbeats its slots, runs the allocations the scheduler assigns to it.

What it and its trials report goes through its outbox (``outbox.py``, a SQLite file in its work dir) and
reaches the bus from there, in order, however long the bus is away. Trials report through a Unix socket
per allocation (``link.py``) and hold no bus or store credential. When the worker is root they run as an
unprivileged user in a 0700 work dir (``sandbox.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgspec
import structlog
from minio import Minio

from schemas import context as code_context
from schemas import events as ev
from schemas import ports, subjects
from schemas.trial import ClusterInfo, TrialInfo
from services.runtime import (
    Bus,
    BusSettings,
    ConsumerSpec,
    Delivery,
    S3Settings,
    configure_logging,
    connect_bus,
    read_settings,
    stop_on_signals,
)
from services.worker import sandbox
from services.worker import slots as slot_discovery
from services.worker.link import MinioStore, bus_stop_watcher
from services.worker.outbox import DEFAULT_MAX_PAYLOAD, Outbox
from services.worker.runner import Allocation

log = structlog.get_logger(__name__)


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of one worker agent (``KILN_*`` environment variables)."""

    worker_id: str = socket.gethostname().split(".")[0]
    # Where the worker's peers reach it: the rendezvous of a trial spanning hosts listens here.
    address: str = socket.gethostname()
    resource_pool: str = "default"
    cpu_slots: int = 1
    work_dir: str = "/tmp/kiln-worker"
    heartbeat_s: float = 1.0
    master_url: str = ports.MASTER_URL
    cluster_id: str = "kiln-local"
    log_level: str = "INFO"
    # The OS user trials run as when the worker is root (created if missing; "root" opts out, unsafe).
    # A worker that is not root runs trials as its own user.
    trial_user: str = sandbox.DEFAULT_TRIAL_USER
    # Work dirs of ended allocations kept for debugging (the newest); older ones are removed.
    keep_work_dirs: int = 5
    # The gateway's limits on code contexts, held again when unpacking (defense in depth).
    max_context_unpacked_bytes: int = code_context.DEFAULT_MAX_UNPACKED_BYTES
    max_context_files: int = code_context.DEFAULT_MAX_FILES


class Worker:
    """The I/O shell around allocations: bus in, processes out."""

    def __init__(self, settings: WorkerSettings, s3: S3Settings, bus: Bus, outbox: Outbox,
                 runtime: sandbox.TrialRuntime | None = None) -> None:
        self.settings = settings
        self.s3 = s3
        self.bus = bus
        self.outbox = outbox
        self.watch_stops = bus_stop_watcher(bus)
        self.slots = slot_discovery.discover(settings.cpu_slots)
        self.running: dict[str, Allocation] = {}
        # Ended, exit published: heartbeats list them for a while, in case the exit is not folded yet.
        self.finished: OrderedDict[str, float] = OrderedDict()
        # Ended, AllocationExited still in the outbox (the bus is away): listed as finished until it is out.
        self.exiting: dict[str, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.minio = Minio(s3.s3_endpoint, access_key=s3.s3_access_key, secret_key=s3.s3_secret_key,
                           secure=s3.s3_secure)
        # Trials reach the store only through URLs this key presigns (link.py checks which keys).
        self.store = MinioStore(self.minio, s3.s3_bucket)
        self.runtime = runtime
        self.work_root = Path(settings.work_dir) / settings.worker_id
        self.info_base = ClusterInfo(
            master_url=settings.master_url,
            cluster_id=settings.cluster_id,
            allocation_id="",
            worker_id=settings.worker_id,
            trial=TrialInfo(trial_id=0, experiment_id=0, hparams={}, trial_seed=0, config={}),
            container_addrs=["127.0.0.1"],
            s3_endpoint=s3.s3_endpoint,
            s3_bucket=s3.s3_bucket,
            s3_secure=s3.s3_secure,
        )

    async def heartbeat_forever(self, stop: asyncio.Event) -> None:
        """Publish the slot inventory every ``heartbeat_s`` on core NATS (never stored)."""
        subject = subjects.heartbeat_subject(self.settings.worker_id)
        encoder = msgspec.json.Encoder()
        while not stop.is_set():
            hb = ev.WorkerHeartbeat(
                worker_id=self.settings.worker_id,
                address=self.settings.address,
                resource_pool=self.settings.resource_pool,
                slots=self.slots,
                running=sorted(self.running),
                finished=self.finished_ids(time.time()),
                sent_at=time.time(),
            )
            with contextlib.suppress(Exception):
                await self.bus.publish_core(subject, encoder.encode(hb))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.heartbeat_s)

    def finished_ids(self, now: float) -> list[str]:
        """Allocations a heartbeat lists as finished: exits still in the outbox, and those published lately."""
        for allocation_id, row in list(self.exiting.items()):
            if self.outbox.published(row):
                del self.exiting[allocation_id]
                self.finished[allocation_id] = now
        cutoff = now - 120.0
        while self.finished and next(iter(self.finished.values())) < cutoff:
            self.finished.popitem(last=False)
        return list(self.finished) + [a for a in self.exiting if a not in self.finished]

    async def handle(self, batch: list[Delivery[ev.DomainEvent]]) -> None:
        """Act on the allocation commands addressed to this worker."""
        for d in batch:
            match d.event:
                case ev.AllocationAssigned() as assigned:
                    await self._start(assigned)
                case ev.AllocationKillRequested() as kill:
                    alloc = self.running.get(kill.allocation_id)
                    if alloc is not None:
                        self._spawn(alloc.kill())
                case ev.WorkerLost() as lost if lost.worker_id == self.settings.worker_id:
                    # The scheduler declared this worker lost (it was cut off past the timeout): those runs
                    # were restarted elsewhere from their checkpoints, and whatever they report is fenced. Stop
                    # them rather than let them compete for the same trial (runs placed since are not listed).
                    for allocation_id in lost.allocation_ids:
                        alloc = self.running.get(allocation_id)
                        if alloc is not None:
                            log.warning("worker.declared_lost", allocation=allocation_id)
                            self._spawn(alloc.kill())
                case _:
                    pass

    async def _start(self, assigned: ev.AllocationAssigned) -> None:
        if assigned.allocation_id in self.running or assigned.allocation_id in self.finished \
                or assigned.allocation_id in self.exiting:
            return  # redelivered
        # Everything the run needs is in the assignment (its spec): nothing is read back from the stream.
        alloc = Allocation(assigned, self.info_base, self.work_root, self.outbox.append,
                           self._fetch_context, self.watch_stops, runtime=self.runtime, store=self.store,
                           context_limits=(self.settings.max_context_unpacked_bytes, self.settings.max_context_files))
        self.running[assigned.allocation_id] = alloc
        if await alloc.start():
            self._spawn(self._watch(alloc))
        else:
            self._done(alloc)

    async def _watch(self, alloc: Allocation) -> None:
        try:
            await alloc.wait()
        finally:
            self._done(alloc)

    def _done(self, alloc: Allocation) -> None:
        self.running.pop(alloc.allocation_id, None)
        removed = sandbox.prune_work_dirs(self.work_root, self.settings.keep_work_dirs, set(self.running))
        if removed:
            log.info("worker.work_dirs_removed", allocations=removed)
        if alloc.exit_row and not self.outbox.published(alloc.exit_row):
            self.exiting[alloc.allocation_id] = alloc.exit_row
        else:
            self.finished[alloc.allocation_id] = time.time()

    async def _fetch_context(self, digest: str) -> bytes:
        def get() -> bytes:
            resp = self.minio.get_object(self.s3.s3_bucket, code_context.object_key(digest))
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return await asyncio.to_thread(get)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def shutdown(self) -> None:
        """Kill what still runs (it will resume elsewhere from its checkpoint) and wait for the exits."""
        await asyncio.gather(*(a.kill(grace_s=5.0) for a in list(self.running.values())), return_exceptions=True)
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=15.0)

    async def drain_inherited(self, stop: asyncio.Event) -> None:
        """Publish what an earlier process of this worker left in the outbox, before the first heartbeat.

        The scheduler then hears those exits before it hears a heartbeat that does not list their
        allocations, and does not judge runs lost that ended while this worker was down.
        """
        if not self.outbox.inherited_rows:
            return
        log.info("worker.draining_outbox", rows=self.outbox.inherited_rows, exits=self.outbox.inherited_exits)
        while not await self.outbox.wait_drained(timeout=1.0):
            if stop.is_set():
                return
        now = time.time()
        for allocation_id in self.outbox.inherited_exits:
            self.finished[allocation_id] = now
        log.info("worker.outbox_drained")


def outbox_path(settings: WorkerSettings) -> Path:
    """Where a worker keeps its outbox: ``<work_dir>/<worker_id>/outbox.sqlite`` (it outlives the process)."""
    return Path(settings.work_dir) / settings.worker_id / "outbox.sqlite"


def private_work_dir(settings: WorkerSettings) -> None:
    """Trials may pass through the work dirs (0711: no listing) but read nothing of the worker's.

    The outbox holds every report of every trial: 0600 before SQLite opens it (its -wal and -shm files
    take the database file's mode).
    """
    root = Path(settings.work_dir)
    if not root.exists():  # a work dir given to us (even /tmp) keeps its mode; one we make is passable only
        root.mkdir(mode=0o711, parents=True, exist_ok=True)
        root.chmod(0o711)
    (root / settings.worker_id).mkdir(exist_ok=True)
    (root / settings.worker_id).chmod(0o711)
    path = outbox_path(settings)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            p.chmod(0o600)


async def main() -> None:
    """Composition root: settings once, connections inside ``async with``."""
    settings = read_settings(WorkerSettings)
    configure_logging(f"worker:{settings.worker_id}", settings.log_level)
    subjects.check_token(settings.worker_id, "worker id")
    bus_settings = read_settings(BusSettings)
    s3 = read_settings(S3Settings)
    private_work_dir(settings)
    # Before anything else: a worker that cannot run trials safely says so and stops.
    runtime = await asyncio.to_thread(sandbox.prepare, settings.trial_user, Path(settings.work_dir))
    log.info("worker.trials_run_as", user=runtime.user.name if runtime.user else "the worker's own user",
             python=runtime.python)
    stop = stop_on_signals()
    async with connect_bus(bus_settings, f"worker-{settings.worker_id}", ensure=False,
                           worker_id=settings.worker_id) as bus:
        outbox = Outbox(outbox_path(settings), bus.publish_raw,
                        max_payload=bus.max_payload or DEFAULT_MAX_PAYLOAD)
        await outbox.start()
        try:
            worker = Worker(settings, s3, bus, outbox, runtime)
            await worker.drain_inherited(stop)
            log.info("worker.ready", slots=[s.slot_id for s in worker.slots], pool=settings.resource_pool)
            spec = ConsumerSpec(
                durable=f"worker-{settings.worker_id}",
                stream=subjects.EVENTS,
                filter_subjects=[subjects.worker_filter(settings.worker_id), subjects.lost_filter(settings.worker_id)],
                # A command delivered while the network was cut (the server had not noticed yet) is lost in
                # flight: it comes again after this long. Handling one is idempotent (a redelivered start is
                # skipped), so a short wait costs nothing.
                ack_wait_s=10.0,
            )
            heartbeats = asyncio.create_task(worker.heartbeat_forever(stop))
            await bus.consume(spec, msgspec.json.Decoder(ev.DomainEvent), worker.handle, stop)
            await worker.shutdown()
            heartbeats.cancel()
            # The exits just recorded: out now if the bus is there, else the next process sends them.
            if not await outbox.wait_drained(timeout=10.0):
                log.warning("worker.outbox_left", rows=outbox.last_appended - outbox.published_through)
        finally:
            await outbox.close()


if __name__ == "__main__":
    asyncio.run(main())
