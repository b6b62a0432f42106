"""What the launchers share: the trial's slots and hosts, the rank wrapper, and the first failing rank's error."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

# Where wrap_rank leaves a failed rank's error for its launcher (one JSON file per rank).
ERRORS_DIR_ENV = "KILN_RANK_ERRORS_DIR"
# Lines of a failed rank's output kept for the summary.
TAIL_LINES = 80
_PYTHONS = ("python", "python3", f"python{sys.version_info.major}.{sys.version_info.minor}")


class Layout:
    """The slots and hosts of this trial, from its cluster info; one local slot outside a cluster."""

    def __init__(self) -> None:
        from kiln._info import get_cluster_info, wire_cluster_info

        info = get_cluster_info()
        wire = wire_cluster_info()
        self.on_cluster = info is not None
        self.slots = max(len(info.slot_ids), 1) if info is not None else 1
        addrs = list(info.container_addrs) if info is not None else []
        self.nnodes = max(len(addrs), 1)
        self.node_rank = info.container_rank if info is not None else 0
        self.chief_ip = addrs[0] if addrs else "127.0.0.1"
        self.master_port = getattr(wire, "master_port", 0) if wire is not None else 0


def python_argv(argv: list[str]) -> list[str]:
    """``argv`` with a leading ``python``/``python3`` replaced by this interpreter (where kiln and torch live)."""
    if argv and argv[0] in _PYTHONS:
        return [sys.executable, *argv[1:]]
    return list(argv)


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """Determined's ``[OVERRIDES... --] SCRIPT...``: what goes to the launcher, and the script."""
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1:]
    return [], args


def wrapped(script: list[str]) -> list[str]:
    """The per-rank command: the script under wrap_rank, which reads its rank from the environment."""
    return [sys.executable, "-m", "kiln.launch.wrap_rank", "RANK", "--", *python_argv(script)]


def run_collecting_errors(argv: list[str], env: dict[str, str] | None = None,
                          strip: re.Pattern[bytes] | None = None) -> int:
    """Run a launcher; if it fails, print the first failing rank's error last, where a reader looks.

    Each rank's wrap_rank records its error tail with the time it failed; after the launcher's own summary
    (torchrun's box names the rank but not the error), the earliest failure is printed in full. ``strip``:
    what the launcher puts before its ranks' lines (removed, so each line starts with wrap_rank's ``[rank=N] ``,
    which ``kiln trial logs --rank`` and the worker's first-traceback finder read).
    """
    with tempfile.TemporaryDirectory(prefix="kiln-rank-errors-") as errors:
        child_env = dict(os.environ if env is None else env)
        child_env[ERRORS_DIR_ENV] = errors
        if strip is None:
            proc = subprocess.Popen(argv, env=child_env)
            pumps: list[threading.Thread] = []
        else:
            proc = subprocess.Popen(argv, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            pumps = [threading.Thread(target=strip_lines, args=(src, dst, strip), daemon=True)
                     for src, dst in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer))]
            for t in pumps:
                t.start()
        _forward_signals(proc)
        code = proc.wait()
        for t in pumps:
            t.join()
        if code != 0:
            report_first_failure(Path(errors))
        return code


def strip_lines(src: IO[bytes], dst: IO[bytes], prefix: re.Pattern[bytes]) -> None:
    """Copy ``src`` to ``dst`` line by line, without ``prefix`` where a line starts with it."""
    for line in iter(src.readline, b""):
        dst.write(prefix.sub(b"", line, count=1))
        dst.flush()


def report_first_failure(errors: Path) -> dict[str, Any] | None:
    """Print the error of the rank that failed first (to stderr); return its record."""
    records: list[dict[str, Any]] = []
    for path in errors.glob("rank-*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not records:
        return None
    first: dict[str, Any] = min(records, key=lambda r: float(r["failed_at"]))
    out = sys.stderr
    print(f"[kiln] rank {first['rank']} failed first (exit code {first['exit_code']}); its error:", file=out)
    for line in first["lines"]:
        print(f"[rank={first['rank']}] {line}", file=out)
    out.flush()
    return first


# What torch (``[rank1]: ``) and torchrun's --tee (``[default1]:``) put before a rank's lines.
_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")


def first_traceback(lines: list[str]) -> list[str]:
    """The first complete Python traceback in ``lines`` (header to exception line); else the last 20 lines."""
    bodies = [_RANK_PREFIX.sub("", line, count=1) for line in lines]
    for i, body in enumerate(bodies):
        if body.startswith("Traceback (most recent call last):"):
            for j in range(i + 1, len(bodies)):
                if bodies[j] and not bodies[j][0].isspace():
                    return bodies[i: j + 1]
            return bodies[i:]
    return bodies[-20:]


def _forward_signals(proc: subprocess.Popen[Any]) -> None:
    """The worker's SIGTERM (a polite stop) reaches the launcher, which passes it on to the ranks."""
    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)


def record_failure(rank: int, exit_code: int, lines: list[str], failed_at: float) -> None:
    """wrap_rank's side: leave this rank's error for the launcher, if one is listening."""
    where = os.environ.get(ERRORS_DIR_ENV)
    if not where:
        return
    record = {"rank": rank, "exit_code": exit_code, "failed_at": failed_at, "lines": first_traceback(lines)}
    tmp = Path(where) / f".rank-{rank}.json"
    try:
        tmp.write_text(json.dumps(record))
        tmp.replace(Path(where) / f"rank-{rank}.json")
    except OSError:
        pass


def free_port() -> int:
    """A port free on this host now (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def missing(what: str, how: str) -> int:
    """Say clearly that a launcher's framework is not installed; the exit code for it."""
    print(f"[kiln] {what} is not installed in this environment, so this launcher cannot start the ranks. "
          f"{how}", file=sys.stderr)
    return 2
