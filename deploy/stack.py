"""The local stack: NATS, Postgres and S3 (deploy.parts), then the five services and the workers.

``up`` is idempotent (what already runs is kept), waits for every process to say it is ready, and
returns; the processes outlive it. ``down`` stops them by pid, services first. Everything lives under
one state directory: credentials, pids, logs, data.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import structlog

from deploy import parts

log = structlog.get_logger(__name__)

SERVICES = ("tracker", "searcher", "scheduler", "gateway")
# The log event each process writes once it serves; `up` waits for it.
READY_MARKERS = {
    "tracker": '"consumer.started"',
    "searcher": '"consumer.started"',
    "scheduler": '"consumer.started"',
    "worker": '"consumer.started"',
}
NATS_USERS = ("gateway", "searcher", "scheduler", "tracker", "worker", "trial", "admin", "reader")
# Users that may not do everything (deploy.parts.PartsConfig.nats_permissions). "reader" is the credential
# for outside systems (README "Bus"): it subscribes to metrics and domain events as they are published and
# can publish nothing, so it cannot forge events nor call the JetStream API ($JS.API.* are publishes).
NATS_PERMISSIONS: dict[str, dict[str, dict[str, list[str]]]] = {
    "reader": {
        "publish": {"deny": [">"]},
        "subscribe": {"allow": ["kiln.metrics.>", "kiln.events.>", "_INBOX.>"]},
    },
}


class StackError(RuntimeError):
    """The stack could not come up; the message names the process and shows its log tail."""


class StackConfig(msgspec.Struct, kw_only=True):
    """Ports, sizes and the state directory of a local stack."""

    state_dir: Path
    host: str = "127.0.0.1"
    nats_port: int = 14222
    nats_monitor_port: int = 18222
    pg_port: int = 15432
    s3_port: int = 18333
    s3_ports_base: int = 19330
    http_port: int = 18080
    workers: int = 1
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

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Credentials:
        """Read the stack's credentials, creating them on first use."""
        path = state_dir / "credentials.json"
        if path.exists():
            creds = msgspec.json.decode(path.read_bytes(), type=cls)
            missing = [user for user in NATS_USERS if user not in creds.nats]
            if not missing:
                return creds
            # A state dir from before a user existed (e.g. "reader"): add only that user, keep the rest.
            creds.nats.update({user: secrets.token_urlsafe(18) for user in missing})
        else:
            creds = cls(
                nats={user: secrets.token_urlsafe(18) for user in NATS_USERS},
                pg_password=secrets.token_urlsafe(18),
                s3_access_key="kiln" + secrets.token_hex(6),
                s3_secret_key=secrets.token_urlsafe(24),
            )
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(msgspec.json.encode(creds))
        return creds


class StackInfo(msgspec.Struct, kw_only=True):
    """What ``up`` reports."""

    master_url: str
    state_dir: str
    seconds: float


def parts_config(cfg: StackConfig, creds: Credentials) -> parts.PartsConfig:
    """The infrastructure half of the stack config."""
    return parts.PartsConfig(
        state_dir=cfg.state_dir, host=cfg.host, nats_port=cfg.nats_port, nats_monitor_port=cfg.nats_monitor_port,
        pg_port=cfg.pg_port, s3_port=cfg.s3_port, s3_ports_base=cfg.s3_ports_base, nats_users=creds.nats,
        nats_permissions=NATS_PERMISSIONS, pg_password=creds.pg_password, s3_access_key=creds.s3_access_key,
        s3_secret_key=creds.s3_secret_key,
    )


def service_env(cfg: StackConfig, creds: Credentials, user: str) -> dict[str, str]:
    """Environment of one service process: its own NATS user, the stores, nothing global."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update({
        "KILN_NATS_URL": f"nats://{cfg.host}:{cfg.nats_port}",
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


def _processes(cfg: StackConfig, creds: Credentials) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, argv, env) of every Kiln process of the stack, in start order."""
    py = sys.executable
    out = []
    for svc in SERVICES:
        env = service_env(cfg, creds, svc)
        if svc == "gateway":
            env.update(KILN_HTTP_HOST=cfg.host, KILN_HTTP_PORT=str(cfg.http_port),
                       KILN_MAX_CONTEXT_BYTES=str(cfg.max_context_bytes))
        if svc == "scheduler":
            env["KILN_WORKER_TIMEOUT_S"] = str(cfg.worker_timeout_s)
        out.append((svc, [py, "-m", f"services.{svc}.main"], env))
    for i in range(cfg.workers):
        env = service_env(cfg, creds, "worker")
        env.update(
            KILN_WORKER_ID=f"worker-{i}",
            KILN_ADDRESS=cfg.host,  # where a trial spanning local workers meets its rank 0
            KILN_CPU_SLOTS=str(cfg.slots_per_worker),
            KILN_WORK_DIR=str(cfg.state_dir / "work"),
            KILN_MASTER_URL=cfg.master_url,
            KILN_TRIAL_NATS_USER="trial",
            KILN_TRIAL_NATS_PASSWORD=creds.nats["trial"],
            # One S3 identity for now: per-trial S3 credentials come with least-privilege access.
            KILN_TRIAL_S3_ACCESS_KEY=creds.s3_access_key,
            KILN_TRIAL_S3_SECRET_KEY=creds.s3_secret_key,
        )
        out.append((f"worker-{i}", [py, "-m", "services.worker.main"], env))
    return out


def up(cfg: StackConfig, timeout: float = 90.0) -> StackInfo:
    """Start whatever is not running yet and wait until every piece is ready."""
    started = time.monotonic()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    (cfg.state_dir / "stack.json").write_bytes(msgspec.json.encode(cfg, enc_hook=str))
    creds = Credentials.load_or_create(cfg.state_dir)
    pcfg = parts_config(cfg, creds)
    try:
        parts.start_nats(pcfg)
        parts.start_postgres(pcfg)
        parts.start_s3(pcfg)
    except parts.PartError as exc:
        raise StackError(str(exc)) from exc
    repo_root = Path(__file__).resolve().parent.parent
    launched: list[tuple[str, subprocess.Popen[bytes] | None, Path, int]] = []
    for name, argv, env in _processes(cfg, creds):
        log_path = cfg.state_dir / "logs" / f"{name}.log"
        pid = parts.read_pid(cfg.state_dir, name)
        if pid is not None and parts.pid_alive(pid):
            launched.append((name, None, log_path, -1))
            continue
        log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = log_path.stat().st_size if log_path.exists() else 0
        env["PYTHONPATH"] = str(repo_root) + os.pathsep + env.get("PYTHONPATH", "")
        with log_path.open("ab") as fh:
            proc = subprocess.Popen(argv, env=env, cwd=repo_root, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        parts.pid_path(cfg.state_dir, name).parent.mkdir(parents=True, exist_ok=True)
        parts.pid_path(cfg.state_dir, name).write_text(str(proc.pid))
        launched.append((name, proc, log_path, offset))
    deadline = time.monotonic() + timeout
    for name, proc, log_path, offset in launched:
        if proc is None:
            continue
        _wait_ready(cfg, name, proc, log_path, offset, deadline)
    return StackInfo(master_url=cfg.master_url, state_dir=str(cfg.state_dir), seconds=time.monotonic() - started)


def _wait_ready(cfg: StackConfig, name: str, proc: subprocess.Popen[bytes], log_path: Path, offset: int,
                deadline: float) -> None:
    marker = READY_MARKERS.get("worker" if name.startswith("worker-") else name)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{name} exited with code {proc.returncode} while starting:\n{_tail(log_path, offset)}")
        if name == "gateway":
            if _http_ok(f"{cfg.master_url}/health"):
                return
        elif marker is not None and marker in _read_from(log_path, offset):
            return
        time.sleep(0.1)
    raise StackError(f"{name} was not ready in time:\n{_tail(log_path, offset)}")


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


def _kiln_names(cfg: StackConfig) -> list[str]:
    pids = cfg.state_dir / "pids"
    names = [p.stem for p in pids.glob("*.pid")] if pids.exists() else []
    workers = sorted(n for n in names if n.startswith("worker-"))
    return workers + [s for s in reversed(SERVICES) if s in names]


def down(cfg: StackConfig) -> list[str]:
    """Stop services and workers, then the parts; return the names stopped."""
    stopped = []
    for name in _kiln_names(cfg):
        pid = parts.read_pid(cfg.state_dir, name)
        if pid is not None and parts.pid_alive(pid):
            parts.stop_pid(pid, timeout=20.0)
            stopped.append(name)
        parts.pid_path(cfg.state_dir, name).unlink(missing_ok=True)
    for name in ("s3", "postgres", "nats"):
        pid = parts.read_pid(cfg.state_dir, name)
        if pid is not None and parts.pid_alive(pid):
            stopped.append(name)
    parts.stop_all(cfg.state_dir)
    return stopped


def status(cfg: StackConfig) -> list[tuple[str, int | None, bool]]:
    """(name, pid, alive) of every process this state dir started."""
    names = ["nats", "postgres", "s3"] + list(reversed(_kiln_names(cfg)))
    rows = []
    for name in names:
        pid = parts.read_pid(cfg.state_dir, name)
        if pid is None and name in ("nats", "postgres", "s3"):
            continue
        rows.append((name, pid, pid is not None and parts.pid_alive(pid)))
    return rows
