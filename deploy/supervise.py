"""supervisord for the Kiln processes of the local stack: its config, its daemon, its XML-RPC API.

``deploy.stack`` describes the processes (``Program``); this module writes them into a supervisord config
under the state dir, starts supervisord (daemonized, pid file and Unix socket in the state dir) and talks
to it through supervisor's own XML-RPC interface over that socket. supervisord restarts whatever exits;
``count_restarts`` reads those restarts back out of its log.

The parts (NATS, Postgres, S3) are not supervised: tests stop and start them on purpose (deploy.parts).

No I/O at import.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from supervisor.xmlrpc import Faults, SupervisorTransport

# Restart policy of every program. startsecs: a process that lives this long counts as started.
# A process that exits before that is retried after 1, 2, 3... s (supervisord's own linear backoff) up to
# START_RETRIES times, then given up (FATAL); one that exits later is restarted at once.
START_SECS = 1
START_RETRIES = 100
# SIGTERM, then SIGKILL to the process group after this long (a worker stops its trials first).
STOP_WAIT_SECS = 20
# sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107
_RPC_TIMEOUT_S = 30.0
_POLL_S = 0.1

# Process states (supervisor.states.ProcessStates), by the names the API reports.
ALIVE_STATES = frozenset({"STARTING", "RUNNING", "BACKOFF", "STOPPING"})
DOWN_STATES = frozenset({"STOPPED", "EXITED", "FATAL", "UNKNOWN"})

# What a call to a dead, dying or confused supervisord raises.
RPC_ERRORS = (OSError, xmlrpc.client.Error, http.client.HTTPException)

# Lines of supervisord's log that say a process was started, and that it ended by itself.
_SPAWNED = re.compile(r"\bspawned: '(?P<name>[^']+)' with pid \d+")
_EXITED = re.compile(r"\bexited: (?P<name>\S+) \(")
_STOPPED = re.compile(r"\bstopped: (?P<name>\S+) \(")


class SupervisorError(RuntimeError):
    """supervisord could not be started, or refused a request."""


class Program(msgspec.Struct, frozen=True, kw_only=True):
    """One supervised process: what it runs, with which environment, where it logs and records its pid."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    pid_path: Path
    priority: int = 100


class Paths(msgspec.Struct, frozen=True, kw_only=True):
    """Where supervisord keeps its config, socket, pid file and log for one state dir."""

    config: Path
    socket: Path
    pid_file: Path
    log: Path

    @classmethod
    def of(cls, state_dir: Path) -> Paths:
        """The paths for a state dir; the socket moves to a 0700 dir in /tmp when its path would be too long."""
        sock = state_dir / "supervisor.sock"
        if len(str(sock)) > _MAX_UNIX_SOCKET_PATH:
            digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
            sock = Path("/tmp") / f"kiln-sv-{digest}" / "supervisor.sock"
        return cls(config=state_dir / "supervisord.conf", socket=sock, pid_file=state_dir / "pids" / "supervisord.pid",
                   log=state_dir / "logs" / "supervisord.log")


# ---------------------------------------------------------------------------------------------
# Config (pure)
# ---------------------------------------------------------------------------------------------


def _ini_value(value: str, what: str) -> str:
    """A value as supervisord's config parser reads it back: no newline, no inline comment, % doubled."""
    if "\n" in value or "\r" in value or " ;" in value or " #" in value:
        raise SupervisorError(f"{what} cannot be written into a supervisord config: {value!r}")
    return value.replace("%", "%%")


def _env_pair(key: str, value: str) -> str:
    # supervisord splits `environment` with a non-POSIX shlex: quotes group, nothing escapes, and the
    # quotes are stripped from both ends. So quote with a character the value does not contain.
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise SupervisorError(f"environment variable name {key!r} cannot be written into a supervisord config")
    quote = '"' if '"' not in value else "'"
    if quote in value or value[-1:] in ("'", '"') or value[:1] in ("'", '"'):
        raise SupervisorError(f"environment value of {key} cannot be written into a supervisord config")
    return f"{key}={quote}{value}{quote}"


def env_overlay(env: Mapping[str, str], base: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """How a program's environment differs from supervisord's own, which children inherit: (set, unset)."""
    return {k: v for k, v in sorted(env.items()) if base.get(k) != v}, sorted(k for k in base if k not in env)


def command_line(program: Program, unset: Sequence[str] = ()) -> str:
    """supervisord's `command`: a shell that records its pid in the pid file, then becomes the program."""
    # exec keeps the pid, so the pid file names the process itself; it is rewritten at every (re)start.
    script = f"echo $$ > {shlex.quote(str(program.pid_path))} && exec {shlex.join(program.argv)}"
    names = [n for n in unset if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
    if names:
        script = f"unset {' '.join(names)}; {script}"
    return shlex.join(["/bin/sh", "-c", script])


def config_text(paths: Paths, programs: Sequence[Program], *, directory: Path,
                base_env: Mapping[str, str]) -> str:
    """The supervisord config for these programs (each its own group, so each can be added and removed)."""
    sock = _ini_value(str(paths.socket), "socket path")
    lines = [
        "; Written by deploy/stack.py at every `kiln up`; edits are overwritten.",
        "[unix_http_server]",
        f"file={sock}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={_ini_value(str(paths.log), 'log path')}",
        # Never rotated: restarts are counted from this log (count_restarts); it starts afresh with supervisord.
        "logfile_maxbytes=0",
        "loglevel=info",
        f"pidfile={_ini_value(str(paths.pid_file), 'pid file')}",
        f"directory={_ini_value(str(directory), 'directory')}",
        f"childlogdir={_ini_value(str(paths.log.parent), 'log dir')}",
        "nodaemon=false",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{sock}",
    ]
    for p in programs:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", p.name):
            raise SupervisorError(f"program name {p.name!r} is not usable in supervisord")
        overlay, unset = env_overlay(p.env, base_env)
        lines += [
            "",
            f"[program:{p.name}]",
            f"command={_ini_value(command_line(p, unset), f'command of {p.name}')}",
            f"directory={_ini_value(str(directory), 'directory')}",
            f"priority={p.priority}",
            "autostart=true",
            "autorestart=true",
            f"startsecs={START_SECS}",
            f"startretries={START_RETRIES}",
            "stopsignal=TERM",
            f"stopwaitsecs={STOP_WAIT_SECS}",
            # SIGTERM to the process only (a worker ends its trials itself); the final SIGKILL takes the group.
            "stopasgroup=false",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={_ini_value(str(p.log_path), f'log of {p.name}')}",
            # Never rotated: readers (up's readiness check, tests) follow these files by byte offset.
            "stdout_logfile_maxbytes=0",
            "stdout_logfile_backups=0",
        ]
        if overlay:
            pairs = ",".join(_env_pair(k, _ini_value(v, f"{k} of {p.name}")) for k, v in overlay.items())
            lines.append(f"environment={pairs}")
    return "\n".join(lines) + "\n"


def count_restarts(log_text: str) -> dict[str, int]:
    """How often supervisord restarted each process on its own: spawns that follow an exit, not a stop."""
    counts: dict[str, int] = {}
    ended_by_itself: dict[str, bool] = {}
    for line in log_text.splitlines():
        if m := _SPAWNED.search(line):
            name = m["name"]
            counts.setdefault(name, 0)
            if ended_by_itself.pop(name, False):
                counts[name] += 1
        elif m := _EXITED.search(line):
            ended_by_itself[m["name"]] = True
        elif m := _STOPPED.search(line):
            # A requested stop (down, a changed config): whatever starts it next is no restart.
            ended_by_itself[m["name"]] = False
    return counts


# ---------------------------------------------------------------------------------------------
# The daemon and its API
# ---------------------------------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP connection over supervisord's Unix socket, with a timeout (supervisor's own has none)."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Supervisor:
    """The XML-RPC API of one state dir's supervisord (supervisor.xmlrpc.SupervisorTransport over its socket)."""

    def __init__(self, paths: Paths, timeout: float = _RPC_TIMEOUT_S) -> None:
        self.paths = paths
        self.timeout = timeout

    def call(self, method: str, *args: Any) -> Any:
        """Call ``supervisor.<method>``; a fresh connection each time, so a dead daemon is never half-used."""
        transport = SupervisorTransport(None, None, f"unix://{self.paths.socket}")
        transport._get_connection = lambda: _UnixConnection(str(self.paths.socket), self.timeout)
        proxy = xmlrpc.client.ServerProxy("http://localhost", transport=transport)
        try:
            return getattr(proxy.supervisor, method)(*args)
        finally:
            transport.close()

    def running(self) -> bool:
        """Whether supervisord answers on the socket and is not shutting down."""
        try:
            return bool(self.call("getState")["statename"] == "RUNNING")
        except RPC_ERRORS:
            return False

    def pid(self) -> int | None:
        """supervisord's pid (from the API, else its pid file)."""
        with contextlib.suppress(*RPC_ERRORS):
            return int(self.call("getPID"))
        try:
            return int(self.paths.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def processes(self) -> dict[str, dict[str, Any]]:
        """getAllProcessInfo by name: state (statename), pid, start, now, exitstatus, spawnerr..."""
        return {info["name"]: info for info in self.call("getAllProcessInfo")}

    def start(self, name: str) -> None:
        """Start a process without waiting for startsecs (the caller checks readiness itself)."""
        try:
            self.call("startProcess", name, False)
        except xmlrpc.client.Fault as exc:
            if exc.faultCode != Faults.ALREADY_STARTED:
                raise SupervisorError(f"supervisord would not start {name}: {exc.faultString}") from exc

    def stop(self, names: Sequence[str], timeout: float = STOP_WAIT_SECS + 10.0) -> list[str]:
        """Stop these processes in parallel and wait until each is down; return those that were alive."""
        if not names:
            return []
        infos = self.processes()
        stopping = [n for n in names if n in infos and infos[n]["statename"] in ALIVE_STATES]
        for name in stopping:
            try:
                self.call("stopProcess", name, False)  # SIGTERM now; supervisord SIGKILLs after stopwaitsecs
            except xmlrpc.client.Fault as exc:
                if exc.faultCode != Faults.NOT_RUNNING:
                    raise SupervisorError(f"supervisord would not stop {name}: {exc.faultString}") from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = self.processes()
            if all(infos.get(n, {}).get("statename", "STOPPED") not in ALIVE_STATES for n in stopping):
                return stopping
            time.sleep(_POLL_S)
        raise SupervisorError(f"processes did not stop in {timeout:.0f}s: {', '.join(stopping)}")

    def update(self) -> tuple[list[str], list[str], list[str]]:
        """Reread the config file: (added, changed, removed) process groups, none applied yet."""
        try:
            [[added, changed, removed]] = self.call("reloadConfig")
        except xmlrpc.client.Fault as exc:
            raise SupervisorError(f"supervisord rejected its config: {exc.faultString}") from exc
        return list(added), list(changed), list(removed)

    def add(self, name: str) -> None:
        """Add a program of the reread config (it starts at once: autostart)."""
        try:
            self.call("addProcessGroup", name)
        except xmlrpc.client.Fault as exc:
            if exc.faultCode != Faults.ALREADY_ADDED:
                raise SupervisorError(f"supervisord would not add {name}: {exc.faultString}") from exc

    def remove(self, name: str) -> None:
        """Remove a stopped program."""
        try:
            self.call("removeProcessGroup", name)
        except xmlrpc.client.Fault as exc:
            if exc.faultCode != Faults.BAD_NAME:
                raise SupervisorError(f"supervisord would not remove {name}: {exc.faultString}") from exc

    def shutdown(self, timeout: float = STOP_WAIT_SECS + 10.0) -> None:
        """Stop supervisord (it stops whatever still runs) and wait until it is gone."""
        pid = self.pid()
        with contextlib.suppress(*RPC_ERRORS):
            self.call("shutdown")
        deadline = time.monotonic() + timeout
        while pid is not None and _pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if pid is not None and _pid_exists(pid):
            raise SupervisorError(f"supervisord (pid {pid}) did not exit in {timeout:.0f}s")


def _pid_exists(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def write_config(paths: Paths, text: str) -> None:
    """Write the config (mode 0600: it holds the programs' credentials) and make the socket's dir."""
    paths.config.parent.mkdir(parents=True, exist_ok=True)
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    paths.pid_file.parent.mkdir(parents=True, exist_ok=True)
    paths.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = paths.config.with_name(paths.config.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, paths.config)


def start_daemon(paths: Paths, *, env: Mapping[str, str], cwd: Path, timeout: float = 30.0) -> Supervisor:
    """Start supervisord on the written config (it daemonizes; its programs start at once) and wait for its API."""
    if paths.log.exists():
        # A fresh log per supervisord: restarts count from this start (count_restarts).
        os.replace(paths.log, paths.log.with_name(paths.log.name + ".1"))
    out = paths.log.with_name("supervisord.start.log")
    with out.open("wb") as fh:
        # A file, not a pipe: the daemon keeps no end of it open that we would wait on.
        proc = subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", str(paths.config)],
                              env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
    if proc.returncode != 0:
        raise SupervisorError(f"supervisord exited with code {proc.returncode}:\n{out.read_text(errors='replace')}")
    sup = Supervisor(paths)
    deadline = time.monotonic() + timeout
    while not sup.running():
        if time.monotonic() > deadline:
            raise SupervisorError(f"supervisord did not answer on {paths.socket} in {timeout:.0f}s:\n"
                                  f"{_tail(paths.log)}")
        time.sleep(_POLL_S)
    return sup


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def read_restarts(paths: Paths) -> dict[str, int]:
    """Restarts per process since supervisord started (its current log)."""
    try:
        return count_restarts(paths.log.read_text(errors="replace"))
    except FileNotFoundError:
        return {}
