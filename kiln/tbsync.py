"""``kiln tensorboard start``: trials' TensorBoard files, synced from the store, served by TensorBoard on loopback.

Files come through the gateway (``/api/v1/trials/{id}/tensorboard/...``, owner or admin), so the CLI needs no
store credential. They are laid out as ``<logdir>/<experiment>/<trial>/<path>``, so each trial (and each
directory its code wrote under its TensorBoard path) is a TensorBoard run named ``<experiment>/<trial>[/...]``.
Event files only grow, so a sync fetches a grown file's new bytes and appends them (TensorBoard reads on from
where it was); a file that shrank is fetched again whole. The sync repeats every few seconds while experiments
run (new trials join), and a trial that had ended before a sync needs none after it (it uploads its last files
before it exits). TensorBoard itself (the ``tensorboard`` package) runs as a child process in its own session,
stopped with this command (Ctrl-C or SIGTERM; a second Ctrl-C stops at once).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from kiln.client import TERMINAL_STATES, APIError, Client
from schemas.trial import key_refusal

# How long TensorBoard may take to answer its first request.
START_TIMEOUT_S = 90.0
# TensorBoard rereads the log directory this often (seconds).
RELOAD_INTERVAL_S = 5
LOG_TAIL_LINES = 20


class BoardError(RuntimeError):
    """TensorBoard could not be started or stopped running; the message says why."""


class Fetch(NamedTuple):
    """Bytes of one remote file to fetch: from ``offset`` on, appended; from 0 with ``replace``, the whole file."""

    path: str
    offset: int
    size: int
    replace: bool


def plan(local: Mapping[str, int], remote: Iterable[tuple[str, int]]) -> tuple[list[Fetch], list[str]]:
    """What to fetch so the local copy (path -> size) matches the remote listing (path, size); and the remote
    paths refused because they would not stay inside the run directory (with why)."""
    fetches: list[Fetch] = []
    refused: list[str] = []
    for path, size in remote:
        if why := key_refusal(path):
            refused.append(f"{path!r}: {why}")
            continue
        have = local.get(path)
        if have is None or have > size:
            fetches.append(Fetch(path, 0, size, replace=True))
        elif have < size:
            fetches.append(Fetch(path, have, size, replace=False))
    return fetches, refused


def run_dir(logdir: Path, experiment_id: int, trial_id: int) -> Path:
    """Where a trial's files go: ``<logdir>/<experiment>/<trial>`` (its TensorBoard run name)."""
    return logdir / str(int(experiment_id)) / str(int(trial_id))


def local_sizes(root: Path) -> dict[str, int]:
    """The files under ``root`` (relative POSIX path -> size)."""
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


class Syncer:
    """Keeps ``logdir`` in step with the store for the given experiments' trials and the given trials."""

    def __init__(self, client: Client, logdir: Path, experiments: Iterable[int], trials: Iterable[int],
                 stop: threading.Event | None = None, warn: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.logdir = logdir
        self.experiments = list(dict.fromkeys(experiments))
        self.extra_trials = list(dict.fromkeys(trials))
        self.trials: dict[int, int] = {}  # trial id -> experiment id, every trial seen so far
        self._members: dict[int, set[int]] = {}  # experiment id -> its trials seen so far
        self._ended: set[int] = set()  # experiments seen ended (they get no new trials)
        self._done: set[int] = set()  # trials that had ended before a sync of theirs completed
        self._stop = stop or threading.Event()
        self._warn = warn or (lambda text: None)
        self._warned: set[str] = set()

    def _targets(self) -> dict[int, bool]:
        """Trials to sync this round -> whether they had ended when listed."""
        out: dict[int, bool] = {}
        for experiment_id in self.experiments:
            members = self._members.setdefault(experiment_id, set())
            if experiment_id in self._ended and members <= self._done:
                continue  # nothing of it can change any more
            experiment = self.client.get_experiment(experiment_id)  # read first: once ended, its trials all exist
            for trial in self.client.list_trials(experiment_id):
                self.trials[int(trial["id"])] = experiment_id
                members.add(int(trial["id"]))
                out[int(trial["id"])] = trial["state"] in TERMINAL_STATES
            if experiment["state"] in TERMINAL_STATES:
                self._ended.add(experiment_id)
        for trial_id in self.extra_trials:
            if trial_id in self._done:
                continue
            trial = self.client.get_trial(trial_id)
            self.trials[trial_id] = int(trial["experiment_id"])
            out[trial_id] = trial["state"] in TERMINAL_STATES
        return {t: ended for t, ended in out.items() if t not in self._done}

    def sync(self, strict: bool = False) -> int:
        """One round: fetch what is new; return the bytes fetched. ``strict``: an API error is raised (the
        first round: a trial one may not read stops the command); otherwise it is reported once and retried."""
        fetched = 0
        try:
            for trial_id, ended in sorted(self._targets().items()):
                if self._stop.is_set():
                    break
                try:
                    fetched += self._sync_trial(trial_id)
                except APIError as exc:
                    if strict:
                        raise
                    self._say(f"trial {trial_id}: {exc}")
                    continue
                if ended:
                    self._done.add(trial_id)
        except APIError as exc:
            if strict:
                raise
            self._say(f"sync: {exc}")
        return fetched

    def _sync_trial(self, trial_id: int) -> int:
        listing = self.client.tensorboard_files(trial_id)
        root = run_dir(self.logdir, int(listing["experiment_id"]), trial_id)
        remote = [(str(f["path"]), int(f["size"])) for f in listing["files"]]
        fetches, refused = plan(local_sizes(root), remote)
        for why in refused:
            self._say(f"trial {trial_id}: file skipped, {why}")
        if listing.get("truncated"):
            self._say(f"trial {trial_id}: more TensorBoard files than one listing holds; only the first are shown")
        got = 0
        for fetch in fetches:
            if self._stop.is_set():
                break
            try:
                got += self._fetch(trial_id, root, fetch)
            except OSError as exc:  # e.g. a path that is a file here and a directory there
                self._say(f"trial {trial_id}: {fetch.path} not written: {exc}")
        return got

    def _fetch(self, trial_id: int, root: Path, fetch: Fetch) -> int:
        target = root / fetch.path
        target.parent.mkdir(parents=True, exist_ok=True)
        offset = fetch.offset
        if fetch.replace:
            # Whole files appear at once (TensorBoard never sees half of a replaced one).
            part = target.with_name(f".{target.name}.part")
            with part.open("wb") as fh:
                offset = self._copy(trial_id, fetch.path, 0, fh)
            os.replace(part, target)
            return offset
        with target.open("ab") as fh:  # event files only grow: append what is new
            return self._copy(trial_id, fetch.path, offset, fh) - fetch.offset

    def _copy(self, trial_id: int, path: str, offset: int, fh: Any) -> int:
        """Write the remote file from ``offset`` to its current end into ``fh``; return the end offset."""
        while True:
            data, size = self.client.tensorboard_chunk(trial_id, path, offset)
            if not data:
                return offset
            fh.write(data)
            offset += len(data)
            if offset >= size:
                return offset

    def _say(self, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            self._warn(text)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (TensorBoard takes it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, be sent SIGTERM when the CLI dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_tensorboard(logdir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """TensorBoard on ``127.0.0.1:port`` over ``logdir``, its output in ``log_path``, in a session of its own."""
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
           "--port", str(port), "--reload_interval", str(RELOAD_INTERVAL_S)]
    with log_path.open("ab") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def _log_tail(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


def wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path, stop: threading.Event,
               timeout: float = START_TIMEOUT_S) -> bool:
    """Until TensorBoard answers at ``url`` (True) or ``stop`` is set (False); BoardError naming its exit and log
    tail if it stops first."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=5.0) as http:
        while time.monotonic() < deadline and not stop.is_set():
            if proc.poll() is not None:
                raise BoardError(f"TensorBoard exited with code {proc.returncode} before it served; its log:\n"
                                 f"{_log_tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(url + "data/environment").status_code == 200:
                    return True
            stop.wait(0.25)
    if stop.is_set():
        return False
    raise BoardError(f"TensorBoard did not answer at {url} within {timeout:.0f} s; its log:\n{_log_tail(log_path)}")


def stop_tensorboard(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; its whole session (TensorBoard's data server too)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def serve(client: Client, experiments: Iterable[int], trials: Iterable[int], *, port: int = 0,
          logdir: Path | None = None, sync_interval: float = 10.0,
          announce: Callable[[dict[str, Any]], None], warn: Callable[[str], None]) -> None:
    """Sync, start TensorBoard, ``announce`` its URL, keep syncing until SIGINT/SIGTERM, then stop it.

    Raises APIError when a trial cannot be read at the first sync, BoardError when TensorBoard does not start
    or exits by itself.
    """
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise BoardError("the tensorboard package is not installed here (pip install tensorboard==2.21.0)")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():  # the second Ctrl-C: no waiting for the round in progress
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    work = Path(tempfile.mkdtemp(prefix="kiln-tensorboard-"))
    runs = logdir if logdir is not None else work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    log_path = work / "tensorboard.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        syncer = Syncer(client, runs, experiments, trials, stop=stop, warn=warn)
        syncer.sync(strict=True)
        if stop.is_set():
            return
        port = port or free_port()
        url = f"http://127.0.0.1:{port}/"
        proc = start_tensorboard(runs, port, log_path)
        if not wait_ready(proc, url, log_path, stop):
            return
        announce({"url": url, "port": port, "logdir": str(runs), "pid": proc.pid,
                  "trials": sorted(syncer.trials)})
        while not stop.wait(sync_interval):
            syncer.sync()
            if proc.poll() is not None:
                raise BoardError(f"TensorBoard exited with code {proc.returncode}; its log:\n{_log_tail(log_path)}")
    except KeyboardInterrupt:
        pass
    finally:
        if proc is not None:
            stop_tensorboard(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(work, ignore_errors=True)
