"""Chaos: an adaptive ASHA experiment on three workers while services are killed and NATS and PostgreSQL go away.

Afterwards nothing acknowledged is lost or doubled: the experiment completed; every metric point a trial
recorded as acknowledged (its side file) is in the read model exactly once; each decision is in the audit
trail once; a replay rebuilds an equal read model; no trial restarted because of an outage (only the
trials on a killed worker restart).

The short form (one kill of each service, one NATS and one PostgreSQL outage, 8 trials) runs in
``just test``; ``just chaos`` (``KILN_CHAOS=full``) runs the long one: 24 trials, every service killed three
times, two workers killed, NATS away 10 s, PostgreSQL 15 s, and PostgreSQL again 15 s during a replay.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from deploy import parts, stack
from schemas import context
from schemas import events as ev
from schemas.subjects import dedupe_key
from tests.e2e.conftest import REPO, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

FULL = os.environ.get("KILN_CHAOS") == "full"
SERVICES = ("tracker", "searcher", "scheduler", "gateway")
MODEL = Path(__file__).parent / "model"


def _config(chaos_dir: Path) -> str:
    trials, max_time = (24, 27) if FULL else (8, 9)
    return f"""
name: chaos
entrypoint: python3 train.py
hyperparameters:
  lr: {{type: log, base: 10, minval: -4.0, maxval: 0.0}}
  slowness: {{type: double, minval: 0.0, maxval: 1.0}}
searcher:
  name: adaptive_asha
  metric: accuracy
  smaller_is_better: false
  time_metric: steps
  max_time: {max_time}
  max_trials: {trials}
  divisor: 3
  mode: aggressive
  max_concurrent_trials: 3
resources:
  slots_per_trial: 1
max_restarts: 3
environment:
  environment_variables:
    CHAOS_DIR: {chaos_dir}
    CHAOS_STEP_S: "{2.5 if FULL else 3.0}"
"""


@dataclass
class Fault:
    """One fault injected, and how long the system took to heal from it."""

    what: str
    at_s: float
    down_s: float = 0.0
    healed_s: float = 0.0
    during_experiment: bool = True


@dataclass
class Chaos:
    """Injects faults into a running stack and measures recovery."""

    s: Stack
    t0: float = field(default_factory=time.monotonic)
    faults: list[Fault] = field(default_factory=list)
    killed_workers: set[str] = field(default_factory=set)
    experiment_done: threading.Event = field(default_factory=threading.Event)

    def _status(self, name: str) -> stack.ProcessStatus | None:
        return next((p for p in stack.status(self.s.cfg) if p.name == name), None)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.s.cfg.master_url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait(self, cond: Any, what: str, timeout: float = 120.0) -> float:
        start = time.monotonic()
        while not cond():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{what}: not healed after {timeout:.0f} s")
            time.sleep(0.1)
        return time.monotonic() - start

    def kill(self, name: str) -> None:
        """kill -9 a service or worker; healed when the supervisor has it running again (and, for the
        gateway, serving)."""
        before = self._status(name)
        assert before is not None and before.pid is not None and before.alive, f"{name} is not running"
        fault = Fault(f"kill -9 {name}", time.monotonic() - self.t0,
                      during_experiment=not self.experiment_done.is_set())
        os.kill(before.pid, signal.SIGKILL)
        if name.startswith("worker-"):
            self.killed_workers.add(name)

        def back() -> bool:
            now = self._status(name)
            return bool(now and now.alive and now.pid != before.pid and now.state == "RUNNING"
                        and (name != "gateway" or self._healthy()))

        fault.healed_s = self._wait(back, fault.what)
        self.faults.append(fault)

    def outage(self, part: str, seconds: float, label: str = "") -> None:
        """kill -9 NATS or PostgreSQL, keep it down ``seconds``, start it again; healed when the gateway's
        health check passes again."""
        pid = parts.read_pid(self.s.cfg.state_dir, part)
        assert pid is not None and parts.pid_alive(pid), f"{part} is not running"
        fault = Fault(f"{part} down{label}", time.monotonic() - self.t0, down_s=seconds,
                      during_experiment=not self.experiment_done.is_set())
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        self._wait(lambda: not parts.pid_alive(pid), f"{part} to die", timeout=10)
        time.sleep(seconds)
        pcfg = stack.parts_config(self.s.cfg, self.s.creds)
        {"nats": parts.start_nats, "postgres": parts.start_postgres}[part](pcfg)
        fault.healed_s = self._wait(self._healthy, fault.what)
        self.faults.append(fault)

    def table(self) -> str:
        lines = [f"{'fault':<28} {'at s':>7} {'down s':>7} {'healed s':>9}  during experiment"]
        for f in self.faults:
            during = "yes" if f.during_experiment else "no"
            lines.append(f"{f.what:<28} {f.at_s:7.1f} {f.down_s:7.1f} {f.healed_s:9.1f}  {during}")
        return "\n".join(lines)


def _schedule(rng: random.Random) -> list[tuple[str, str, float]]:
    """(kind, target, seconds) in a seeded random order."""
    if not FULL:
        faults = [("kill", svc, 0.0) for svc in SERVICES] + [("outage", "nats", 8.0), ("outage", "postgres", 8.0)]
        rng.shuffle(faults)
        return faults
    faults = [("kill", svc, 0.0) for svc in SERVICES for _ in range(3)]
    faults += [("kill", "worker", 0.0), ("kill", "worker", 0.0)]  # a worker running a trial, chosen then
    faults += [("outage", "nats", 10.0), ("outage", "postgres", 15.0)]
    rng.shuffle(faults)
    return faults


def _get(s: Stack, path: str, **params: Any) -> Any:
    """GET through outages: retried until the gateway answers 200."""
    deadline = time.monotonic() + 120
    while True:
        try:
            resp = s.http.get(f"{s.cfg.master_url}{path}", params=params, timeout=10)
            if resp.status_code == 200:
                return resp.json()
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"GET {path} kept failing"
        time.sleep(0.5)


def _sent(chaos_dir: Path) -> dict[int, set[tuple[str, int]]]:
    """What each trial recorded as acknowledged: trial id → {(kind, step)}."""
    out: dict[int, set[tuple[str, int]]] = {}
    for path in chaos_dir.glob("trial-*.jsonl"):
        trial = int(path.stem.split("-")[1])
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[trial] = {(r["kind"], r["step"]) for r in rows}
    return out


async def _stored(dsn: str, trials: list[int]) -> dict[int, collections.Counter[tuple[str, int]]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT trial_id, kind, step FROM metric_points WHERE trial_id = ANY($1::bigint[])"
                                " AND name IN ('loss', 'accuracy')", trials)
    finally:
        await conn.close()
    out: dict[int, collections.Counter[tuple[str, int]]] = {t: collections.Counter() for t in trials}
    for r in rows:
        out[r["trial_id"]][(r["kind"], r["step"])] += 1
    return out


def _replay(s: Stack) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kiln.cli", "events", "replay", "--verify", "--state-dir",
                             str(s.cfg.state_dir)], cwd=REPO, env=s.env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


@pytest.mark.timeout(2400 if FULL else 900)
async def test_nothing_acknowledged_is_lost_through_kills_and_outages(chaos_stack: Stack) -> None:
    s = chaos_stack
    seed = int(os.environ.get("KILN_CHAOS_SEED", str(random.randrange(1 << 30))))
    print(f"\nchaos seed {seed} ({'full' if FULL else 'short'})")
    rng = random.Random(seed)
    chaos_dir = Path(tempfile.mkdtemp(prefix="kiln-chaos-trials-"))
    chaos_dir.chmod(0o777)
    created = s.http.post(f"{s.cfg.master_url}/api/v1/experiments", data={"config": _config(chaos_dir)},
                          files={"context": ("c.tar.gz", context.pack(MODEL), "application/gzip")}, timeout=60)
    assert created.status_code == 201, created.text
    exp_id = created.json()["id"]
    chaos = Chaos(s)

    def running() -> bool:
        exp = _get(s, f"/api/v1/experiments/{exp_id}")
        return any(t.get("state") == "RUNNING" for t in _get(s, f"/api/v1/experiments/{exp_id}/trials")) \
            if exp["state"] == "ACTIVE" else False

    chaos._wait(running, "a trial running", timeout=120)

    def watch() -> None:
        while _get(s, f"/api/v1/experiments/{exp_id}")["state"] not in ("COMPLETED", "CANCELED", "ERROR"):
            time.sleep(1.0)
        chaos.experiment_done.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for kind, target, seconds in _schedule(rng):
        time.sleep(rng.uniform(0.5, 2.0))
        if target == "worker":
            busy = sorted({t["worker_id"] for t in _get(s, f"/api/v1/experiments/{exp_id}/trials")
                           if t.get("state") == "RUNNING" and t.get("worker_id")})
            target = rng.choice(busy) if busy else "worker-1"
        if kind == "kill":
            chaos.kill(target)
        else:
            chaos.outage(target, seconds)
    watcher.join(timeout=1500 if FULL else 600)
    exp = _get(s, f"/api/v1/experiments/{exp_id}")
    print(chaos.table())
    assert exp["state"] == "COMPLETED", exp
    # Every fault hit a running experiment (the trials are slow enough for that on purpose).
    assert all(f.during_experiment for f in chaos.faults), chaos.table()

    # A replay, with PostgreSQL killed under it in the full run: it waits the outage out and verifies equal.
    replay = _replay(s)
    if FULL:
        time.sleep(1.0)
        chaos.outage("postgres", 15.0, label=" (replay)")
    out, _ = replay.communicate(timeout=600)
    assert replay.returncode == 0, out
    assert "reproducible (every table equal)" in out, out
    if FULL:
        print(chaos.table())  # again, with the outage under the replay

    # Every acknowledged point is in the read model exactly once.
    sent = _sent(chaos_dir)
    trials = [t["id"] for t in _get(s, f"/api/v1/experiments/{exp_id}/trials")]
    assert len(trials) == (24 if FULL else 8)
    stored = await _stored(s.pg_dsn, trials)
    table = [f"{'trial':>6} {'sent':>6} {'stored':>7} {'missing':>8} {'doubled':>8}"]
    for t in sorted(trials):
        mine = sent.get(t, set())
        missing = [k for k in mine if stored[t][k] == 0]
        doubled = [k for k, n in stored[t].items() if n > 1]
        table.append(f"{t:>6} {len(mine):>6} {sum(stored[t].values()):>7} {len(missing):>8} {len(doubled):>8}")
        assert not missing and not doubled, (t, missing[:5], doubled[:5])
    print("\n".join(table))
    print(f"points sent {sum(len(v) for v in sent.values())}, stored {sum(sum(c.values()) for c in stored.values())}")

    # Each trial's validation steps once, and each decision once in the audit trail.
    trail = _get(s, f"/api/v1/experiments/{exp_id}/events")
    events = [msgspec.convert({**e["event"], "type": e["type"]}, ev.DomainEvent) for e in trail]
    keys = collections.Counter(dedupe_key(e) for e in events)
    assert [k for k, n in keys.items() if n > 1] == []
    # Once per run: a run restarted from an older checkpoint reports the steps after it again (the read model
    # keeps one per step, checked below).
    validations = collections.Counter((e.trial_id, e.steps_completed, e.allocation_id) for e in events
                                      if isinstance(e, ev.ValidationReported))
    assert all(n == 1 for n in validations.values())
    for t in trials:
        steps = [p["steps_completed"] for p in _get(s, f"/api/v1/trials/{t}/metrics", kind="validation")]
        assert steps == sorted(set(steps)), (t, steps)

    # No trial restarted because of an outage: every allocation that did not end cleanly ran on a worker
    # that was killed.
    for t in trials:
        detail = _get(s, f"/api/v1/trials/{t}")
        for alloc in detail["allocations"]:
            if alloc["exit_code"] != 0:
                assert alloc["worker_id"] in chaos.killed_workers, (t, alloc)
        if detail["restarts"]:
            assert any(a["worker_id"] in chaos.killed_workers for a in detail["allocations"]), detail
