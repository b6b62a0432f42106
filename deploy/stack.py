"""The local stack: NATS, Postgres and S3 (deploy.parts), then the five services and the workers.

The services and workers run under supervisord (deploy.supervise), which restarts any that exits; the
parts are started and stopped directly. ``up`` is idempotent (what already runs is kept, what died is
started again, a changed size or setting is applied), waits for every process it started to say it is
ready, and returns; the processes outlive it. ``down`` stops the processes through supervisord, then
supervisord, then the parts. Everything lives under one state directory: credentials, config, pids,
logs, data.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import structlog

from deploy import parts, supervise
from schemas import ports, subjects
from schemas.cluster import CLUSTER_BUCKET, CLUSTER_KEY
from services import runtime

log = structlog.get_logger(__name__)

SERVICES = ("tracker", "searcher", "scheduler", "gateway")
# The log event each process writes once it serves; `up` waits for it.
READY_MARKERS = {
    "tracker": '"consumer.started"',
    "searcher": '"consumer.started"',
    "scheduler": '"consumer.started"',
    "worker": '"consumer.started"',
}
SERVICE_USERS = ("gateway", "searcher", "scheduler", "tracker")
# The fixed NATS users; each worker gets one more of its own, worker-<i> (nats_users). "admin" bootstraps
# the streams and buckets and is for operators; no process of the stack uses it.
NATS_USERS = (*SERVICE_USERS, "admin", "reader")


def nats_users(workers: int) -> tuple[str, ...]:
    """Every NATS user of a stack with ``workers`` workers (a worker's user is its worker id)."""
    return NATS_USERS + tuple(f"worker-{i}" for i in range(workers))


# What no user but admin may do: manage streams (KV buckets are streams too) or read a stream's messages
# by a request body that no permission can look into (key-value gets go by DIRECT.GET, key in the subject).
_STREAM_ADMIN = ["$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.UPDATE.>", "$JS.API.STREAM.DELETE.>",
                 "$JS.API.STREAM.PURGE.>", "$JS.API.STREAM.MSG.DELETE.>", "$JS.API.STREAM.MSG.GET.>"]


def _durable(stream: subjects.StreamSpec, durable: str) -> list[str]:
    """JetStream API a durable pull consumer of one's own needs: (re)create, info, delete, fetch, ack, and
    dead-letter to its own subject."""
    s = stream.name
    return [f"$JS.API.CONSUMER.CREATE.{s}.{durable}", f"$JS.API.CONSUMER.CREATE.{s}.{durable}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{s}.{durable}", f"$JS.API.CONSUMER.INFO.{s}.{durable}",
            f"$JS.API.CONSUMER.DELETE.{s}.{durable}", f"$JS.API.CONSUMER.MSG.NEXT.{s}.{durable}",
            f"$JS.ACK.{s}.{durable}.>", f"$JS.API.STREAM.INFO.{s}", subjects.deadletter_subject(durable)]


def _reads(stream: subjects.StreamSpec) -> list[str]:
    """JetStream API an ordered (ephemeral, unacknowledged) read of a stream needs (Bus.read)."""
    s = stream.name
    return [f"$JS.API.STREAM.INFO.{s}", f"$JS.API.CONSUMER.CREATE.{s}", f"$JS.FC.{s}.>"]


def _kv(bucket: str, key: str, *, write: bool) -> list[str]:
    """One key of a key-value bucket: direct get of that key (and put, with ``write``)."""
    read = [f"$JS.API.STREAM.INFO.KV_{bucket}", f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{key}"]
    return read + ([f"$KV.{bucket}.{key}"] if write else [])


def _user(publish: list[str], subscribe: list[str]) -> dict[str, dict[str, list[str]]]:
    return {"publish": {"allow": sorted(set(publish)), "deny": _STREAM_ADMIN},
            "subscribe": {"allow": sorted(set(subscribe))}}


def user_permissions(user: str) -> dict[str, dict[str, list[str]]] | None:
    """One NATS user's permissions (None: admin, everything); publish allow-lists of events come from
    schemas.subjects.OWNERS, so a principal publishes only the event types it owns."""
    inbox = f"{runtime.inbox_prefix(user)}.>"
    E = subjects.EVENTS
    match user:
        case "admin":
            return None
        case "reader":
            # The credential for outside systems (README "Bus"): subscribes to metrics and domain events as
            # they are published; publishes nothing, so it forges nothing and calls no JetStream API.
            return {"publish": {"deny": [">"]},
                    "subscribe": {"allow": [subjects.ALL_METRICS, subjects.ALL_EVENTS, inbox]}}
        case "gateway":
            # Its durable: the searcher's retention decisions, whose objects it deletes (services/gateway/collector.py).
            return _user(subjects.publish_allow("gateway") + _reads(E) + _durable(E, "gateway-gc")
                         + _kv(CLUSTER_BUCKET, CLUSTER_KEY, write=False),
                         [inbox, subjects.ALL_METRICS, subjects.ALL_EVENTS])  # live metrics (SSE)
        case "searcher":
            return _user(subjects.publish_allow("searcher") + _durable(E, "searcher")
                         + _kv(runtime.SNAPSHOT_BUCKET, "searcher", write=True), [inbox])
        case "scheduler":
            return _user(subjects.publish_allow("scheduler") + _durable(E, "scheduler")
                         + _kv(runtime.SNAPSHOT_BUCKET, "scheduler", write=True)
                         + _kv(CLUSTER_BUCKET, CLUSTER_KEY, write=True), [inbox, subjects.HEARTBEAT_SUBJECT])
        case "tracker":
            # Its three durables, and ordered reads of every stream for `kiln events replay`.
            return _user([*_durable(E, "tracker-events"), *_durable(subjects.METRICS, "tracker-metrics"),
                          *_durable(subjects.LOGS, "tracker-logs"),
                          *(r for spec in subjects.ALL_STREAMS for r in _reads(spec))], [inbox])
        case _ if user.startswith("worker-"):
            # One user per worker (its id): its own and its trials' facts, on subjects carrying its id only.
            return _user(subjects.publish_allow("worker", user) + [subjects.heartbeat_subject(user)]
                         + _durable(E, f"worker-{user}") + _reads(E), [inbox])
        case _:
            raise ValueError(f"no NATS permissions defined for user {user!r}")


def nats_permissions(users: Iterable[str]) -> dict[str, dict[str, dict[str, list[str]]]]:
    """deploy.parts.PartsConfig.nats_permissions for these users (admin is left unrestricted)."""
    out = {}
    for user in users:
        perms = user_permissions(user)
        if perms is not None:
            out[user] = perms
    return out


class StackError(RuntimeError):
    """The stack could not come up; the message names the process and shows its log tail."""


class StackConfig(msgspec.Struct, kw_only=True):
    """Ports, sizes and the state directory of a local stack."""

    state_dir: Path
    host: str = ports.HOST
    nats_port: int = ports.NATS_PORT
    nats_monitor_port: int = ports.NATS_MONITOR_PORT
    # NATS servers: 1, or a cluster (3: JetStream keeps every stream and bucket on all three and goes on with
    # one of them down). Fixed when the state dir is first used.
    nats_cluster: int = 1
    nats_cluster_ports_base: int = ports.NATS_CLUSTER_PORTS_BASE
    pg_port: int = ports.PG_PORT
    s3_port: int = ports.S3_PORT
    s3_ports_base: int = ports.S3_PORTS_BASE
    http_port: int = ports.HTTP_PORT
    workers: int = 1
    # Worker agents on other hosts (ids starting "worker-"): each gets its own NATS user, and `up` writes what
    # it needs to join to <state>/agents/<id>.env (README "Running on a cluster").
    remote_workers: list[str] = []
    slots_per_worker: int = 2
    worker_timeout_s: float = 10.0
    max_context_bytes: int = 96 * 1024 * 1024

    @classmethod
    def load(cls, state_dir: Path | None = None, **overrides: object) -> StackConfig:
        """Defaults, then the saved stack.json of that state dir, then ``KILN_*_PORT`` env, then overrides."""
        root = (state_dir or Path(os.environ.get("KILN_STATE_DIR", ".kiln"))).resolve()
        values: dict[str, object] = {}
        saved = root / "stack.json"
        if saved.exists():
            values.update(json.loads(saved.read_text()))
        for name in cls.__struct_fields__:
            env = os.environ.get(f"KILN_{name.upper()}")
            if env is not None and name != "state_dir":
                values[name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["state_dir"] = str(root)
        return msgspec.convert(values, cls, strict=False, dec_hook=_path_hook)

    @property
    def master_url(self) -> str:
        """The gateway's URL."""
        return f"http://{self.host}:{self.http_port}"


def _path_hook(tp: type, value: object) -> object:
    if tp is Path and isinstance(value, str):
        return Path(value)
    raise NotImplementedError(f"cannot convert {value!r} to {tp}")


class Credentials(msgspec.Struct, kw_only=True):
    """Secrets of one stack, generated once and kept in the state dir (mode 0600)."""

    nats: dict[str, str]
    pg_password: str
    s3_access_key: str
    s3_secret_key: str
    # The gateway's first admin (user "admin"); `kiln up` signs the CLI in with it.
    admin_password: str = ""
    # The NATS servers of a cluster authenticate each other's routes with it.
    nats_route_password: str = ""

    @classmethod
    def load_or_create(cls, state_dir: Path, users: Iterable[str] = NATS_USERS) -> Credentials:
        """Read the stack's credentials, creating them (or the ``users`` missing from them) on first use."""
        path = state_dir / "credentials.json"
        users = tuple(users)
        if path.exists():
            creds = msgspec.json.decode(path.read_bytes(), type=cls)
            missing = [user for user in users if user not in creds.nats]
            if not missing and creds.admin_password and creds.nats_route_password:
                return creds
            # A state dir from before a user existed (e.g. "reader"): add only that user, keep the rest.
            creds.nats.update({user: secrets.token_urlsafe(18) for user in missing})
            creds.admin_password = creds.admin_password or secrets.token_urlsafe(18)
            creds.nats_route_password = creds.nats_route_password or secrets.token_urlsafe(18)
        else:
            creds = cls(
                nats={user: secrets.token_urlsafe(18) for user in users},
                pg_password=secrets.token_urlsafe(18),
                s3_access_key="kiln" + secrets.token_hex(6),
                s3_secret_key=secrets.token_urlsafe(24),
                admin_password=secrets.token_urlsafe(18),
                nats_route_password=secrets.token_urlsafe(18),
            )
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(msgspec.json.encode(creds))
        return creds


class StackInfo(msgspec.Struct, kw_only=True):
    """What ``up`` reports: where the stack is, how long it took, and what it changed on a running one."""

    master_url: str
    state_dir: str
    seconds: float
    changes: list[str] = []


class ProcessStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One process of the stack as ``status`` sees it."""

    name: str
    pid: int | None
    alive: bool
    # How often supervisord restarted it on its own since supervisord started (the `up` that started the
    # stack); always 0 for the parts, which are not supervised.
    restarts: int
    uptime_s: float | None
    # supervisord's state (RUNNING, STARTING, BACKOFF, FATAL, STOPPED...); RUNNING/STOPPED for the parts.
    state: str


def stack_users(cfg: StackConfig) -> tuple[str, ...]:
    """The NATS users of this stack: services, local workers, remote workers."""
    return nats_users(cfg.workers) + tuple(w for w in cfg.remote_workers if w not in nats_users(cfg.workers))


def parts_config(cfg: StackConfig, creds: Credentials) -> parts.PartsConfig:
    """The infrastructure half of the stack config: only this size's NATS users (a removed worker's is gone)."""
    users = {user: creds.nats[user] for user in stack_users(cfg)}
    return parts.PartsConfig(
        state_dir=cfg.state_dir, host=cfg.host, nats_port=cfg.nats_port, nats_monitor_port=cfg.nats_monitor_port,
        nats_cluster=cfg.nats_cluster, nats_cluster_ports_base=cfg.nats_cluster_ports_base,
        nats_route_password=creds.nats_route_password, pg_port=cfg.pg_port, s3_port=cfg.s3_port,
        s3_ports_base=cfg.s3_ports_base, nats_users=users,
        nats_permissions=nats_permissions(users), pg_password=creds.pg_password, s3_access_key=creds.s3_access_key,
        s3_secret_key=creds.s3_secret_key,
    )


def service_env(cfg: StackConfig, creds: Credentials, user: str) -> dict[str, str]:
    """Environment of one service process: its own NATS user, the stores, nothing global."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update({
        "KILN_NATS_URL": ",".join(nats_urls(cfg)),
        "KILN_NATS_USER": user,
        "KILN_NATS_PASSWORD": creds.nats[user],
        "KILN_S3_ENDPOINT": f"{cfg.host}:{cfg.s3_port}",
        "KILN_S3_ACCESS_KEY": creds.s3_access_key,
        "KILN_S3_SECRET_KEY": creds.s3_secret_key,
        "KILN_S3_BUCKET": "kiln",
        "KILN_PG_DSN": f"postgresql://kiln:{creds.pg_password}@{cfg.host}:{cfg.pg_port}/kiln",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def nats_urls(cfg: StackConfig) -> list[str]:
    """Every NATS server's client URL (one, or a cluster's): what services, workers and tools connect to."""
    return [f"nats://{cfg.host}:{port}" for port in nats_client_ports(cfg)]


def nats_client_ports(cfg: StackConfig) -> list[int]:
    """The client port of each NATS server (deploy.parts.nats_node_ports)."""
    return [cfg.nats_port] + [cfg.nats_cluster_ports_base + 3 * i + 1 for i in range(1, cfg.nats_cluster)]


def stream_replicas(cfg: StackConfig) -> int:
    """Replicas of the streams and buckets: every server of a cluster up to 3 (JetStream's usual R3)."""
    return min(cfg.nats_cluster, 3)


def _processes(cfg: StackConfig, creds: Credentials) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, argv, env) of every Kiln process of the stack, in start order."""
    py = sys.executable
    out = []
    for svc in SERVICES:
        env = service_env(cfg, creds, svc)
        if svc == "gateway":
            env.update(KILN_HTTP_HOST=cfg.host, KILN_HTTP_PORT=str(cfg.http_port),
                       KILN_MAX_CONTEXT_BYTES=str(cfg.max_context_bytes),
                       KILN_ADMIN_PASSWORD=creds.admin_password)  # used on its first start only
        if svc == "scheduler":
            env["KILN_WORKER_TIMEOUT_S"] = str(cfg.worker_timeout_s)
        out.append((svc, [py, "-m", f"services.{svc}.main"], env))
    for i in range(cfg.workers):
        env = service_env(cfg, creds, f"worker-{i}")  # its own NATS user, named as its worker id
        env.update(
            KILN_WORKER_ID=f"worker-{i}",
            KILN_ADDRESS=cfg.host,  # where a trial spanning local workers meets its rank 0
            KILN_CPU_SLOTS=str(cfg.slots_per_worker),
            KILN_WORK_DIR=str(cfg.state_dir / "work"),
            KILN_MASTER_URL=cfg.master_url,
            # No store key for trials: they get presigned URLs for their own experiment's checkpoints from
            # their worker (services/worker/link.py).
        )
        out.append((f"worker-{i}", [py, "-m", "services.worker.main"], env))
    return out


REPO_ROOT = Path(__file__).resolve().parent.parent
# supervisord priorities: lower starts first and stops last (services before workers).
_SERVICE_PRIORITY = 10
_WORKER_PRIORITY = 100


def _base_env() -> dict[str, str]:
    """supervisord's own environment, which its programs inherit (each program's config adds its own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}


def _programs(cfg: StackConfig, creds: Credentials) -> list[supervise.Program]:
    """Every Kiln process of the stack as a supervisord program."""
    out = []
    for i, (name, argv, env) in enumerate(_processes(cfg, creds)):
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        priority = _WORKER_PRIORITY if name.startswith("worker-") else _SERVICE_PRIORITY + i
        out.append(supervise.Program(name=name, argv=argv, env=env, log_path=cfg.state_dir / "logs" / f"{name}.log",
                                     pid_path=parts.pid_path(cfg.state_dir, name), priority=priority))
    return out


def _saved_sizes(state_dir: Path) -> tuple[int, int] | None:
    """(workers, slots_per_worker) of the stack.json an earlier ``up`` wrote, if any."""
    try:
        saved = json.loads((state_dir / "stack.json").read_text())
        return int(saved["workers"]), int(saved["slots_per_worker"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _check_nats_cluster_kept(cfg: StackConfig) -> None:
    """A stack's NATS stays one server or the cluster it started as: a standalone JetStream store does not
    become a clustered one by restarting it (move the streams with a backup and restore, e.g. `nats` CLI)."""
    try:
        saved = int(json.loads((cfg.state_dir / "stack.json").read_text()).get("nats_cluster", 1))
    except (FileNotFoundError, ValueError, TypeError, AttributeError):
        return
    if saved != cfg.nats_cluster and (cfg.state_dir / "nats").exists():
        raise StackError(f"this stack's NATS runs {saved} server(s); --nats-cluster {cfg.nats_cluster} needs a new"
                         f" state dir (KILN_STATE_DIR), not {cfg.state_dir}")


def private_state_dir(state_dir: Path) -> None:
    """Nothing in the state dir is readable by other users (trials run as one): 0711 on the dir, so a trial can
    pass through to its work dir under ``work/`` without listing anything; every other entry 0700/0600.

    The parts' data (the S3 store's volume files above all), logs, configs and credentials stay the
    services'. Postgres's data dir keeps its owner (an unprivileged user) and its 0700.
    """
    state_dir.chmod(0o711)
    for entry in state_dir.iterdir():
        if entry.name == "work" or entry.is_symlink():
            continue
        entry.chmod(0o700 if entry.is_dir() else 0o600)


def up(cfg: StackConfig, timeout: float = 90.0) -> StackInfo:
    """Start whatever is not running yet, apply a changed size or setting, and wait until every piece is ready."""
    started = time.monotonic()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    previous = _saved_sizes(cfg.state_dir)
    _check_nats_cluster_kept(cfg)
    (cfg.state_dir / "stack.json").write_bytes(msgspec.json.encode(cfg, enc_hook=str))
    for worker in cfg.remote_workers:
        try:
            if not worker.startswith("worker-"):
                raise ValueError("it does not start with 'worker-'")
            subjects.check_token(worker, "remote worker id")
        except ValueError as exc:
            raise StackError(f"remote worker {worker!r}: {exc} (an id is 'worker-' then letters, digits, '_', '-')"
                             ) from exc
    creds = Credentials.load_or_create(cfg.state_dir, stack_users(cfg))
    pcfg = parts_config(cfg, creds)
    try:
        parts.start_nats(pcfg)
        parts.start_postgres(pcfg)
        parts.start_s3(pcfg)
    except parts.PartError as exc:
        raise StackError(str(exc)) from exc
    private_state_dir(cfg.state_dir)
    bootstrap_bus(cfg, creds)
    write_agent_env_files(cfg, creds)
    programs = _programs(cfg, creds)
    paths = supervise.Paths.of(cfg.state_dir)
    changes = []
    if previous is not None and previous[0] != cfg.workers:
        changes.append(f"workers: {previous[0]} -> {cfg.workers}")
    if previous is not None and previous[1] != cfg.slots_per_worker:
        changes.append(f"slots per worker: {previous[1]} -> {cfg.slots_per_worker}")
    try:
        base = _base_env()
        supervise.write_config(paths, supervise.config_text(paths, programs, directory=REPO_ROOT, base_env=base))
        sup = supervise.Supervisor(paths)
        if sup.running():
            pending, done = _apply(sup, cfg.state_dir, programs)
            changes += done
        else:
            orphans = _stop_orphans(cfg.state_dir)
            if orphans:
                changes.append(f"restarted under supervisord: {', '.join(orphans)}")
            # Offsets before supervisord starts them all: readiness is judged on what they write from here.
            pending = {p.name: _size(p.log_path) for p in programs}
            sup = supervise.start_daemon(paths, env=base, cwd=REPO_ROOT)
        _wait_ready(cfg, sup, programs, pending, time.monotonic() + timeout)
    except supervise.SupervisorError as exc:
        raise StackError(str(exc)) from exc
    except supervise.RPC_ERRORS as exc:
        raise StackError(f"lost supervisord ({paths.socket}) while starting the stack: {exc!r}") from exc
    for change in changes:
        log.info("stack changed", change=change)
    private_state_dir(cfg.state_dir)  # again: supervisord's own files are new on a first `up`
    return StackInfo(master_url=cfg.master_url, state_dir=str(cfg.state_dir), seconds=time.monotonic() - started,
                     changes=changes)


def agent_env_path(cfg: StackConfig, worker_id: str) -> Path:
    """Where ``up`` writes the settings a remote worker agent needs (0600: its password, the store's keys)."""
    return cfg.state_dir / "agents" / f"{worker_id}.env"


def write_agent_env_files(cfg: StackConfig, creds: Credentials) -> None:
    """One env file per remote worker: every NATS server, its own NATS user, the shared S3 store, the master."""
    from deploy import cluster  # deploy.cluster renders the same settings for Kubernetes and systemd

    if not cfg.remote_workers:
        return
    agents = cfg.state_dir / "agents"
    agents.mkdir(mode=0o700, exist_ok=True)
    for worker in cfg.remote_workers:
        env = cluster.agent_env(worker_id=worker, nats_urls=nats_urls(cfg), password=creds.nats[worker],
                                s3_endpoint=f"{cfg.host}:{cfg.s3_port}", s3_access_key=creds.s3_access_key,
                                s3_secret_key=creds.s3_secret_key, master_url=cfg.master_url)
        path = agent_env_path(cfg, worker)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(cluster.env_file_text(env))


def bootstrap_bus(cfg: StackConfig, creds: Credentials, timeout: float = 30.0) -> None:
    """Create the streams and key-value buckets as admin (idempotent): services may not, they only use them."""
    async def run() -> None:
        settings = runtime.BusSettings(nats_url=",".join(nats_urls(cfg)), nats_user="admin",
                                       nats_password=creds.nats["admin"], stream_replicas=stream_replicas(cfg))
        while True:
            try:
                async with runtime.connect_bus(settings, "bootstrap", ensure=True):
                    return
            except Exception as exc:  # noqa: BLE001 - retried until the outer timeout, which reports it
                # A cluster that just started elects its JetStream leader first ("temporarily unavailable",
                # "insufficient resources" while fewer servers than replicas have joined).
                log.info("bootstrap retrying", error=repr(exc))
                await asyncio.sleep(0.5)

    try:
        # In a thread: `up` may be called from code that already runs an event loop.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, asyncio.wait_for(run(), timeout)).result()
    except Exception as exc:
        raise StackError(f"could not create the streams and buckets on NATS: {exc!r}") from exc


def _apply(sup: supervise.Supervisor, state_dir: Path,
           programs: list[supervise.Program]) -> tuple[dict[str, int], list[str]]:
    """Bring a running supervisord to the written config; (log offset of each process started, what changed)."""
    added, changed, removed = sup.update()
    done = []
    # Changed (e.g. slots per worker) and removed (workers beyond the new count) stop together, in parallel.
    sup.stop(changed + removed)
    for name in removed:
        sup.remove(name)
        parts.pid_path(state_dir, name).unlink(missing_ok=True)
    if removed:
        done.append(f"stopped and removed: {', '.join(_ordered(removed))}")
    logs = {p.name: p.log_path for p in programs}
    pending: dict[str, int] = {}
    for name in _ordered(changed + added):
        pending[name] = _size(logs[name])
        if name in changed:
            sup.remove(name)
        sup.add(name)  # autostart: it starts now, with the new settings
    if changed:
        done.append(f"restarted with the new settings: {', '.join(_ordered(changed))}")
    if added:
        done.append(f"started: {', '.join(_ordered(added))}")
    revived = []
    infos = sup.processes()
    for name in _ordered([n for n in infos if n not in pending and n in logs]):
        state = infos[name]["statename"]
        if state == "BACKOFF":
            sup.stop([name])  # crash-looping: start it afresh now rather than after its backoff
        elif state not in supervise.DOWN_STATES:
            continue  # running or (re)starting: kept as it is
        pending[name] = _size(logs[name])
        sup.start(name)
        revived.append(f"{name} (was {state})")
    if revived:
        done.append(f"started again: {', '.join(revived)}")
    return pending, done


def _ordered(names: list[str]) -> list[str]:
    """Services in start order, then workers by number."""
    def key(name: str) -> tuple[int, int, str]:
        if name in SERVICES:
            return (0, SERVICES.index(name), name)
        suffix = name.removeprefix("worker-")
        return (1, int(suffix), name) if suffix.isdigit() else (2, 0, name)
    return sorted(names, key=key)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _wait_ready(cfg: StackConfig, sup: supervise.Supervisor, programs: list[supervise.Program],
                pending: dict[str, int], deadline: float) -> None:
    """Wait for each started process's ready marker; a process that exits or restarts meanwhile fails ``up``."""
    logs = {p.name: p.log_path for p in programs}
    pids: dict[str, int] = {}
    pending = dict(pending)
    while pending:
        infos = sup.processes()
        for name, offset in list(pending.items()):
            info = infos.get(name, {"statename": "UNKNOWN", "start": 0, "pid": 0, "description": "not configured"})
            state = info["statename"]
            if state == "STOPPED" and not info["start"]:
                continue  # not spawned yet: supervisord starts its programs on its first tick
            if state not in ("STARTING", "RUNNING") or pids.setdefault(name, info["pid"]) != info["pid"]:
                # supervisord would keep restarting it; stop it so the failure is seen, not looped over.
                try:
                    sup.stop([name])
                except supervise.SupervisorError as exc:
                    log.warning("could not stop a failed process", process=name, error=str(exc))
                raise StackError(f"{name} exited while starting ({state}: {info.get('description', '')}):\n"
                                 f"{_tail(logs[name], offset)}")
            if _ready(cfg, name, logs[name], offset):
                del pending[name]
        if pending and time.monotonic() > deadline:
            name = _ordered(list(pending))[0]
            raise StackError(f"{name} was not ready in time:\n{_tail(logs[name], pending[name])}")
        if pending:
            time.sleep(0.1)


def _ready(cfg: StackConfig, name: str, log_path: Path, offset: int) -> bool:
    if name == "gateway":
        return _http_ok(f"{cfg.master_url}/health")
    marker = READY_MARKERS.get("worker" if name.startswith("worker-") else name)
    return marker is None or marker in _read_from(log_path, offset)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path, offset: int, lines: int = 30) -> str:
    return "\n".join(_read_from(path, offset).splitlines()[-lines:])


def _program_names(state_dir: Path) -> list[str]:
    """Services and workers that have a pid file here, in start order."""
    pids = state_dir / "pids"
    names = [p.stem for p in pids.glob("*.pid")] if pids.exists() else []
    return _ordered([n for n in names if n not in parts.ALL_PART_NAMES and n != "supervisord"])


def _is_kiln_process(pid: int) -> bool:
    """Whether pid runs one of our services (``python -m services.<name>.main``), not a reused pid."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any(a.startswith("services.") and a.endswith(".main") for a in argv)


def _stop_orphans(state_dir: Path) -> list[str]:
    """Stop, in parallel, services and workers that run without a supervisord (it died, or an older ``up``)."""
    victims = []
    for name in _program_names(state_dir):
        pid = parts.read_pid(state_dir, name)
        if pid is not None and parts.pid_alive(pid) and _is_kiln_process(pid):
            victims.append((name, pid))
        else:
            parts.pid_path(state_dir, name).unlink(missing_ok=True)
    if victims:
        with ThreadPoolExecutor(max_workers=len(victims)) as pool:
            list(pool.map(lambda v: parts.stop_pid(v[1], timeout=float(supervise.STOP_WAIT_SECS)), victims))
        for name, _ in victims:
            parts.pid_path(state_dir, name).unlink(missing_ok=True)
        log.warning("stopped processes that ran without supervisord", processes=[n for n, _ in victims])
    return [n for n, _ in victims]


def down(cfg: StackConfig) -> list[str]:
    """Stop workers, then services (each set in parallel), then supervisord, then the parts.

    Returns the names stopped.
    """
    stopped = []
    paths = supervise.Paths.of(cfg.state_dir)
    sup = supervise.Supervisor(paths)
    if sup.running():
        try:
            names = list(sup.processes())
            stopped += sup.stop(_ordered([n for n in names if n.startswith("worker-")]))
            stopped += sup.stop(_ordered([n for n in names if not n.startswith("worker-")]))
            sup.shutdown()
        except (supervise.SupervisorError, *supervise.RPC_ERRORS) as exc:
            # Go on: what supervisord leaves behind is stopped by pid below, and the parts still go down.
            log.warning("supervisord did not stop cleanly", error=str(exc))
    pid = sup.pid()
    if pid is not None and parts.pid_alive(pid) and "supervisor.supervisord" in _cmdline(pid):
        parts.stop_pid(pid, timeout=float(supervise.STOP_WAIT_SECS))  # alive but not answering
    paths.pid_file.unlink(missing_ok=True)
    stopped += _stop_orphans(cfg.state_dir)
    for name in _program_names(cfg.state_dir):
        parts.pid_path(cfg.state_dir, name).unlink(missing_ok=True)
    for name in ("s3", "postgres", "nats", *parts.EXTRA_NATS_NAMES):
        pid = parts.read_pid(cfg.state_dir, name)
        if pid is not None and parts.pid_alive(pid):
            stopped.append(name)
    parts.stop_all(cfg.state_dir)
    return stopped


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def _uptime_s(pid: int) -> float | None:
    """Seconds since pid started, from /proc (for processes supervisord does not know)."""
    try:
        start_ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot_uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0.0, boot_uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def supervisor_pid(cfg: StackConfig) -> int | None:
    """supervisord's pid when it runs for this state dir."""
    sup = supervise.Supervisor(supervise.Paths.of(cfg.state_dir))
    return sup.pid() if sup.running() else None


def status(cfg: StackConfig) -> list[ProcessStatus]:
    """The parts, then every service and worker: pid, alive, restarts since ``up``, uptime, state."""
    rows = []
    for name in parts.ALL_PART_NAMES:
        pid = parts.read_pid(cfg.state_dir, name)
        if pid is None:
            continue
        alive = parts.pid_alive(pid)
        rows.append(ProcessStatus(name=name, pid=pid, alive=alive, restarts=0,
                                  uptime_s=_uptime_s(pid) if alive else None, state="RUNNING" if alive else "STOPPED"))
    paths = supervise.Paths.of(cfg.state_dir)
    sup = supervise.Supervisor(paths)
    restarts = supervise.read_restarts(paths)
    try:
        infos = sup.processes() if sup.running() else None
    except supervise.RPC_ERRORS:
        infos = None
    if infos is None:
        # No supervisord: report what the pid files say (nothing restarts these).
        for name in _program_names(cfg.state_dir):
            pid = parts.read_pid(cfg.state_dir, name)
            alive = pid is not None and parts.pid_alive(pid) and _is_kiln_process(pid)
            rows.append(ProcessStatus(name=name, pid=pid, alive=alive, restarts=restarts.get(name, 0),
                                      uptime_s=_uptime_s(pid) if alive and pid else None,
                                      state="UNSUPERVISED" if alive else "STOPPED"))
        return rows
    for name in _ordered(list(infos)):
        info = infos[name]
        pid = int(info["pid"]) or None
        rows.append(ProcessStatus(
            name=name, pid=pid, alive=pid is not None, restarts=restarts.get(name, 0),
            uptime_s=float(info["now"] - info["start"]) if pid is not None and info["start"] else None,
            state=str(info["statename"]),
        ))
    return rows
