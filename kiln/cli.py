"""The kiln command line: the local stack, experiments, trials, checkpoints."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from kiln import client as kiln_client
from kiln.client import TERMINAL_STATES, APIError, Client
from schemas.checkpoint import CorruptCheckpoint

LOG_TAIL_ON_ERROR = 20
T = TypeVar("T")
# ``--json`` on every command that prints data: one JSON document a script can parse (logs --follow: JSON Lines).
_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _client() -> Client:
    return Client()


def _terminal_width() -> int:
    """The terminal's width when printing to one; 0 (no limit) for a pipe or a file: scripts get whole lines."""
    if not sys.stdout.isatty():
        return 0
    return shutil.get_terminal_size(fallback=(0, 0)).columns


def _echo_row(text: str) -> None:
    """One table row, without the padding its last column leaves at the end, cut to fit the terminal ("…")."""
    text = text.rstrip()
    width = _terminal_width()
    if width and len(text) > width:
        text = text[: max(width - 1, 1)] + "…"
    click.echo(text)


def _round_floats(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _round_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round_floats(v) for v in value]
    return value


def _hparams_text(hparams: dict[str, Any]) -> str:
    """Hyperparameters as JSON with floats to 6 significant digits (--json keeps them exact)."""
    return json.dumps(_round_floats(hparams), sort_keys=True)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str, sort_keys=True))


def _fail(exc: Exception) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


def _call(fn: Callable[[Client], T]) -> T:
    """Call the gateway; on an API error print it and exit 1."""
    try:
        return fn(_client())
    except (APIError, CorruptCheckpoint) as exc:
        _fail(exc)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kiln", prog_name="kiln", message="%(prog)s %(version)s")
def main() -> None:
    """Kiln: hyperparameter search, distributed training and fault tolerance for deep learning."""


# -- local stack -----------------------------------------------------------------------------------


@main.command()
@click.option("--state-dir", type=click.Path(path_type=Path), default=None, help="Where the stack keeps its state.")
@click.option("--workers", type=int, default=None,
              help="Number of local worker agents.  [default: the stack's current number, else 1]")
@click.option("--slots-per-worker", type=int, default=None,
              help="CPU slots each worker offers.  [default: the stack's current number, else 2]")
@click.option("--nats-cluster", type=click.IntRange(1, 7), default=None,
              help="NATS servers: 3 runs a JetStream cluster (streams and buckets on all three, clients fail over)."
                   "  Fixed when the state dir is first used.  [default: the stack's, else 1]")
@click.option("--remote-worker", "remote_workers", multiple=True, metavar="ID",
              help="Add a worker agent that runs on another host (id worker-...): its own NATS user, and its settings"
                   " in <state>/agents/ID.env for `kiln worker --env-file` there. Repeatable; kept.")
@click.option("--host", default=None,
              help="The address every part and service listens on (other hosts' workers reach it there)."
                   "  [default: the stack's, else 127.0.0.1]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the sign-in lines go to stderr).")
def up(state_dir: Path | None, workers: int | None, slots_per_worker: int | None, nats_cluster: int | None,
       remote_workers: tuple[str, ...], host: str | None, as_json: bool) -> None:
    """Start NATS, Postgres, the S3 store, the five services and the workers on this machine (supervised).

    Rerun on a running stack it keeps what runs; with other --workers or --slots-per-worker it says what
    changed, restarts the workers whose slot count changed and stops those beyond the new count.
    """
    from deploy import stack

    started = time.monotonic()
    cfg = stack.StackConfig.load(state_dir, workers=workers, slots_per_worker=slots_per_worker,
                                 nats_cluster=nats_cluster, host=host)
    cfg.remote_workers = list(dict.fromkeys([*cfg.remote_workers, *remote_workers]))
    log_file = _log_to_file(cfg.state_dir)
    try:
        info = stack.up(cfg)
    except stack.StackError as exc:
        click.echo(f"details: {log_file}", err=True)
        _fail(exc)
        return
    if as_json:
        _print_json({"master_url": info.master_url, "state_dir": str(info.state_dir), "changes": list(info.changes),
                     "elapsed_s": round(time.monotonic() - started, 1)})
    else:
        for change in info.changes:
            click.echo(f"changed: {change}")
        click.echo(f"kiln is up in {time.monotonic() - started:.1f}s: {info.master_url}  (state: {info.state_dir})")
        click.echo(f"  export KILN_MASTER={info.master_url}")
        for worker in cfg.remote_workers:
            click.echo(f"  remote worker {worker}: kiln worker --env-file {stack.agent_env_path(cfg, worker)}")
    _login_after_up(info.master_url, stack.Credentials.load_or_create(Path(info.state_dir)).admin_password,
                    err=as_json)


WARNING_LINE_CHARS = 160


def _log_to_file(state_dir: Path) -> Path:
    """Send the stack machinery's log lines (every level, full detail) to <state>/logs/kiln-cli.log; only
    warnings and errors reach the terminal, one short line each."""
    import structlog

    path = state_dir / "logs" / "kiln-cli.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    render = structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"], sort_keys=True)

    def emit(_: Any, method: str, event: MutableMapping[str, Any]) -> str:
        event.setdefault("level", method)
        with path.open("a") as fh:
            fh.write(render(_, method, dict(event)) + "\n")
        if method in ("warning", "error", "critical", "exception"):
            details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "level", "timestamp"))
            line = f"{method}: {event.get('event', '')}" + (f" ({details})" if details else "")
            click.echo(line if len(line) <= WARNING_LINE_CHARS else line[:WARNING_LINE_CHARS - 3] + "...", err=True)
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.processors.TimeStamper(fmt="iso", utc=True), emit],
                        cache_logger_on_first_use=False)
    return path


def _login_after_up(master: str, admin_password: str, err: bool = False) -> None:
    """Keep a stored login that still works on this stack; else sign the CLI in as its admin."""
    if os.environ.get("KILN_TOKEN"):
        return
    stored = kiln_client.stored_token(master)
    if stored is not None:
        try:
            Client(master, token=stored[1]).me()
            click.echo(f"  logged in as {stored[0]}", err=err)
            return
        except APIError:
            pass  # revoked, expired, or another stack's: sign in afresh
    try:
        out = Client(master, token="").login("admin", admin_password)
    except APIError as exc:
        click.echo(f"warning: could not log in as admin: {exc} (run kiln user login)", err=True)
        return
    kiln_client.store_token(master, out["username"], out["token"])
    click.echo(f"  logged in as {out['username']} (token in {kiln_client.auth_file()})", err=err)


@main.command("worker")
@click.option("--env-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Settings (KEY=value lines): what `kiln up --remote-worker` wrote for this worker.")
@click.option("--nats", default=None, metavar="URL[,URL...]", help="Every NATS server of the cluster.")
@click.option("--id", "worker_id", default=None, help="This worker's id (worker-...), also its NATS user.")
@click.option("--pool", default=None, help="The resource pool its slots belong to.  [default: default]")
@click.option("--address", default=None, help="Where other hosts reach this one (a trial's rendezvous).")
@click.option("--slots", type=int, default=None, help="CPU slots to offer when NVML finds no GPU.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help="Work dirs and the outbox.")
def worker(env_file: Path | None, nats: str | None, worker_id: str | None, pool: str | None, address: str | None,
           slots: int | None, work_dir: Path | None) -> None:
    """Run a worker agent here, in the foreground, joining a running cluster with its own credential.

    Settings come from the environment (KILN_*), then --env-file, then the options; the NATS password only
    from the environment or the env file (KILN_NATS_PASSWORD, or KILN_NATS_PASSWORD_FILE), never the command line.
    Code contexts and checkpoints go through the cluster's S3 store. systemd: deploy/systemd/kiln-worker.service.
    """
    from deploy import cluster

    env = dict(os.environ)
    if env_file is not None:
        try:
            env.update(cluster.read_env_file(env_file))
        except (OSError, ValueError) as exc:
            _fail(exc)
    given = {"KILN_NATS_URL": nats, "KILN_WORKER_ID": worker_id, "KILN_RESOURCE_POOL": pool,
             "KILN_ADDRESS": address, "KILN_CPU_SLOTS": None if slots is None else str(slots),
             "KILN_WORK_DIR": None if work_dir is None else str(work_dir.resolve())}
    env.update({k: v for k, v in given.items() if v is not None})
    if worker_id is not None:
        env["KILN_NATS_USER"] = worker_id  # a worker's NATS user is its id
    missing = [k for k in ("KILN_WORKER_ID", "KILN_NATS_URL", "KILN_NATS_USER") if not env.get(k)]
    if not (env.get("KILN_NATS_PASSWORD") or env.get("KILN_NATS_PASSWORD_FILE")):
        missing.append("KILN_NATS_PASSWORD")
    if missing:
        _fail(ValueError(f"missing settings: {', '.join(missing)} (give --env-file, or set them)"))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "services.worker.main"], env)


@main.command()
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="The local stack's state directory.  [default: $KILN_STATE_DIR, else ./.kiln]")
@_JSON
def down(state_dir: Path | None, as_json: bool) -> None:
    """Stop everything kiln up started: services and workers, their supervisord, then the parts."""
    from deploy import stack

    cfg = stack.StackConfig.load(state_dir)
    _log_to_file(cfg.state_dir)
    stopped = stack.down(cfg)
    if as_json:
        _print_json({"stopped": list(stopped)})
        return
    click.echo(f"stopped {len(stopped)} processes" + (f": {', '.join(stopped)}" if stopped else ""))


@main.command()
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="The local stack's state directory.  [default: $KILN_STATE_DIR, else ./.kiln]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(state_dir: Path | None, as_json: bool) -> None:
    """Show the local stack's processes: pid, state, restarts by the supervisor, uptime."""
    import msgspec

    from deploy import stack

    cfg = stack.StackConfig.load(state_dir)
    rows = stack.status(cfg)
    if as_json:
        _print_json(msgspec.to_builtins(rows))
        return
    if not rows:
        click.echo("nothing started here")
        return
    click.echo(f"{'NAME':12} {'PID':>8}  {'STATE':12} {'RESTARTS':>8}  UPTIME")
    for r in rows:
        uptime = _duration(r.uptime_s) if r.uptime_s is not None else "-"
        _echo_row(f"{r.name:12} {r.pid or '-':>8}  {r.state:12} {r.restarts:>8}  {uptime}")
    supervisor = stack.supervisor_pid(cfg)
    click.echo(f"supervisord: pid {supervisor}" if supervisor else "supervisord: not running (nothing restarts them)")


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s // 60 % 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


@main.command("version")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def version(as_json: bool) -> None:
    """Show the client's version and, when the master answers, the master's."""
    from importlib import metadata

    try:
        client_version = metadata.version("kiln")
    except metadata.PackageNotFoundError:
        client_version = "unknown"
    master = kiln_client.master_url()
    try:
        server, problem = Client(master).master_info()["version"], ""
    except APIError as exc:
        server, problem = None, str(exc)
    if as_json:
        _print_json({"client": client_version, "master": server, "master_url": master})
        return
    click.echo(f"client: {client_version}")
    click.echo(f"master: {server} ({master})" if server else f"master: unknown ({problem})")


@main.group()
def master() -> None:
    """The master (the gateway) this CLI talks to."""


@master.command("info")
@_JSON
def master_info(as_json: bool) -> None:
    """Show the master's address and version (what `kiln version` says of the master)."""
    master_at = kiln_client.master_url()
    info = _call(lambda c: c.master_info())
    if as_json:
        _print_json({"master_url": master_at, **info})
        return
    click.echo(f"master: {master_at}")
    click.echo(f"version: {info['version']}")


@main.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(kiln completion bash)" (in ~/.bashrc; zsh, fish alike)."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # the three choices are click's own
    click.echo(cls(main, {}, "kiln", "_KILN_COMPLETE").source())


# -- users and tokens ------------------------------------------------------------------------------


def _read_password(from_stdin: bool, confirm: bool = False) -> str:
    """A password from stdin's first line, or asked for without echo."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Password (again): ") != password:
        _fail(ValueError("the passwords differ"))
    return password


@main.group()
def user() -> None:
    """Sign in and out; manage users (admins)."""


@user.command("login")
@click.argument("username", required=False)
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
def user_login(username: str | None, password_stdin: bool) -> None:
    """Sign in as USERNAME (default: the user signed in last) and store the token for this master."""
    master = kiln_client.master_url()
    if username is None:
        stored = kiln_client.stored_token(master)
        username = stored[0] if stored else click.prompt("Username")
    password = _read_password(password_stdin)
    try:
        out = Client(master, token="").login(username, password)
    except APIError as exc:
        _fail(exc)
        return
    kiln_client.store_token(master, out["username"], out["token"])
    click.echo(f"logged in as {out['username']}" + (" (admin)" if out["admin"] else "") + f" on {master}")


@user.command("logout")
def user_logout() -> None:
    """Revoke this CLI's token on the gateway and forget it."""
    master = kiln_client.master_url()
    client = _client()
    try:
        me = client.me()
        client.logout()
    except APIError as exc:
        stored = kiln_client.stored_token(master)
        if stored is not None:
            kiln_client.forget_token(master, stored[0])
        _fail(exc)
        return
    kiln_client.forget_token(master, me["username"])
    click.echo(f"logged out {me['username']}")


@user.command("whoami")
@_JSON
def user_whoami(as_json: bool) -> None:
    """Show who this CLI is signed in as."""
    me = _call(lambda c: c.me())
    if as_json:
        _print_json({**me, "master_url": kiln_client.master_url()})
        return
    click.echo(f"You are logged in as user {me['username']!r}" + (" (admin)" if me["admin"] else "")
               + f" on {kiln_client.master_url()}")


@user.command("create")
@click.argument("username")
@click.option("--admin", is_flag=True, help="Make the user an admin.")
@click.option("--password-stdin", is_flag=True, help="Read the new user's password from stdin's first line.")
@_JSON
def user_create(username: str, admin: bool, password_stdin: bool, as_json: bool) -> None:
    """Create a user (admins only)."""
    password = _read_password(password_stdin, confirm=True)
    created = _call(lambda c: c.create_user(username, password, admin))
    if as_json:
        _print_json(created)
        return
    click.echo(f"created user {created['username']}" + (" (admin)" if created["admin"] else ""))


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def user_list(as_json: bool) -> None:
    """List users."""
    rows = _call(lambda c: c.list_users())
    if as_json:
        _print_json(rows)
        return
    click.echo(f"{'ID':>4}  {'USERNAME':24} {'ADMIN':5}  CREATED")
    for r in rows:
        _echo_row(f"{r['id']:>4}  {r['username']:24} {'yes' if r['admin'] else 'no':5}  {str(r['created_at'])[:19]}")


@main.group()
def token() -> None:
    """Named API tokens (for scripts and CI: send them as KILN_TOKEN)."""


@token.command("create")
@click.argument("name")
@click.option("--expires-in-days", type=float, default=None, help="Expire after this many days (default: never).")
@_JSON
def token_create(name: str, expires_in_days: float | None, as_json: bool) -> None:
    """Create a token named NAME for the signed-in user; its value is shown once."""
    out = _call(lambda c: c.create_token(name, expires_in_days))
    if as_json:
        _print_json(out)
        return
    click.echo(f"token {out['id']} ({out['name']}): {out['token']}")
    click.echo("it is shown only now; use it as KILN_TOKEN or 'Authorization: Bearer <token>'", err=True)


@token.command("list")
@click.option("--all", "all_users", is_flag=True, help="Every user's tokens (admins).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def token_list(all_users: bool, as_json: bool) -> None:
    """List live tokens (never their values)."""
    rows = _call(lambda c: c.list_tokens(all_users))
    if as_json:
        _print_json(rows)
        return
    click.echo(f"{'ID':>5}  {'USER':16} {'KIND':8} {'NAME':20} {'CREATED':19}  EXPIRES")
    for r in rows:
        _echo_row(f"{r['id']:>5}  {r['username']:16} {r['kind']:8} {r['name'][:20]:20} {str(r['created_at'])[:19]:19}"
                  f"  {str(r['expires_at'])[:19] if r['expires_at'] else 'never'}")


@token.command("revoke")
@click.argument("token_id", type=int)
@_JSON
def token_revoke(token_id: int, as_json: bool) -> None:
    """Revoke a token by id (one's own; any as an admin)."""
    out = _call(lambda c: c.revoke_token(token_id))
    if as_json:
        _print_json(out)
        return
    click.echo(f"token {token_id} revoked")


# -- experiments -------------------------------------------------------------------------------------


@main.group()
def experiment() -> None:
    """Create, inspect and kill experiments."""


@experiment.command("create")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("context", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--follow", "-f", is_flag=True, help="Follow progress; exit 0 only if the experiment completed.")
@click.option("--config", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field: a dotted key (searcher.max_length.batches=200), a YAML value;"
                   " repeatable.")
@click.option("--paused", is_flag=True, help="Create it paused: nothing starts until `kiln experiment activate`.")
@_JSON
def experiment_create(config: Path, context: Path, follow: bool, overrides: tuple[str, ...], paused: bool,
                      as_json: bool) -> None:
    """Submit CONFIG (Determined-style YAML) with the code in CONTEXT."""
    if as_json and follow:
        _fail(click.UsageError("--json and --follow do not go together (follow with `kiln experiment wait`)"))
    if paused and follow:
        _fail(click.UsageError("--paused and --follow do not go together: nothing runs until it is activated"))
    try:
        config_yaml = apply_overrides(config.read_text(), overrides)
    except ValueError as exc:
        _fail(exc)
    client = _client()
    try:
        created = client.create_experiment(config_yaml, context, paused=paused)
    except APIError as exc:
        _fail(exc)
        return
    if as_json:
        _print_json({**created, "paused": paused})
        return
    for warning in created.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"Created experiment {created['id']}"
               + (f" (paused: `kiln experiment activate {created['id']}` starts it)" if paused else ""))
    if follow:
        sys.exit(_follow(client, int(created["id"])))


def apply_overrides(config_yaml: str, overrides: Sequence[str]) -> str:
    """The config with each ``KEY=VALUE`` set (dotted keys walk into mappings, a number into a list; the value is
    read as YAML, so ``100`` is a number and ``true`` a bool). Without overrides the text is kept byte for byte;
    with them it is dumped again (comments are lost) and that is what the experiment records as submitted."""
    if not overrides:
        return config_yaml
    import yaml

    doc = yaml.safe_load(config_yaml)
    if not isinstance(doc, dict):
        raise ValueError("--config needs a config that is a YAML mapping")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ValueError(f"--config takes KEY=VALUE with a dotted KEY, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {key}: {raw!r} is not a YAML value") from exc
        *parents, last = key.split(".")
        node: Any = doc
        for i, part in enumerate(parents):
            node = _child(node, part, key, create=not (i + 1 < len(parents) and parents[i + 1].isdigit()))
        _set_child(node, last, value, key)
    return str(yaml.safe_dump(doc, sort_keys=False))


def _child(node: Any, part: str, key: str, create: bool) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ValueError(f"--config {key}: {part!r} is not an index of a list of {len(node)}")
        return node[int(part)]
    if not isinstance(node, dict):
        raise ValueError(f"--config {key}: {part!r} is inside a value that is not a mapping")
    if node.get(part) is None:
        node[part] = {} if create else []
    return node[part]


def _set_child(node: Any, last: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ValueError(f"--config {key}: {last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ValueError(f"--config {key}: its parent is not a mapping")


def override_document(items: Sequence[str], config_file: str | None = None) -> str:
    """The override config of a continue or fork as YAML: ``config_file``'s text (Determined's ``--config-file``),
    then each ``--config`` in order, a ``KEY=VALUE`` (as ``create --config``) or a YAML file of fields (merged in,
    its fields winning). Empty: ``""``."""
    if config_file is None and not items:
        return ""
    import yaml

    from schemas.config import merge_overrides

    def mapping(text: str, where: str) -> dict[str, Any]:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{where} is not YAML: {exc}") from exc
        if doc is None:
            return {}
        if not isinstance(doc, dict):
            raise ValueError(f"{where} must be a YAML mapping of config fields")
        return doc

    doc = mapping(config_file, "--config-file") if config_file is not None else {}
    for item in items:
        if "=" in item:
            doc = mapping(apply_overrides(yaml.safe_dump(doc, sort_keys=False), [item]), item)
            continue
        path = Path(item)
        if not path.is_file():
            raise ValueError(f"--config takes KEY=VALUE or a YAML file of overrides; {item!r} is neither")
        doc = merge_overrides(doc, mapping(path.read_text(), item))
    return str(yaml.safe_dump(doc, sort_keys=False)) if doc else ""


_OVERRIDES = click.option("--config", "overrides", multiple=True, metavar="FILE|KEY=VALUE",
                          help="Override config fields: a YAML file of them, or KEY=VALUE with a dotted KEY"
                               " (searcher.max_length.batches=200); repeatable, later ones win.")
_CONFIG_FILE = click.option("--config-file", type=click.File("r"), default=None,
                            help="A YAML file of config fields to override (Determined's spelling).")


@experiment.command("continue")
@click.argument("experiment_id", type=int)
@_OVERRIDES
@_CONFIG_FILE
@click.option("--follow", "-f", is_flag=True, help="Follow progress; exit 0 only if it completes again.")
@_JSON
def experiment_continue(experiment_id: int, overrides: tuple[str, ...], config_file: Any, follow: bool,
                        as_json: bool) -> None:
    """Continue an ended experiment (Determined's `det experiment continue`).

    A single-trial search trains its trial on from its latest checkpoint under the config with the overrides
    (e.g. --config searcher.max_length.batches=400); a grid or random search, without overrides, reruns the
    trials that did not complete. Other searchers cannot be continued: fork them."""
    if as_json and follow:
        _fail(click.UsageError("--json and --follow do not go together (follow with `kiln experiment wait`)"))
    try:
        text = override_document(overrides, config_file.read() if config_file is not None else None)
    except ValueError as exc:
        _fail(exc)
    client = _client()
    try:
        ends_before = len(experiment_ends(client, experiment_id)) if follow else 0
        out = client.continue_experiment(experiment_id, text)
    except APIError as exc:
        _fail(exc)
        return
    if as_json:
        _print_json(out)
        return
    for warning in out.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    trials = ", ".join(str(t) for t in out["trial_ids"])
    click.echo(f"Continued experiment {experiment_id}: trial{'s' if len(out['trial_ids']) > 1 else ''} {trials}"
               " resume from their latest checkpoints")
    if follow:
        sys.exit(_follow(client, experiment_id, ends_before=ends_before))


@experiment.command("fork")
@click.argument("experiment_id", type=int)
@_OVERRIDES
@_CONFIG_FILE
@click.option("--paused", is_flag=True, help="Create it paused: nothing starts until `kiln experiment activate`.")
@click.option("--follow", "-f", is_flag=True, help="Follow progress; exit 0 only if the new experiment completed.")
@_JSON
def experiment_fork(experiment_id: int, overrides: tuple[str, ...], config_file: Any, paused: bool, follow: bool,
                    as_json: bool) -> None:
    """A new experiment with EXPERIMENT_ID's code and its config merged with the overrides (the WebUI's fork in
    Determined); prints the new id. Add searcher.source_checkpoint_uuid to fine-tune from a checkpoint."""
    if as_json and follow:
        _fail(click.UsageError("--json and --follow do not go together (follow with `kiln experiment wait`)"))
    if paused and follow:
        _fail(click.UsageError("--paused and --follow do not go together: nothing runs until it is activated"))
    try:
        text = override_document(overrides, config_file.read() if config_file is not None else None)
    except ValueError as exc:
        _fail(exc)
    client = _client()
    try:
        out = client.fork_experiment(experiment_id, text, paused=paused)
    except APIError as exc:
        _fail(exc)
        return
    if as_json:
        _print_json({**out, "paused": paused})
        return
    for warning in out.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"Created experiment {out['id']} (forked from {experiment_id})"
               + (f" (paused: `kiln experiment activate {out['id']}` starts it)" if paused else ""))
    if follow:
        sys.exit(_follow(client, int(out["id"])))


class _Follower:
    """Turns an experiment's live events into lines: every trial state change and validation, training and
    progress at most once per trial per train_every_s. Validations already printed are never printed twice,
    so the read model can fill in what the live stream missed (before it connected, during a reconnect)."""

    def __init__(self, echo: Callable[[str], None] | None = None, train_every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.echo = echo or click.echo
        self.train_every_s = train_every_s
        self.clock = clock
        self.states: dict[int, str] = {}
        self.validations: dict[int, set[int]] = {}  # trial -> steps printed
        self.progress: dict[int, float] = {}
        self.last_train: dict[int, float] = {}

    def handle(self, event: str, data: dict[str, Any]) -> None:
        """Print what one live event says."""
        tid = int(data.get("trial_id", 0))
        if event == "validation":
            self.validation(tid, int(data["steps_completed"]), data["metrics"])
        elif event == "trial":
            self.state(tid, str(data["state"]), str(data.get("reason") or ""))
        elif event == "progress":
            self.progress[tid] = float(data["progress"])
        elif event == "training":
            now = self.clock()
            if now - self.last_train.get(tid, -math.inf) < self.train_every_s:
                return  # throttled: a terminal is not flooded with training points
            self.last_train[tid] = now
            progress = f"  ({self.progress[tid]:.0%})" if tid in self.progress else ""
            self.echo(f"trial {tid}: step {data['steps_completed']}: {_metrics_text(data['metrics'])}{progress}")

    def state(self, tid: int, state: str, reason: str = "") -> None:
        """Print a trial's state when it changed."""
        if self.states.get(tid) != state:
            self.states[tid] = state
            self.echo(f"trial {tid}: {state}" + (f" ({reason})" if reason else ""))

    def validation(self, tid: int, step: int, metrics: dict[str, Any]) -> None:
        """Print a validation unless it was printed."""
        seen = self.validations.setdefault(tid, set())
        if step not in seen:
            seen.add(step)
            self.echo(f"trial {tid}: validation at step {step}: {_metrics_text(metrics)}")

    def catch_up(self, client: Client, experiment_id: int) -> None:
        """Print from the read model what the live stream did not show (states, validations in step order)."""
        for t in client.list_trials(experiment_id):
            tid = int(t["id"])
            for m in sorted(client.trial_metrics(tid, kind="validation"), key=lambda m: m["steps_completed"]):
                self.validation(tid, int(m["steps_completed"]), m["metrics"])
            self.state(tid, t["state"])


def metric_hint(metric: str, reported: set[str]) -> str | None:
    """Why no best trial: the searcher metric is not among the validation metrics that were reported."""
    if not reported or metric in reported:
        return None
    return f"searcher metric {metric!r} was never reported; validations reported: {', '.join(sorted(reported))}"


def _experiment_hint(exp: dict[str, Any], trials: list[dict[str, Any]]) -> str | None:
    if any(t.get("best_metric") is not None for t in trials):
        return None
    reported = {k for t in trials for k in ((t.get("latest_validation") or {}).get("metrics") or {})}
    return metric_hint(exp["searcher_metric"], reported)


def _metrics_text(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items()))


def experiment_ends(client: Client, experiment_id: int) -> list[dt.datetime]:
    """When the experiment ended, once per end (a continued one ends again), from its audit trail: the times the
    read model records as ``ended_at``."""
    ends: list[dt.datetime] = []
    after = 0
    while True:
        page = client.experiment_events(experiment_id, after_seq=after)
        ends += [_ts(e["time"]) for e in page if e["type"] == "ExperimentEnded"]
        if len(page) < 1000:
            return ends
        after = page[-1]["seq"]


def _follow(client: Client, experiment_id: int, poll_s: float = 0.2, ends_before: int | None = None) -> int:
    """Stream the experiment's live events until it ends, then show the best trial; the exit code says how it
    ended. ``ends_before``: it was just continued after ending that many times, so only one more end counts
    (until the continue is projected, the read model and its stream still show the old one)."""
    follower = _Follower()
    deadline = time.monotonic() + 120
    last_end: dt.datetime | None = None
    old_end_until = time.monotonic() + 120  # how long the end before the continue may still be what is shown
    while True:
        try:
            follower.catch_up(client, experiment_id)  # what happened before the stream (re)connected
            for event, data in client.stream_experiment(experiment_id):
                deadline = time.monotonic() + 120  # connected: a later drop gets its own two minutes
                if event == "end":
                    break
                follower.handle(event, data)
            # An end, or the gateway closed the stream: the experiment had ended.
            if ends_before is None:
                break
            ends = experiment_ends(client, experiment_id)
            if len(ends) > ends_before:
                last_end = ends[-1]
                break
            if time.monotonic() > old_end_until:
                click.echo(f"error: experiment {experiment_id} still shows the end before the continue: the continue"
                           " was not applied (was it continued twice at once?)", err=True)
                return 1
            time.sleep(poll_s)  # the end before the continue: look again
        except APIError as exc:
            if (exc.status in (0, 404)) and time.monotonic() < deadline:  # not projected yet, or a dropped stream
                time.sleep(poll_s)
                continue
            click.echo(f"error: {exc}", err=True)
            return 1

    def settled(exp: dict[str, Any]) -> bool:
        if exp["state"] not in TERMINAL_STATES:  # the read model lags the live stream a little
            return False
        return last_end is None or (exp["ended_at"] is not None
                                    and abs((_ts(exp["ended_at"]) - last_end).total_seconds()) < 0.001)

    try:
        exp = client.get_experiment(experiment_id)
        while not settled(exp):
            time.sleep(poll_s)
            exp = client.get_experiment(experiment_id)
        follower.catch_up(client, experiment_id)
        trials = client.list_trials(experiment_id)
    except APIError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    for t in trials:
        if t["state"] == "ERROR":
            _show_tail(client, t["id"])
    reason = f" ({exp['end_reason']})" if exp.get("end_reason") else ""
    click.echo(f"experiment {experiment_id}: {exp['state']}{reason}")
    best = exp.get("best_trial")
    if best:
        click.echo(f"best trial {best['id']}: {exp['searcher_metric']}={_fmt(best['best_metric'])}")
    elif hint := _experiment_hint(exp, trials):
        click.echo(f"warning: {hint}", err=True)
    return 0 if exp["state"] == "COMPLETED" else 1


def _show_tail(client: Client, trial_id: int, wait_s: float = 5.0) -> None:
    # Logs are their own stream, projected beside the trial's state: wait briefly for the worker's exit line,
    # so the tail shown holds the trial's own last words (its first error), not lines from before them.
    deadline = time.monotonic() + wait_s
    while True:
        lines = client.trial_logs(trial_id, limit=LOG_TAIL_ON_ERROR, tail=True)
        if (lines and lines[-1]["text"].startswith("trial process exited")) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    click.echo(f"trial {trial_id} errored; its last {len(lines)} log lines:", err=True)
    for line in lines:
        click.echo(f"  | {line['text']}", err=True)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@experiment.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--limit", default=100, show_default=True, help="At most this many experiments.")
@click.option("--all", "show_all", is_flag=True, help="Archived experiments too.")
def experiment_list(as_json: bool, limit: int, show_all: bool) -> None:
    """List experiments, newest first (without the archived ones unless --all)."""
    rows = _call(lambda c: c.list_experiments(limit=limit, archived=None if show_all else False))
    if as_json:
        _print_json(rows)
        return
    click.echo(f"{'ID':>5}  {'STATE':18} {'TRIALS':>6}  {'SEARCHER':14} NAME")
    for r in rows:
        labels = f"  [{', '.join(r['labels'])}]" if r.get("labels") else ""
        labels += "  (archived)" if r.get("archived") else ""
        _echo_row(f"{r['id']:>5}  {r['state']:18} {r['num_trials']:>6}  {r['searcher_name']:14} {r['name']}{labels}")


@experiment.command("describe")
@click.argument("experiment_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def experiment_describe(experiment_id: int, as_json: bool) -> None:
    """Show an experiment and its trials."""
    client = _client()
    try:
        exp = client.get_experiment(experiment_id)
        trials = client.list_trials(experiment_id)
        best_checkpoint = _best_checkpoint(client, exp)
    except APIError as exc:
        _fail(exc)
        return
    if as_json:
        _print_json({"experiment": exp, "trials": trials, "best_checkpoint": best_checkpoint})
        return
    click.echo(f"experiment {exp['id']}: {exp['name']}  state={exp['state']}  searcher={exp['searcher_name']}"
               f"  metric={exp['searcher_metric']}  progress={exp['progress']:.0%}  priority={exp['priority']}"
               f"  weight={exp['weight']:g}  max_slots={exp['max_slots'] or '-'}")
    if exp.get("description"):
        click.echo(f"  description: {exp['description']}")
    if exp.get("labels"):
        click.echo(f"  labels: {', '.join(exp['labels'])}")
    if exp.get("archived"):
        click.echo("  archived (kiln experiment unarchive shows it in the list again)")
    best = exp.get("best_trial")
    if best:
        click.echo(f"  best trial {best['id']}: {exp['searcher_metric']}={_fmt(best['best_metric'])}")
    if best_checkpoint:
        click.echo(f"  best checkpoint {best_checkpoint['uuid']}: trial {best_checkpoint['trial_id']} step"
                   f" {best_checkpoint['steps_completed']}, {exp['searcher_metric']}={_fmt(best_checkpoint['metric'])}")
    for line in _lineage_lines(exp.get("lineage")):
        click.echo(f"  {line}")
    if hint := _experiment_hint(exp, trials):
        click.echo(f"warning: {hint}")
    _trials_table(trials)


def _lineage_lines(lineage: dict[str, Any] | None) -> list[str]:
    """What ``describe`` says an experiment was made of: config, code, data version, parent checkpoint."""
    if not lineage:
        return []
    lines = [f"config: {lineage['config_digest']}", f"code: {lineage['code_digest']}"]
    data = lineage.get("data")
    if data:
        how = "the latest at submission" if data.get("latest") else "as the config named it"
        lines.append(f"data: {data['table']} version {data['version']} ({how})")
    parent = lineage.get("parent")
    if parent:
        lines.append(f"parent checkpoint: {parent['uuid']} (experiment {parent['experiment_id']} trial"
                     f" {parent['trial_id']}, step {parent['steps_completed']}; {parent['named_by']})")
    return lines


def _best_checkpoint(client: Client, exp: dict[str, Any]) -> dict[str, Any] | None:
    """The experiment's best kept checkpoint by its searcher metric (the one ``download`` takes first)."""
    if not exp.get("best_trial"):
        return None
    best = client.experiment_checkpoints(int(exp["id"]), sort_by="metric", state="COMPLETED", limit=1)
    return best[0] if best and best[0].get("metric") is not None else None


def _trials_table(trials: list[dict[str, Any]]) -> None:
    click.echo(f"{'TRIAL':>6}  {'STATE':18} {'RESTARTS':>8} {'STEPS':>8}  {'BEST':>10}  HPARAMS")
    for t in trials:
        best = _fmt(t["best_metric"]) if t["best_metric"] is not None else "-"
        _echo_row(f"{t['id']:>6}  {t['state']:18} {t['restarts']:>8} {t['steps_completed']:>8}  {best:>10}  "
                  f"{_hparams_text(t['hparams'])}")


@experiment.command("list-trials")
@click.argument("experiment_id", type=int)
@_JSON
def experiment_list_trials(experiment_id: int, as_json: bool) -> None:
    """List an experiment's trials: state, restarts, steps, best metric, hyperparameters."""
    trials = _call(lambda c: c.list_trials(experiment_id))
    if as_json:
        _print_json(trials)
        return
    _trials_table(trials)


@experiment.command("config")
@click.argument("experiment_id", type=int)
@_JSON
def experiment_config(experiment_id: int, as_json: bool) -> None:
    """Print an experiment's config: the YAML as submitted (--json: the config as validated, defaults filled)."""
    exp = _call(lambda c: c.get_experiment(experiment_id))
    if as_json:
        _print_json(exp["config"])
        return
    click.echo(exp["config_yaml"], nl=not exp["config_yaml"].endswith("\n"))


@experiment.command("wait")
@click.argument("experiment_id", type=int)
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between two looks.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="Give up after this many seconds (exit 2).  [default: wait as long as it takes]")
@_JSON
def experiment_wait(experiment_id: int, interval: float, timeout: float | None, as_json: bool) -> None:
    """Wait until an experiment ends and print its final state; exit 0 only if it COMPLETED (1 otherwise)."""
    try:
        exp = _client().wait_experiment(experiment_id, poll_s=interval, timeout_s=timeout)
    except APIError as exc:
        _fail(exc)
    except TimeoutError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        _print_json({"id": exp["id"], "state": exp["state"], "end_reason": exp.get("end_reason", ""),
                     "best_trial": exp.get("best_trial")})
    else:
        reason = f" ({exp['end_reason']})" if exp.get("end_reason") else ""
        click.echo(f"experiment {experiment_id}: {exp['state']}{reason}")
    sys.exit(0 if exp["state"] == "COMPLETED" else 1)


@experiment.command("logs")
@click.argument("experiment_id", type=int)
@_JSON
def experiment_logs(experiment_id: int, as_json: bool) -> None:
    """Print the logs of every trial of an experiment (time, rank, worker, text)."""
    client = _client()
    rows: list[dict[str, Any]] = []
    try:
        for t in client.list_trials(experiment_id):
            workers = _workers_of(t)
            for line in _all_logs(client, int(t["id"])):
                rec = {"trial_id": t["id"], **log_record(line, workers)}
                if as_json:
                    rows.append(rec)
                else:
                    click.echo(f"[trial {t['id']}] {log_text(rec)}")
    except APIError as exc:
        _fail(exc)
    if as_json:
        _print_json(rows)


@experiment.command("kill")
@click.argument("experiment_id", type=int)
@_JSON
def experiment_kill(experiment_id: int, as_json: bool) -> None:
    """Kill an experiment and its trials."""
    _echo_state(lambda c: c.kill_experiment(experiment_id), f"experiment {experiment_id}", as_json)


@experiment.command("events")
@click.argument("experiment_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def experiment_events(experiment_id: int, as_json: bool) -> None:
    """The audit trail: every event about the experiment, with stream sequence numbers."""
    client = _client()
    rows: list[dict[str, Any]] = []
    try:
        after = 0
        while True:
            page = client.experiment_events(experiment_id, after_seq=after)
            rows += page
            if len(page) < 1000:
                break
            after = page[-1]["seq"]
    except APIError as exc:
        _fail(exc)
        return
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        detail = {k: v for k, v in r["event"].items() if k not in ("type", "experiment_id", "config", "config_yaml")}
        shown = json.dumps(detail, sort_keys=True)[:150]
        _echo_row(f"{r['seq']:>8}  {str(r['time'])[:23]:23}  {r['type']:26} {shown}")


@experiment.command("pause")
@click.argument("experiment_id", type=int)
@_JSON
def experiment_pause(experiment_id: int, as_json: bool) -> None:
    """Pause an experiment: trials checkpoint and release their slots."""
    _echo_state(lambda c: c.pause_experiment(experiment_id), f"experiment {experiment_id}", as_json)


@experiment.command("activate")
@click.argument("experiment_id", type=int)
@_JSON
def experiment_activate(experiment_id: int, as_json: bool) -> None:
    """Activate a paused experiment: trials resume from their checkpoints."""
    _echo_state(lambda c: c.activate_experiment(experiment_id), f"experiment {experiment_id}", as_json)


@experiment.group("set")
def experiment_set() -> None:
    """Change an experiment: name, description, priority, weight, max-slots, gc-policy."""


def _set_knob(knob: str, experiment_id: int, value: str, as_json: bool = False) -> None:
    try:
        parsed: float | int = float(value) if knob == "weight" else int(value)
    except ValueError:
        _fail(ValueError(f"{knob} must be a {'number' if knob == 'weight' else 'whole number'}, got {value!r}"))
        return
    try:
        out = _client().set_resources(experiment_id, **{knob.replace("-", "_"): parsed})
    except APIError as exc:
        _fail(exc)
        return
    if as_json:
        _print_json(out)
        return
    click.echo(f"experiment {experiment_id}: {knob} = {parsed}")


def _knob_command(knob: str, help_text: str) -> None:
    @experiment_set.command(knob, help=help_text)
    @click.argument("experiment_id", type=int)
    @click.argument("value")
    @_JSON
    def command(experiment_id: int, value: str, as_json: bool) -> None:
        _set_knob(knob, experiment_id, value, as_json)


def _metadata_command(field: str, help_text: str) -> None:
    @experiment_set.command(field, help=help_text)
    @click.argument("experiment_id", type=int)
    @click.argument("value")
    @_JSON
    def command(experiment_id: int, value: str, as_json: bool) -> None:
        out = _call(lambda c: c.set_experiment_metadata(experiment_id, name=value) if field == "name"
                    else c.set_experiment_metadata(experiment_id, description=value))
        if as_json:
            _print_json(out)
            return
        click.echo(f"experiment {experiment_id}: {field} = {out[field]!r}")


_metadata_command("name", "Rename an experiment (owner or admin).")
_metadata_command("description", "Change an experiment's description (owner or admin).")


_knob_command("priority", "Change an experiment's priority (1-99, lower first).")
_knob_command("weight", "Change an experiment's weight (its fair share).")
_knob_command("max-slots", "Change an experiment's max-slots (0: no cap).")


@experiment_set.command("gc-policy")
@click.argument("experiment_id", type=int)
@click.option("--save-experiment-best", type=click.IntRange(min=0), default=None,
              help="Keep the N best checkpoints of the whole experiment.")
@click.option("--save-trial-best", type=click.IntRange(min=0), default=None, help="Keep each trial's N best.")
@click.option("--save-trial-latest", type=click.IntRange(min=0), default=None, help="Keep each trial's N latest.")
@_JSON
def experiment_set_gc_policy(experiment_id: int, save_experiment_best: int | None, save_trial_best: int | None,
                             save_trial_latest: int | None, as_json: bool) -> None:
    """Change checkpoint retention; finished trials' checkpoints it no longer keeps are deleted at once."""
    out = _call(lambda c: c.set_gc_policy(experiment_id, save_experiment_best=save_experiment_best,
                                          save_trial_best=save_trial_best, save_trial_latest=save_trial_latest))
    if as_json:
        _print_json(out)
        return
    shown = ", ".join(f"{k} = {out[k]}" for k in ("save_experiment_best", "save_trial_best", "save_trial_latest")
                      if out.get(k) is not None)
    click.echo(f"experiment {experiment_id}: {shown}")


def _archive_command(name: str, archived: bool, help_text: str) -> None:
    @experiment.command(name, help=help_text)
    @click.argument("experiment_id", type=int)
    @_JSON
    def command(experiment_id: int, as_json: bool) -> None:
        out = _call(lambda c: c.set_experiment_metadata(experiment_id, archived=archived))
        if as_json:
            _print_json(out)
            return
        click.echo(f"experiment {experiment_id}: {'archived' if out['archived'] else 'not archived'}")


_archive_command("archive", True, "Archive an ended experiment: `experiment list` leaves it out (--all shows it).")
_archive_command("unarchive", False, "Unarchive an experiment: `experiment list` shows it again.")


@experiment.command("delete")
@click.argument("experiment_id", type=int)
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@_JSON
def experiment_delete(experiment_id: int, yes: bool, as_json: bool) -> None:
    """Delete an ended experiment (owner or admin): its checkpoints' files, trials, metrics and logs. Its events
    stay in the log. Checkpoints registered as model versions block it."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"delete experiment {experiment_id} with its checkpoints, metrics and logs?", abort=True)
    out = _call(lambda c: c.delete_experiment(experiment_id))
    if as_json:
        _print_json(out)
        return
    click.echo(f"experiment {experiment_id}: deleted ({out['checkpoints_deleted']} checkpoints,"
               f" {out['objects_removed']} objects removed)")


@experiment.group("label")
def experiment_label() -> None:
    """Add labels to an experiment or remove them."""


@experiment_label.command("add")
@click.argument("experiment_id", type=int)
@click.argument("labels", nargs=-1, required=True)
@_JSON
def experiment_label_add(experiment_id: int, labels: tuple[str, ...], as_json: bool) -> None:
    """Add LABELS to an experiment (owner or admin); one already there stays once."""
    _echo_labels(_call(lambda c: c.set_experiment_metadata(experiment_id, add_labels=list(labels))), as_json)


@experiment_label.command("remove")
@click.argument("experiment_id", type=int)
@click.argument("labels", nargs=-1, required=True)
@_JSON
def experiment_label_remove(experiment_id: int, labels: tuple[str, ...], as_json: bool) -> None:
    """Remove LABELS from an experiment (owner or admin)."""
    _echo_labels(_call(lambda c: c.set_experiment_metadata(experiment_id, remove_labels=list(labels))), as_json)


def _echo_labels(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(out)
        return
    click.echo(f"experiment {out['id']}: labels = {', '.join(out['labels']) or '(none)'}")


@experiment.command("download")
@click.argument("experiment_id", type=int)
@click.option("--top-n", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many of the best checkpoints (by the searcher metric).")
@click.option("--output", "-o", "output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to put them (one directory per checkpoint).  [default: ./checkpoints]")
@_JSON
def experiment_download(experiment_id: int, top_n: int, output: Path | None, as_json: bool) -> None:
    """Download the best K checkpoints of an experiment by its searcher metric."""
    target = output or Path("checkpoints")
    best = _call(lambda c: c.experiment_checkpoints(experiment_id, sort_by="metric", state="COMPLETED",
                                                    limit=top_n))
    if not best:
        _fail(ValueError(f"experiment {experiment_id} has no checkpoint to download"))
    rows = []
    for c in best:
        uuid = str(c["uuid"])
        files = _call(lambda cl: cl.download_checkpoint(uuid, target / uuid))  # noqa: B023 - _call runs it at once
        rows.append({"uuid": uuid, "directory": str(target / uuid), "files": sorted(files), "trial_id": c["trial_id"],
                     "steps_completed": c["steps_completed"], "searcher_metric": c["searcher_metric"],
                     "metric": c["metric"]})
        if not as_json:
            click.echo(f"{target / c['uuid']}  trial {c['trial_id']} step {c['steps_completed']}"
                       f"  {c['searcher_metric']} = {_fmt(c['metric'])}")
    if as_json:
        _print_json(rows)


@experiment.command("download-code")
@click.argument("experiment_id", type=int)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@_JSON
def experiment_download_code(experiment_id: int, directory: Path, as_json: bool) -> None:
    """Download the code context of an experiment, exactly as submitted, into DIRECTORY."""
    names = _call(lambda c: c.download_context(experiment_id, directory))
    if as_json:
        _print_json({"directory": str(directory), "files": sorted(names)})
        return
    click.echo(f"downloaded {len(names)} files to {directory}")


def _echo_state(call: Any, what: str, as_json: bool = False) -> None:
    try:
        out = call(_client())
    except APIError as exc:
        _fail(exc)
        return
    if as_json:
        _print_json(out)
        return
    click.echo(f"{what}: {out['state']}")


# -- trials --------------------------------------------------------------------------------------------


@main.group()
def trial() -> None:
    """Inspect trials."""


TRIAL_DESCRIBE_LAST = 10


@trial.command("describe")
@click.argument("trial_id", type=int)
@click.option("--all", "show_all", is_flag=True,
              help=f"Every validation and checkpoint (else the last {TRIAL_DESCRIBE_LAST} of each).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (always everything).")
def trial_describe(trial_id: int, show_all: bool, as_json: bool) -> None:
    """Show a trial, its allocations, its latest validations and checkpoints."""
    client = _client()
    try:
        t = client.get_trial(trial_id)
        metrics = client.trial_metrics(trial_id, kind="validation")
        checkpoints = client.trial_checkpoints(trial_id)
        searcher_metric = client.get_experiment(t["experiment_id"])["searcher_metric"]
    except APIError as exc:
        _fail(exc)
        return
    if as_json:
        _print_json({"trial": t, "validation_metrics": metrics, "checkpoints": checkpoints})
        return
    hint = metric_hint(searcher_metric, {k for m in metrics for k in m["metrics"]})
    click.echo(f"trial {t['id']} of experiment {t['experiment_id']}: state={t['state']} restarts={t['restarts']}"
               f" steps={t['steps_completed']} hparams={_hparams_text(t['hparams'])}")
    for a in t["allocations"]:
        hosts = ", ".join(n["worker_id"] for n in a.get("nodes") or []) or a["worker_id"]  # several: it spans
        click.echo(f"  allocation {a['id']} on {hosts}: exit={a['exit_code']} {a['end_reason']}")
    for what, rows in (("validations", metrics), ("checkpoints", checkpoints)):
        if not show_all and len(rows) > TRIAL_DESCRIBE_LAST:
            click.echo(f"  ({len(rows) - TRIAL_DESCRIBE_LAST} earlier {what} not shown: --all shows every one)")
            rows = rows[-TRIAL_DESCRIBE_LAST:]
        for r in rows:
            if what == "validations":
                click.echo(f"  validation at step {r['steps_completed']}: {_metrics_text(r['metrics'])}")
            else:
                click.echo(f"  checkpoint {r['uuid']} at step {r['steps_completed']}")
    if hint:
        click.echo(f"warning: {hint}")


@trial.command("kill")
@click.argument("trial_id", type=int)
@_JSON
def trial_kill(trial_id: int, as_json: bool) -> None:
    """Kill one trial."""
    _echo_state(lambda c: c.kill_trial(trial_id), f"trial {trial_id}", as_json)


_RANK_PREFIX = re.compile(r"\[rank=(\d+)\] ?")  # what kiln.launch's wrap_rank puts before each line of a rank
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LOG_PAGE = 10000


def log_record(line: dict[str, Any], workers: dict[str, str | None]) -> dict[str, Any]:
    """A log line with its rank (from the ``[rank=N]`` prefix; None without one) and worker (by its allocation;
    None for an allocation spanning several workers) beside the text without the prefix."""
    text = str(line["text"])
    m = _RANK_PREFIX.match(text)
    return {**line, "rank": int(m.group(1)) if m else None, "worker": workers.get(line["allocation_id"]),
            "message": text[m.end():] if m else text}


def log_text(rec: dict[str, Any]) -> str:
    """``2026-12-03 15:40:01.123 [rank=1] w0  text``: time (UTC, ms), rank when there is one, worker."""
    when = str(rec["ts"]).replace("T", " ").removesuffix("Z")[:23]
    parts = [when] + ([f"[rank={rec['rank']}]"] if rec["rank"] is not None else []) + [rec["worker"] or "-"]
    return " ".join(parts) + "  " + str(rec["message"])


def _workers_of(t: dict[str, Any]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for a in t.get("allocations") or []:
        nodes = a.get("nodes") or []
        out[a["id"]] = a["worker_id"] if len(nodes) <= 1 else None  # several: the rank says which line is whose
    return out


def _all_logs(client: Client, trial_id: int, since: str | None = None) -> list[dict[str, Any]]:
    """Every log line of a trial (written at or after ``since``), page by page."""
    lines: list[dict[str, Any]] = []
    while True:
        page = client.trial_logs(trial_id, limit=LOG_PAGE, offset=len(lines), since=since)
        lines += page
        if len(page) < LOG_PAGE:
            return lines


def parse_since(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """``--since``: a duration back from now (``90s``, ``10m``, ``2h``, ``1d``) or an ISO 8601 time (UTC if it
    names no zone)."""
    if m := _DURATION.fullmatch(value.strip()):
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a duration (90s, 10m, 2h, 1d) nor an ISO 8601 time",
                                 param_hint="--since") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _ts(value: Any) -> dt.datetime:
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


class _LogFollower:
    """Prints each log line of a trial once. Lines are fetched again from a little before the newest one seen
    (``overlap_s``): the worker ships them in batches, so a line can reach the read model after a later one of
    another allocation; remembering (allocation, line) keys keeps them from printing twice."""

    def __init__(self, client: Client, trial_id: int, emit: Callable[[dict[str, Any]], None],
                 rank: int | None = None, since: dt.datetime | None = None, overlap_s: float = 30.0) -> None:
        self.client, self.trial_id, self.emit, self.rank = client, trial_id, emit, rank
        self.since, self.overlap = since, dt.timedelta(seconds=overlap_s)
        self.seen: set[tuple[str, int]] = set()
        self.newest: dt.datetime | None = None
        self.workers: dict[str, str | None] = {}
        self.exit_line_of: set[str] = set()  # allocations whose "trial process exited" line was seen

    def take(self, lines: list[dict[str, Any]], last: int | None = None) -> None:
        """Print the lines not printed yet (of the chosen rank; only the ``last`` N of them)."""
        fresh = []
        for line in lines:
            key = (str(line["allocation_id"]), int(line["line_no"]))
            if key in self.seen:
                continue
            self.seen.add(key)
            when = _ts(line["ts"])
            self.newest = when if self.newest is None or when > self.newest else self.newest
            if str(line["text"]).startswith("trial process exited"):
                self.exit_line_of.add(key[0])
            if line["allocation_id"] not in self.workers:
                self.workers = _workers_of(self.client.get_trial(self.trial_id))
            rec = log_record(line, self.workers)
            if self.rank is None or (rec["rank"] or 0) == self.rank:  # no prefix: a single process, rank 0
                fresh.append(rec)
        for rec in fresh[-last:] if last else fresh:
            self.emit(rec)

    def first(self, tail: int | None) -> None:
        """What is there now (``tail``: the last N lines)."""
        since = _iso(self.since) if self.since else None
        if tail and self.rank is None:
            self.take(self.client.trial_logs(self.trial_id, limit=tail, tail=True, since=since))
        else:
            self.take(_all_logs(self.client, self.trial_id, since), last=tail)

    def poll(self) -> None:
        """The lines written since the newest one seen (less the overlap)."""
        since = self.newest - self.overlap if self.newest else self.since
        if since is not None and self.since is not None and since < self.since:
            since = self.since
        self.take(_all_logs(self.client, self.trial_id, _iso(since) if since else None))

    def follow(self, poll_s: float = 1.0, grace_s: float = 10.0) -> None:
        """Poll until the trial has ended and its last run's exit line arrived (or ``grace_s`` after it ended)."""
        ended_at: float | None = None
        while True:
            t = self.client.get_trial(self.trial_id)
            self.workers = _workers_of(t)
            self.poll()
            if t["state"] in TERMINAL_STATES:
                ended_at = ended_at if ended_at is not None else time.monotonic()
                last_run = t["allocations"][-1]["id"] if t.get("allocations") else None
                if last_run is None or last_run in self.exit_line_of or time.monotonic() - ended_at > grace_s:
                    return
            time.sleep(poll_s)


@trial.command("logs")
@click.argument("trial_id", type=int)
@click.option("--tail", type=click.IntRange(min=1), default=None, help="Only the last N lines (then the new ones).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the trial ends.")
@click.option("--rank", type=click.IntRange(min=0), default=None,
              help="Only the lines of this rank (a line without a [rank=N] prefix counts as rank 0).")
@click.option("--since", "since", default=None, metavar="DURATION|TIME",
              help="Only lines written since: 90s, 10m, 2h, 1d back, or an ISO 8601 time.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: an array; with --follow one object per line (JSON Lines).")
def trial_logs(trial_id: int, tail: int | None, follow: bool, rank: int | None, since: str | None,
               as_json: bool) -> None:
    """Print a trial's logs: time (UTC), rank when the trial has several, worker, text."""
    since_at = parse_since(since) if since else None
    rows: list[dict[str, Any]] = []

    def emit(rec: dict[str, Any]) -> None:
        if as_json and not follow:
            rows.append(rec)
        elif as_json:
            click.echo(json.dumps(rec, sort_keys=True, default=str))
        else:
            click.echo(log_text(rec))

    follower = _LogFollower(_client(), trial_id, emit, rank=rank, since=since_at)
    try:
        follower.first(tail)
        if follow:
            follower.follow()
    except APIError as exc:
        _fail(exc)
    if as_json and not follow:
        _print_json(rows)


# -- cluster -------------------------------------------------------------------------------------------


@main.group()
def agent() -> None:
    """Worker agents."""


@agent.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def agent_list(as_json: bool) -> None:
    """List worker agents and how many of their slots are busy."""
    agents = _call(lambda c: c.list_agents())
    if as_json:
        _print_json(agents)
        return
    click.echo(f"{'AGENT':16} {'POOL':10} {'SLOTS':>5} {'BUSY':>5}  STATE")
    for a in agents:
        busy = sum(1 for s in a["slots"] if s["allocation_id"])
        _echo_row(f"{a['worker_id']:16} {a['resource_pool']:10} {len(a['slots']):>5} {busy:>5}  "
                  f"{'lost' if a['lost'] else 'alive'}")


@main.group()
def slot() -> None:
    """Slots (GPUs, or CPU slots)."""


@slot.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def slot_list(as_json: bool) -> None:
    """List every slot and the allocation on it."""
    agents = _call(lambda c: c.list_agents())
    rows = [{"agent": a["worker_id"], **s} for a in agents for s in a["slots"]]
    if as_json:
        _print_json(rows)
        return
    click.echo(f"{'AGENT':16} {'SLOT':8} {'KIND':5} {'NAME':24} ALLOCATION")
    for r in rows:
        _echo_row(f"{r['agent']:16} {r['slot']['slot_id']:8} {r['slot']['kind']:5} {r['slot']['name'][:24]:24} "
                  f"{r['allocation_id'] or '-'}")


@main.group()
def job() -> None:
    """The job queue."""


@job.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def job_list(as_json: bool) -> None:
    """List trials holding or waiting for slots, in scheduling order."""
    jobs = _call(lambda c: c.list_jobs())
    if as_json:
        _print_json(jobs)
        return
    click.echo(f"{'POS':>4} {'EXP':>5} {'TRIAL':>6} {'STATE':9} {'PRIO':>4} {'WEIGHT':>6} {'SLOTS':>5}  "
               f"{'WORKER':12} NOTE")
    for j in jobs:
        pos = j["position"] if j["position"] is not None else "-"
        state = "PREEMPT" if j["preempting"] else j["state"]
        _echo_row(f"{pos:>4} {j['experiment_id']:>5} {j['trial_id']:>6} {state:9} {j['priority']:>4} "
                  f"{j['weight']:>6.3g} {j['slots']:>5}  {j['worker_id'] or '-':12} {j.get('reason', '')}")


# -- events ------------------------------------------------------------------------------------------------


@main.group()
def events() -> None:
    """The event log: replay and verify projections."""


@events.command("replay")
@click.option("--verify", is_flag=True, help="Replay up to the live positions and compare every table's digest.")
@click.option("--swap", is_flag=True, help="Repair: rebuild, check the rebuild with a second one, then make it the"
              " live read model in one transaction (the old one is kept in a kiln_backup_* schema).")
@click.option("--schema", default="replay", show_default=True, help="The fresh Postgres schema to rebuild into.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None, help="The local stack to use.")
def events_replay(verify: bool, swap: bool, schema: str, state_dir: Path | None) -> None:
    """Rebuild every projection from the streams into a fresh schema (on the local stack)."""
    import os

    from deploy import stack
    from services.tracker import replay

    cfg = stack.StackConfig.load(state_dir)
    if not (cfg.state_dir / "credentials.json").exists():
        _fail(FileNotFoundError(f"no local stack under {cfg.state_dir} (run `kiln up`, or pass --state-dir)"))
    os.environ.update(stack.service_env(cfg, stack.Credentials.load_or_create(cfg.state_dir), "tracker"))
    sys.exit(replay.main(["--schema", schema] + (["--verify"] if verify else []) + (["--swap"] if swap else [])))


# -- search preview ------------------------------------------------------------------------------------


@main.command("preview-search")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--simulate", type=click.Choice(["improving", "worsening", "worse-each-report", "random"]), default=None,
              help="Also play the search with the real searcher against synthetic learning curves.")
@click.option("--period", type=int, default=1, show_default=True,
              help="With --simulate: trials validate every PERIOD units of the time metric.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --simulate: the experiment seed.")
def preview_search(config: Path, as_json: bool, simulate: str | None, period: int, seed: int) -> None:
    """Show brackets, rungs and total training length of CONFIG's search, before any GPU is spent."""
    import msgspec

    from schemas.config import ConfigError, parse_config
    from services.searcher import preview as search_preview
    from services.searcher.simulate import simulate as play

    try:
        cfg, warnings = parse_config(config.read_text())
        shown = search_preview.preview(cfg)
    except (ConfigError, ValueError) as exc:
        _fail(exc)
        return
    records = []
    if simulate:
        if period < 1:
            _fail(ValueError("--period must be at least 1"))
        fn = search_preview.curve(simulate, cfg.searcher.smaller_is_better, seed)  # type: ignore[arg-type]
        records = play(cfg, seed, fn, period)
    if as_json:
        out = msgspec.to_builtins(shown)
        if simulate:
            out["simulation"] = msgspec.to_builtins(records)
        _print_json(out)
        return
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    mode = "" if shown.method not in ("adaptive_asha",) else f" ({cfg.searcher.mode})"
    click.echo(f"{shown.method}{mode}: {shown.trials} trials, max length {shown.max_length} {shown.unit}"
               + ("" if shown.stop_once else ", promotion-based (stop_once: false)"))
    for i, b in enumerate(shown.brackets):
        click.echo(f"bracket {i}: {b.max_trials} trials, {b.max_concurrent_trials} at a time,"
                   f" {b.total_length} {shown.unit} in all")
        for k, rung in enumerate(b.rungs):
            click.echo(f"  rung {k}: length {rung.length:>6} {shown.unit}, trials reaching it: {rung.trials}")
    click.echo(f"total training length: {shown.total_length} {shown.unit}"
               f" (vs {shown.trials * shown.max_length} if every trial trained to the end)")
    if simulate:
        click.echo(f"simulation ({simulate}, validating every {period} {shown.unit}):")
        click.echo(f"{'TRIAL':>5} {'STOPPED AT':>10}  {'EARLY':5}  LENGTHS ASKED")
        for r in records:
            _echo_row(f"{r.request_id:>5} {r.stop_length:>10}  {'yes' if r.stopped_early else 'no':5}  "
                      f"{' -> '.join(str(x) for x in r.lengths_trained)}")
        click.echo(f"simulated training length: {sum(r.stop_length for r in records)} {shown.unit}")


# -- checkpoints ---------------------------------------------------------------------------------------


@main.group()
def checkpoint() -> None:
    """List, describe, download and delete checkpoints."""


_CHECKPOINT_HEADER = f"{'UUID':36}  {'TRIAL':>5} {'STEPS':>8}  {'STATE':9}  {'METRIC':>12}  FILES"


def _checkpoint_line(c: dict[str, Any]) -> str:
    size = sum(c["resources"].values())
    return (f"{c['uuid']:36}  {c['trial_id']:>5} {c['steps_completed']:>8}  {c['state']:9}  "
            f"{_fmt(c['metric']):>12}  {len(c['resources'])} ({size} B)")


@checkpoint.command("list")
@click.argument("experiment_id", type=int, required=False)
@click.option("--trial", "trial_id", type=int, default=None, help="A trial's checkpoints instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def checkpoint_list(experiment_id: int | None, trial_id: int | None, as_json: bool) -> None:
    """List the checkpoints of EXPERIMENT_ID (or of one trial, with --trial)."""
    if (experiment_id is None) == (trial_id is None):
        _fail(click.UsageError("give EXPERIMENT_ID or --trial ID (one of them)"))
    rows = _call(lambda c: c.trial_checkpoints(trial_id) if trial_id is not None
                 else c.experiment_checkpoints(experiment_id))  # type: ignore[arg-type]
    if as_json:
        _print_json(rows)
        return
    click.echo(_CHECKPOINT_HEADER)
    for c in rows:
        _echo_row(_checkpoint_line(c))


@checkpoint.command("describe")
@click.argument("uuid")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def checkpoint_describe(uuid: str, as_json: bool) -> None:
    """Show one checkpoint: trial, steps, state, metric, framework, files (size, sha256, mtime) and metadata."""
    c = _call(lambda cl: cl.get_checkpoint(uuid))
    recorded = _recorded_files(uuid) if c["state"] == "COMPLETED" else None
    if as_json:
        _print_json({**c, "recorded": recorded})
        return
    click.echo(f"checkpoint {c['uuid']}: {c['state']}" + (f" ({c['delete_reason']})" if c["delete_reason"] else ""))
    click.echo(f"  experiment {c['experiment_id']} trial {c['trial_id']} at step {c['steps_completed']}")
    click.echo(f"  {c['searcher_metric'] or 'searcher metric'}: {_fmt(c['metric'])}")
    click.echo(f"  stored in {c['storage']}/{c['uuid']} at {c['reported_at']}")
    if c["protected"]:
        click.echo("  protected (a registered model version): never collected")
    if recorded and recorded["hashed"]:
        click.echo(f"  framework: {recorded['framework'] or 'unknown'}")
        for rel, f in sorted(recorded["files"].items()):
            when = dt.datetime.fromtimestamp(f["mtime"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            click.echo(f"  {f['size']:>12}  {f['sha256']}  {when}  {rel}")
    else:
        for rel, size in sorted(c["resources"].items()):
            click.echo(f"  {size:>12}  {rel}")
    if c["metadata"]:
        click.echo(f"  metadata: {json.dumps(c['metadata'], sort_keys=True, default=str)}")


def _recorded_files(uuid: str) -> dict[str, Any] | None:
    """The checkpoint's recorded files (sha256, mtime); None where the gateway cannot read them (another store,
    its files gone)."""
    try:
        return _client().checkpoint_files(uuid)
    except APIError as exc:
        if exc.status in (409, 410):
            return None
        _fail(exc)


@checkpoint.command("download")
@click.argument("uuid")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--output", "-o", "output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to put the files.  [default: ./checkpoints/UUID]")
@_JSON
def checkpoint_download(uuid: str, directory: Path | None, output: Path | None, as_json: bool) -> None:
    """Download checkpoint UUID's files (with their modification times) into --output (or DIRECTORY)."""
    target = output or directory or Path("checkpoints") / uuid
    names = _call(lambda c: c.download_checkpoint(uuid, target))
    if as_json:
        _print_json({"uuid": uuid, "directory": str(target), "files": sorted(names)})
        return
    click.echo(f"downloaded {len(names)} files to {target}: {', '.join(sorted(names))}")


@checkpoint.command("delete")
@click.argument("uuid")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@_JSON
def checkpoint_delete(uuid: str, yes: bool, as_json: bool) -> None:
    """Delete checkpoint UUID's files from the store (owner or admin); it stays listed as DELETED."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"delete the files of checkpoint {uuid}?", abort=True)
    out = _call(lambda c: c.delete_checkpoint(uuid))
    if as_json:
        _print_json(out)
        return
    click.echo(f"checkpoint {uuid}: {out['state']} ({out['objects_removed']} objects removed)")


@main.group("tensorboard")
def tensorboard_group() -> None:
    """TensorBoard on trials' event files (Determined's `det tensorboard`; runs in the foreground)."""


@tensorboard_group.command("start")
@click.argument("experiment_ids", nargs=-1, type=int)
@click.option("--trial", "-t", "trial_ids", multiple=True, type=int,
              help="A trial to show (repeatable), besides every trial of EXPERIMENT_IDS.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="Port on 127.0.0.1  [default: a free one]")
@click.option("--logdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the synced files here  [default: a temporary directory, removed at exit]")
@click.option("--sync-interval", type=click.FloatRange(min=1.0), default=10.0, show_default=True,
              help="Seconds between syncs while it runs.")
@_JSON
def tensorboard_start(experiment_ids: tuple[int, ...], trial_ids: tuple[int, ...], port: int, logdir: Path | None,
                      sync_interval: float, as_json: bool) -> None:
    """Sync the TensorBoard files of EXPERIMENT_IDS' trials (and --trial IDs) from the store, serve them with
    TensorBoard on 127.0.0.1 and keep syncing while they run, until Ctrl-C. Runs are named EXPERIMENT/TRIAL."""
    if not experiment_ids and not trial_ids:
        raise click.UsageError("give experiment ids, --trial ids or both")
    from kiln import tbsync

    def announce(info: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(info, sort_keys=True))
        else:
            shown = ", ".join(map(str, info["trials"])) or "none yet"
            click.echo(f"TensorBoard is running at {info['url']} (trials {shown}; files in {info['logdir']},"
                       f" synced every {sync_interval:g} s). Ctrl-C stops it.")

    try:
        tbsync.serve(_client(), experiment_ids, trial_ids, port=port, logdir=logdir, sync_interval=sync_interval,
                     announce=announce, warn=lambda text: click.echo(f"warning: {text}", err=True))
    except (APIError, tbsync.BoardError) as exc:
        _fail(exc)


# -- the model registry --------------------------------------------------------------------------------------


@main.group()
def model() -> None:
    """The model registry: models, their versions (registered checkpoints), labels and metadata."""


def _key_values(pairs: Sequence[str], what: str) -> dict[str, Any]:
    """KEY=VALUE pairs as a dict; a VALUE that reads as JSON is that value (3, true, [1, 2]), else the text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            _fail(click.UsageError(f"{what} {pair!r} is not KEY=VALUE"))
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


_MODEL_HEADER = f"{'NAME':24} {'VERSIONS':>8}  {'OWNER':12} {'UPDATED':20} DESCRIPTION"


def _model_line(m: dict[str, Any]) -> str:
    labels = f"  [{', '.join(m['labels'])}]" if m.get("labels") else ""
    return (f"{m['name']:24} {m['num_versions']:>8}  {m['owner']:12} {str(m['updated_at'])[:19]:20}"
            f" {m['description']}{labels}")


_VERSION_HEADER = (f"{'VERSION':>7}  {'CHECKPOINT':36}  {'EXP':>5} {'TRIAL':>5} {'STEPS':>8}  {'STATE':9}"
                   f"  {'BY':12} NAME")


def _version_line(v: dict[str, Any]) -> str:
    steps = v["steps_completed"] if v["steps_completed"] is not None else "-"
    note = " - ".join(x for x in (v["name"], v["comment"]) if x)
    return (f"{v['version']:>7}  {v['checkpoint_uuid']:36}  {v['experiment_id']:>5} {v['trial_id']:>5} {steps:>8}"
            f"  {v['checkpoint_state'] or '-':9}  {v['registered_by']:12} {note}")


@model.command("create")
@click.argument("name")
@click.option("--description", default="", help="What the model is.")
@click.option("--label", "labels", multiple=True, help="A label (repeat for more).")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE",
              help="A metadata entry (repeat for more; a VALUE that reads as JSON is kept as that).")
@_JSON
def model_create(name: str, description: str, labels: tuple[str, ...], metadata: tuple[str, ...],
                 as_json: bool) -> None:
    """Create model NAME in the registry (you own it); names are unique."""
    values = _key_values(metadata, "--metadata")
    m = _call(lambda c: c.create_model(name, description=description, labels=list(labels), metadata=values))
    if as_json:
        _print_json(m)
        return
    click.echo(f"Created model {m['name']} (id {m['id']})")


@model.command("list")
@click.option("--label", "labels", multiple=True, help="Only models with this label (repeat: with all of them).")
@click.option("--name", default=None, help="Only models whose name contains this.")
@_JSON
def model_list(labels: tuple[str, ...], name: str | None, as_json: bool) -> None:
    """List the registry's models by name."""
    rows = _call(lambda c: c.list_models(labels=list(labels), name=name))
    if as_json:
        _print_json(rows)
        return
    click.echo(_MODEL_HEADER)
    for m in rows:
        _echo_row(_model_line(m))


@model.command("describe")
@click.argument("name")
@_JSON
def model_describe(name: str, as_json: bool) -> None:
    """Show model NAME (or id) and its versions."""
    client = _client()
    try:
        m = client.get_model(name)
        versions = client.model_versions(name)
    except APIError as exc:
        _fail(exc)
    if as_json:
        _print_json({"model": m, "versions": versions})
        return
    click.echo(f"model {m['name']} (id {m['id']}): {m['num_versions']} versions, owner {m['owner']},"
               f" created {str(m['created_at'])[:19]}, updated {str(m['updated_at'])[:19]}")
    if m["description"]:
        click.echo(f"  description: {m['description']}")
    if m["labels"]:
        click.echo(f"  labels: {', '.join(m['labels'])}")
    if m["metadata"]:
        click.echo(f"  metadata: {json.dumps(m['metadata'], sort_keys=True, default=str)}")
    click.echo(_VERSION_HEADER)
    for v in versions:
        _echo_row(_version_line(v))


@model.command("list-versions")
@click.argument("name")
@_JSON
def model_list_versions(name: str, as_json: bool) -> None:
    """List the versions of model NAME: each one's checkpoint, its experiment, trial, steps and state."""
    versions = _call(lambda c: c.model_versions(name))
    if as_json:
        _print_json(versions)
        return
    click.echo(_VERSION_HEADER)
    for v in versions:
        _echo_row(_version_line(v))


@model.command("register-version")
@click.argument("name")
@click.argument("checkpoint_uuid")
@click.option("--name", "version_name", default="", help="A name for the version.")
@click.option("--comment", default="", help="A comment on the version.")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE", help="A metadata entry of the version.")
@_JSON
def model_register_version(name: str, checkpoint_uuid: str, version_name: str, comment: str,
                           metadata: tuple[str, ...], as_json: bool) -> None:
    """Register checkpoint CHECKPOINT_UUID as the next version of model NAME; it is never collected while
    registered."""
    values = _key_values(metadata, "--metadata")
    v = _call(lambda c: c.register_model_version(name, checkpoint_uuid, version_name=version_name, comment=comment,
                                                 metadata=values))
    if as_json:
        _print_json(v)
        return
    click.echo(f"Registered checkpoint {v['checkpoint_uuid']} as version {v['version']} of model {v['model_name']}")


@model.command("download")
@click.argument("name")
@click.option("--version", "version", default="latest", show_default=True, help="A version number, or latest.")
@click.option("--output", "-o", "output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to put the files.  [default: ./checkpoints/UUID]")
@_JSON
def model_download(name: str, version: str, output: Path | None, as_json: bool) -> None:
    """Download the files of a version of model NAME (its checkpoint's; the latest version by default)."""
    from schemas.registry import parse_version

    try:
        selector = parse_version(version)
    except ValueError as exc:
        _fail(click.UsageError(str(exc)))
    v = _call(lambda c: c.get_model_version(name, selector))
    target = output or Path("checkpoints") / v["checkpoint_uuid"]
    names = _call(lambda c: c.download_checkpoint(v["checkpoint_uuid"], target))
    if as_json:
        _print_json({"model": v["model_name"], "version": v["version"], "uuid": v["checkpoint_uuid"],
                     "directory": str(target), "files": sorted(names)})
        return
    click.echo(f"model {v['model_name']} version {v['version']}: downloaded {len(names)} files to {target}")


def _echo_model(m: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(m)
        return
    click.echo(f"model {m['name']}: description = {m['description']!r}, labels = {', '.join(m['labels']) or '(none)'},"
               f" metadata = {json.dumps(m['metadata'], sort_keys=True, default=str)}")


@model.group("label")
def model_label() -> None:
    """Add labels to a model or remove them (owner or admin)."""


@model_label.command("add")
@click.argument("name")
@click.argument("labels", nargs=-1, required=True)
@_JSON
def model_label_add(name: str, labels: tuple[str, ...], as_json: bool) -> None:
    """Add LABELS to model NAME; one already there stays once."""
    _echo_model(_call(lambda c: c.set_model_metadata(name, add_labels=list(labels))), as_json)


@model_label.command("remove")
@click.argument("name")
@click.argument("labels", nargs=-1, required=True)
@_JSON
def model_label_remove(name: str, labels: tuple[str, ...], as_json: bool) -> None:
    """Remove LABELS from model NAME."""
    _echo_model(_call(lambda c: c.set_model_metadata(name, remove_labels=list(labels))), as_json)


@model.group("metadata")
def model_metadata() -> None:
    """Set or remove a model's metadata entries (owner or admin)."""


@model_metadata.command("set")
@click.argument("name")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@_JSON
def model_metadata_set(name: str, pairs: tuple[str, ...], as_json: bool) -> None:
    """Set metadata entries of model NAME (a VALUE that reads as JSON is kept as that: 3, true, [1, 2])."""
    values = _key_values(pairs, "entry")
    _echo_model(_call(lambda c: c.set_model_metadata(name, set_metadata=values)), as_json)


@model_metadata.command("remove")
@click.argument("name")
@click.argument("keys", nargs=-1, required=True)
@_JSON
def model_metadata_remove(name: str, keys: tuple[str, ...], as_json: bool) -> None:
    """Remove metadata entries of model NAME by key."""
    _echo_model(_call(lambda c: c.set_model_metadata(name, remove_metadata=list(keys))), as_json)


@model.group("set")
def model_set() -> None:
    """Change a model: description."""


@model_set.command("description")
@click.argument("name")
@click.argument("description")
@_JSON
def model_set_description(name: str, description: str, as_json: bool) -> None:
    """Change the description of model NAME (owner or admin)."""
    _echo_model(_call(lambda c: c.set_model_metadata(name, description=description)), as_json)


@model.command("delete")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@_JSON
def model_delete(name: str, yes: bool, as_json: bool) -> None:
    """Delete model NAME and all its versions (owner or admin); their checkpoints are collectable again."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"delete model {name} and all its versions?", abort=True)
    out = _call(lambda c: c.delete_model(name))
    if as_json:
        _print_json(out)
        return
    click.echo(f"deleted model {out['name']} ({len(out['versions'])} versions)")


@model.command("delete-version")
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@_JSON
def model_delete_version(name: str, version: int, yes: bool, as_json: bool) -> None:
    """Delete VERSION of model NAME (owner or admin); its checkpoint is collectable again once no version names
    it."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"delete version {version} of model {name}?", abort=True)
    out = _call(lambda c: c.delete_model_version(name, version))
    if as_json:
        _print_json(out)
        return
    click.echo(f"deleted version {version} of model {out['name']}")


if __name__ == "__main__":
    main()
