"""Worker agent: heartbeats its slots, runs the allocations the scheduler assigns to it.

What it and its trials report goes through its outbox (``outbox.py``, a SQLite file in its work dir) and
reaches the bus from there, in order, however long the bus is away. Trials report through a Unix socket
per allocation (``link.py``) and hold no bus credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import OrderedDict
from pathlib import Path

import msgspec
import structlog
from minio import Minio

from kiln import context as code_context
from schemas import events as ev
from schemas import subjects
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
from services.worker import slots as slot_discovery
from services.worker.link import bus_stop_watcher
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
    master_url: str = "http://127.0.0.1:18080"
    cluster_id: str = "kiln-local"
    log_level: str = "INFO"
    # The store credentials handed to trial processes (they get no bus credential: they report through
    # the worker's link).
    trial_s3_access_key: str = ""
    trial_s3_secret_key: str = ""


class Worker:
    """The I/O shell around allocations: bus in, processes out."""

    def __init__(self, settings: WorkerSettings, s3: S3Settings, bus: Bus, outbox: Outbox) -> None:
        self.settings = settings
        self.s3 = s3
        self.bus = bus
        self.outbox = outbox
        self.watch_stops = bus_stop_watcher(bus.js)
        self.slots = slot_discovery.discover(settings.cpu_slots)
        self.running: dict[str, Allocation] = {}
        # Ended, exit published: heartbeats list them for a while, in case the exit is not folded yet.
        self.finished: OrderedDict[str, float] = OrderedDict()
        # Ended, AllocationExited still in the outbox (the bus is away): listed as finished until it is out.
        self.exiting: dict[str, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.minio = Minio(s3.s3_endpoint, access_key=s3.s3_access_key, secret_key=s3.s3_secret_key,
                           secure=s3.s3_secure)
        self.info_base = ClusterInfo(
            master_url=settings.master_url,
            cluster_id=settings.cluster_id,
            allocation_id="",
            worker_id=settings.worker_id,
            trial=TrialInfo(trial_id=0, experiment_id=0, hparams={}, trial_seed=0, config={}),
            container_addrs=["127.0.0.1"],
            s3_endpoint=s3.s3_endpoint,
            s3_access_key=settings.trial_s3_access_key,
            s3_secret_key=settings.trial_s3_secret_key,
            s3_bucket=s3.s3_bucket,
            s3_secure=s3.s3_secure,
        )
        self._decoder = msgspec.json.Decoder(ev.DomainEvent)

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
                await self.bus.nc.publish(subject, encoder.encode(hb))
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
                case _:
                    pass

    async def _start(self, assigned: ev.AllocationAssigned) -> None:
        if assigned.allocation_id in self.running or assigned.allocation_id in self.finished \
                or assigned.allocation_id in self.exiting:
            return  # redelivered
        submitted = await self._find(subjects.EVENTS, f"kiln.events.{assigned.experiment_id}.experiment",
                                     ev.ExperimentSubmitted)
        created = await self._find(subjects.EVENTS, subjects.trial_filter(assigned.experiment_id, assigned.trial_id),
                                   ev.TrialCreated)
        if submitted is None or created is None:
            raise RuntimeError(f"allocation {assigned.allocation_id}: its experiment or trial is not on the bus yet")
        work_root = Path(self.settings.work_dir) / self.settings.worker_id
        alloc = Allocation(assigned, submitted, created, self.info_base, work_root, self.outbox.append,
                           self._fetch_context, self.watch_stops)
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
        if alloc.exit_row and not self.outbox.published(alloc.exit_row):
            self.exiting[alloc.allocation_id] = alloc.exit_row
        else:
            self.finished[alloc.allocation_id] = time.time()

    async def _find(self, stream: subjects.StreamSpec, subject: str, kind: type) -> object | None:
        async with contextlib.aclosing(self.bus.read(stream, subject, self._decoder)) as events:
            async for d in events:
                if isinstance(d.event, kind):
                    return d.event
        return None

    async def _fetch_context(self, digest: str) -> bytes:
        def get() -> bytes:
            resp = self.minio.get_object(self.s3.s3_bucket, code_context.object_key(digest))
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return await asyncio.to_thread(get)

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
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


async def main() -> None:
    """Composition root: settings once, connections inside ``async with``."""
    settings = read_settings(WorkerSettings)
    configure_logging(f"worker:{settings.worker_id}", settings.log_level)
    subjects.check_token(settings.worker_id, "worker id")
    bus_settings = read_settings(BusSettings)
    s3 = read_settings(S3Settings)
    stop = stop_on_signals()
    async with connect_bus(bus_settings, f"worker-{settings.worker_id}") as bus:
        outbox = Outbox(outbox_path(settings), bus.publish_raw,
                        max_payload=bus.nc.max_payload or DEFAULT_MAX_PAYLOAD)
        await outbox.start()
        try:
            worker = Worker(settings, s3, bus, outbox)
            await worker.drain_inherited(stop)
            log.info("worker.ready", slots=[s.slot_id for s in worker.slots], pool=settings.resource_pool)
            spec = ConsumerSpec(
                durable=f"worker-{settings.worker_id}",
                stream=subjects.EVENTS,
                filter_subjects=[subjects.worker_filter(settings.worker_id)],
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
