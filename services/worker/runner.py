"""Runs one allocation: fetch the code context, start the trial process, ship its logs, report its exit.

Everything it reports (and everything the trial reports through its link) goes through ``publish``: the
worker's outbox, which stores it before returning and publishes it to the bus in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from schemas import context as code_context
from schemas import events as ev
from schemas.config import ExperimentConfig, config_from_wire
from schemas.data import locate
from schemas.trial import CLUSTER_INFO_ENV, ClusterInfo, TrialInfo, stored_checkpoint_prefix
from services.worker.link import Identity, StopWatcher, Store, StoreGrant, TrialLink, socket_path
from services.worker.network import interface_of
from services.worker.outbox import OversizedEvent
from services.worker.sandbox import TrialRuntime, give_to

log = structlog.get_logger(__name__)

# Stores an event durably and returns its outbox row id (services.worker.outbox.Outbox.append).
Publish = Callable[[Any], Awaitable[int]]

# Environment a trial inherits from the worker; everything else (the worker's own credentials
# above all) stays out of the trial.
def interpreter_env(path: str, executable: str = sys.executable, prefix: str = sys.prefix,
                    base_prefix: str = sys.base_prefix) -> dict[str, str]:
    """PATH (and VIRTUAL_ENV) so that ``python3`` in a trial is the worker's interpreter, the one with Kiln,
    whatever the shell that started the stack had first on its PATH."""
    bin_dir = os.path.dirname(executable)
    rest = [p for p in path.split(os.pathsep) if p and p != bin_dir]
    env = {"PATH": os.pathsep.join([bin_dir, *rest])}
    if prefix != base_prefix:  # a virtual environment
        env["VIRTUAL_ENV"] = prefix
    return env


_INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "VIRTUAL_ENV", "CUDA_HOME", "LD_LIBRARY_PATH")
LOG_FLUSH_S = 0.25
LOG_BATCH_LINES = 500
# Text per log batch: with lines of up to 64 KiB, a batch stays well inside one 1 MiB bus message.
LOG_BATCH_CHARS = 256 * 1024
KILL_GRACE_S = 10.0
# The trial's HOME, inside its work dir.
HOME_DIR = ".home"
# Log line numbers of host r of a multi-host allocation start at r x this, so the hosts' lines never
# collide in (allocation_id, line_no).
NODE_LINE_STRIDE = 100_000_000


# Launcher modules that start one process per slot themselves (Kiln's, and Determined's names for them,
# which the ``determined`` package Kiln ships answers): the worker runs such an entrypoint once per host.
_LAUNCHER_MODULES = tuple(f"{pkg}.launch.{name}" for pkg in ("kiln", "determined")
                          for name in ("torch_distributed", "horovod", "deepspeed"))
# A failed trial's first traceback: at most this many lines are repeated at the end of its log, and this much
# of its last line goes into the exit reason.
FIRST_ERROR_LINES = 60
FIRST_ERROR_REASON_CHARS = 400


class Rendezvous(msgspec.Struct, frozen=True, kw_only=True):
    """Where the hosts of a trial spanning several meet: torchrun's static rendezvous on node 0."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


def entrypoint_argv(entrypoint: str | list[str], python: str = sys.executable, processes: int = 1,
                    rendezvous: Rendezvous | None = None, launches_own_ranks: bool = False) -> list[str]:
    """The command line for a Determined-style entrypoint.

    ``module:function`` runs that function through ``kiln.exec``; a command line runs as is, with a
    leading ``python``/``python3`` replaced by the worker's interpreter (where kiln and torch live).
    With several slots, a Python entrypoint is started once per slot by torchrun (``--standalone``,
    one process per slot); on several hosts, each host's torchrun joins node 0's rendezvous and ranks
    are numbered across hosts. An entrypoint that names its own launcher (torchrun, horovodrun...) is
    left to it, and so is one that runs a launcher module (``python3 -m kiln.launch.torch_distributed ...``
    or Determined's ``determined.launch.*``), which starts the ranks on the trial's slots itself, and a
    script that does (``launches_own_ranks``, see ``script_launches_own_ranks``).
    """
    if isinstance(entrypoint, str):
        text = entrypoint.strip()
        argv = [python, "-m", "kiln.exec", text] if ":" in text and " " not in text and "/" not in text \
            else shlex.split(text)
    else:
        argv = list(entrypoint)
    if argv and argv[0] in ("python", "python3", f"python{sys.version_info.major}.{sys.version_info.minor}"):
        argv[0] = python
    if not argv or argv[0] != python:
        return argv
    if launches_own_ranks or (len(argv) > 2 and argv[1] == "-m" and argv[2] in _LAUNCHER_MODULES):
        return argv
    if rendezvous is not None and rendezvous.nnodes > 1:
        r = rendezvous
        return [python, "-m", "torch.distributed.run", f"--nnodes={r.nnodes}", f"--node_rank={r.node_rank}",
                f"--nproc_per_node={processes}", f"--master_addr={r.master_addr}", f"--master_port={r.master_port}",
                *argv[1:]]
    if processes > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *argv[1:]]
    return argv


# Bigger scripts are not read for the marker below (a training script is far smaller).
_SCRIPT_SCAN_BYTES = 1 << 20


def script_launches_own_ranks(entrypoint: str | list[str], work_dir: Path) -> bool:
    """Whether a ``python3 script.py ...`` entrypoint starts its own ranks: its code runs ``wrap_rank``.

    Determined asks a custom launcher to start each rank under ``python3 -m determined.launch.wrap_rank``
    (its Core API tutorial 4 does, in "launcher" mode); such a script must run once per host, not once per
    slot, or every slot would start all the ranks again.
    """
    argv = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    if len(argv) < 2 or not argv[0].startswith("python") or not argv[1].endswith(".py"):
        return False
    script = work_dir / argv[1]
    try:
        if not script.resolve().is_relative_to(work_dir.resolve()) or script.stat().st_size > _SCRIPT_SCAN_BYTES:
            return False
        text = script.read_text(errors="replace")
    except OSError:
        return False
    return "launch.wrap_rank" in text


def _rendezvous(a: ev.AllocationAssigned) -> Rendezvous | None:
    """The rendezvous of a multi-host allocation; None on a single host."""
    if len(a.nodes) < 2:
        return None
    return Rendezvous(nnodes=len(a.nodes), node_rank=a.node_rank, master_addr=a.nodes[0].address,
                      master_port=a.master_port)


_RANK_PREFIX = re.compile(r"^(\[rank=\d+\] |\[(?:rank|default)\d+\]:\s?)+")


class FirstTraceback:
    """Finds the first complete Python traceback in a trial's stderr, as it streams by.

    With several ranks their lines interleave, so each rank's lines (told apart by the ``[rank=N] `` that
    wrap_rank puts before them, or torch's ``[rankN]:``) are followed on their own; the first traceback to
    end, on any rank, is the one kept: the failing rank's own error, printed before the launcher's summary.
    """

    def __init__(self) -> None:
        self._open: dict[str, list[str]] = {}
        self.lines: list[str] = []  # the first complete traceback, prefixes kept

    def feed(self, text: str) -> None:
        """One line of stderr."""
        if self.lines:
            return
        match = _RANK_PREFIX.match(text)
        key = match.group(0) if match else ""
        body = text[match.end():] if match else text
        if body.startswith("Traceback (most recent call last):"):
            self._open[key] = [text]
            return
        lines = self._open.get(key)
        if lines is None:
            return
        lines.append(text)
        if body and not body[0].isspace():  # the exception line ends the traceback
            self.lines = lines[:FIRST_ERROR_LINES - 1] + ([lines[-1]] if len(lines) >= FIRST_ERROR_LINES else [])
            self._open.clear()

    def summary(self) -> str:
        """The exception line of the first traceback, with its rank (empty when there was none)."""
        if not self.lines:
            return ""
        last = self.lines[-1]
        match = _RANK_PREFIX.match(last)
        rank = re.search(r"\d+", match.group(0)) if match else None
        text = last[match.end():] if match else last
        where = f" (rank {rank.group(0)})" if rank else ""
        return (text[:FIRST_ERROR_REASON_CHARS] + where).strip()


def _grant(experiment_id: int, trial_id: int, config: ExperimentConfig, store: Store | None,
           sources: tuple[str, ...] = ()) -> StoreGrant:
    """What the trial may reach in the store: its experiment's checkpoints, a fine-tune's source checkpoints
    (``sources``, read-only), its own TensorBoard files (write only), and the Delta table its config names
    (read-only; the version it reads was pinned at submission)."""
    grant = StoreGrant.of(experiment_id, sources, trial_id=trial_id)
    source = config.delta_source
    if source is None:
        return grant
    return grant.with_table(locate(source.table), store.bucket if store is not None else "")


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the worker dies, as a trial on a crashed host would (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass


class Allocation:
    """One trial process on this worker and everything it reports."""

    def __init__(
        self,
        assigned: ev.AllocationAssigned,
        info_base: ClusterInfo,
        work_root: Path,
        publish: Publish,
        fetch_context: Callable[[str], Awaitable[bytes]],
        watch_stops: StopWatcher,
        runtime: TrialRuntime | None = None,
        store: Store | None = None,
        context_limits: tuple[int, int] = (code_context.DEFAULT_MAX_UNPACKED_BYTES, code_context.DEFAULT_MAX_FILES),
    ) -> None:
        self.assigned = assigned
        # (unpacked bytes, members): the gateway's limits again, held while the context is streamed to disk.
        self.context_limits = context_limits
        self.info_base = info_base
        self.dir = work_root / assigned.allocation_id
        self.publish = publish
        self.fetch_context = fetch_context
        self.watch_stops = watch_stops
        # As whom and with which interpreter the trial runs (services.worker.sandbox); default: as the worker.
        self.runtime = runtime or TrialRuntime(user=None, python=sys.executable)
        self.store = store
        self.link: TrialLink | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.killed = False
        # The outbox row of this allocation's AllocationExited: until it is published, heartbeats list
        # the allocation as finished, so the scheduler never judges it lost while the bus was away.
        self.exit_row = 0
        self._line_no = assigned.node_rank * NODE_LINE_STRIDE
        self._pending: list[ev.LogLine] = []
        self._pending_chars = 0
        self._flush_lock = asyncio.Lock()
        self.first_error = FirstTraceback()

    @property
    def allocation_id(self) -> str:
        """This allocation's id."""
        return self.assigned.allocation_id

    async def start(self) -> bool:
        """Fetch and unpack the context, start the process, publish TrialStarted. False if it could not."""
        a = self.assigned
        try:
            spec = a.spec
            if spec is None:
                raise RuntimeError("the allocation carries no trial spec (placed by an older scheduler)")
            config = config_from_wire(spec.config)
            data = await self.fetch_context(spec.context_digest)
            if code_context.digest(data) != spec.context_digest:
                raise code_context.ContextError("context digest mismatch")
            if self.dir.exists():
                shutil.rmtree(self.dir)
            await asyncio.to_thread(code_context.extract, data, self.dir, *self.context_limits)
            (self.dir / HOME_DIR).mkdir(exist_ok=True)
            # The work dir is the trial user's alone (0700): its code, its home, its link.
            owner = self.runtime.owner
            await asyncio.to_thread(give_to, self.dir, owner)
            self.link = TrialLink(socket_path(self.dir),
                                  Identity(experiment_id=a.experiment_id, trial_id=a.trial_id,
                                           allocation_id=a.allocation_id),
                                  self.publish, self.watch_stops, store=self.store,
                                  grant=_grant(a.experiment_id, a.trial_id, config, self.store,
                                               tuple(self._sources(spec).values())),
                                  owner=owner, check_peer=True)
            await self.link.start()
            argv = entrypoint_argv(config.entrypoint, python=self.runtime.python,
                                   processes=max(len(a.slot_ids), 1), rendezvous=_rendezvous(a),
                                   launches_own_ranks=script_launches_own_ranks(config.entrypoint, self.dir))
            user = self.runtime.user
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=self.dir,
                env=self._env(spec, config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group, so a kill reaches its children
                preexec_fn=_die_with_parent,  # runs after the switch to the trial user, so it sticks
                user=None if user is None else user.uid,
                group=None if user is None else user.gid,
                extra_groups=None if user is None else [],
            )
            self.link.admit(self.proc.pid)  # the link serves this process and its descendants only
        except Exception as exc:  # noqa: BLE001 - any failure to start is reported, not raised
            log.error("allocation.start_failed", allocation=a.allocation_id, error=repr(exc))
            if self.link is not None:
                await self.link.close(grace_s=0.0)
            await self._system_line(f"could not start trial: {exc}")
            await self._flush()
            self.exit_row = await self.publish(
                ev.AllocationExited(
                    experiment_id=a.experiment_id, trial_id=a.trial_id, allocation_id=a.allocation_id,
                    worker_id=a.worker_id, exit_code=None, reason=f"could not start: {exc}", exited_at=time.time(),
                    node_rank=a.node_rank,
                )
            )
            return False
        await self.publish(
            ev.TrialStarted(
                experiment_id=a.experiment_id, trial_id=a.trial_id, allocation_id=a.allocation_id,
                worker_id=a.worker_id, started_at=time.time(),
            )
        )
        log.info("allocation.started", allocation=a.allocation_id, pid=self.proc.pid, argv=argv)
        return True

    async def wait(self) -> None:
        """Ship logs until the process ends, then publish AllocationExited."""
        assert self.proc is not None and self.proc.stdout is not None and self.proc.stderr is not None
        flusher = asyncio.create_task(self._flush_periodically())
        await asyncio.gather(self._pump(self.proc.stdout, "stdout"), self._pump(self.proc.stderr, "stderr"))
        code = await self.proc.wait()
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        if self.link is not None:
            # What the trial sent before it exited is stored before its exit is.
            await self.link.close()
        with contextlib.suppress(OSError):
            os.utime(self.dir)  # ended now: the newest of the work dirs the worker keeps for debugging
        reason = "killed" if self.killed else ""
        if code != 0 and not self.killed and self.first_error.lines:
            # The last lines a reader sees (trial logs, --follow) are the failing rank's own error, not the
            # launcher's summary printed after it; the trial's exit reason names it too.
            await self._system_line("the trial's first error (the earliest traceback it printed):")
            for line in self.first_error.lines:
                await self._system_line(line)
            reason = f"exit code {code}: {self.first_error.summary()}"
        await self._system_line(f"trial process exited with code {code}")
        await self._flush()
        a = self.assigned
        self.exit_row = await self.publish(
            ev.AllocationExited(
                experiment_id=a.experiment_id, trial_id=a.trial_id, allocation_id=a.allocation_id,
                worker_id=a.worker_id, exit_code=code, killed=self.killed,
                reason=reason, exited_at=time.time(), node_rank=a.node_rank,
            )
        )
        log.info("allocation.exited", allocation=a.allocation_id, code=code, killed=self.killed)

    async def kill(self, grace_s: float = KILL_GRACE_S) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``."""
        self.killed = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _sources(self, spec: ev.TrialSpec) -> dict[str, str]:
        """The other experiments' checkpoints this trial may read (a fine-tune's source): uuid -> key prefix.
        Only one in the cluster's store can be granted; one stored elsewhere is read with the trial's own storage."""
        source = spec.source_checkpoint
        if source is None:
            return {}
        prefix = stored_checkpoint_prefix(source.storage, source.uuid, self.info_base.s3_bucket)
        return {source.uuid: prefix} if prefix is not None else {}

    def _env(self, spec: ev.TrialSpec, config: ExperimentConfig) -> dict[str, str]:
        a = self.assigned
        info = msgspec.structs.replace(
            self.info_base,
            allocation_id=a.allocation_id,
            worker_id=a.worker_id,
            latest_checkpoint=a.latest_checkpoint,
            restarts=a.restarts,
            slot_ids=list(a.slot_ids),
            container_rank=a.node_rank,
            container_addrs=[n.address for n in a.nodes] or self.info_base.container_addrs,
            master_port=a.master_port,
            link_path=str(self.link.path) if self.link is not None else "",
            checkpoint_prefixes=self._sources(spec),
            trial=TrialInfo(
                trial_id=a.trial_id,
                experiment_id=a.experiment_id,
                hparams=spec.hparams,
                trial_seed=spec.seed,
                config=spec.config,
                max_length=a.max_length,
            ),
        )
        env = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}
        env.update(interpreter_env(env.get("PATH", "")))
        env["HOME"] = str(self.dir / HOME_DIR)  # the trial user's caches (torch, pip...) stay in its work dir
        for k, v in self.runtime.env.items():
            env[k] = v + (os.pathsep + env[k] if env.get(k) and k.endswith("PATH") else "")
        env.update(config.environment_variables)
        env[CLUSTER_INFO_ENV] = msgspec.json.encode(info).decode()
        # Ports a trial's ranks may listen on (Determined's DistributedContext adds this offset to its own):
        # slots are never shared, so the lowest slot index keeps concurrent allocations on a host apart.
        env["DET_UNIQUE_PORT_OFFSET"] = str(min((int(d) for s in a.slot_ids if (d := s.lstrip("cpuda")).isdigit()),
                                                default=0))
        env["PYTHONUNBUFFERED"] = "1"
        if a.nodes and "GLOO_SOCKET_IFNAME" not in env and 0 <= a.node_rank < len(a.nodes):
            # Spanning hosts: the ranks' gloo connections go over the interface of this worker's address.
            ifname = interface_of(a.nodes[a.node_rank].address)
            if ifname is not None:
                env["GLOO_SOCKET_IFNAME"] = ifname
        if all(s.startswith("cpu") for s in a.slot_ids):
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(s.removeprefix("cuda") for s in a.slot_ids)
        return env

    async def _pump(self, stream: asyncio.StreamReader, name: str) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the reader's limit: take what is there
                raw = await stream.read(65536)
            if not raw:
                return
            text = raw.decode("utf-8", errors="replace").rstrip("\n")
            if name == "stderr":
                self.first_error.feed(text)
            await self._add_line(name, text)

    async def _add_line(self, stream: str, text: str) -> None:
        self._pending.append(ev.LogLine(line_no=self._line_no, stream=stream, text=text, ts=time.time()))  # type: ignore[arg-type]
        self._pending_chars += len(text)
        self._line_no += 1
        if len(self._pending) >= LOG_BATCH_LINES or self._pending_chars >= LOG_BATCH_CHARS:
            await self._flush()

    async def _system_line(self, text: str) -> None:
        await self._add_line("system", text)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(LOG_FLUSH_S)
            await self._flush()

    async def _flush(self) -> None:
        async with self._flush_lock:
            if not self._pending:
                return
            lines, self._pending, self._pending_chars = self._pending, [], 0
            await self._ship(lines)

    async def _ship(self, lines: list[ev.LogLine]) -> None:
        """One LogsShipped; a batch too big for a bus message (text that escapes badly) goes in halves."""
        a = self.assigned
        try:
            await self.publish(ev.LogsShipped(experiment_id=a.experiment_id, trial_id=a.trial_id,
                                              allocation_id=a.allocation_id, lines=lines))
        except OversizedEvent:
            if len(lines) > 1:
                await self._ship(lines[: len(lines) // 2])
                await self._ship(lines[len(lines) // 2:])
            else:
                line = lines[0]
                await self._ship([msgspec.structs.replace(line, text=line.text[:16384] + " [truncated]")])
