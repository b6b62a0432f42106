"""Ingest benchmark: metric points through NATS into the tracker and Postgres, side by side with MLflow.

One invocation, one machine, everything side by side, so the numbers compare under the same load:

1. A Kiln stack on free ports with a few multi-slot workers. The real path: an experiment submitted
   through the gateway whose N trials (real trial processes started by the real workers, ``bench_train.py``)
   report their points through ``kiln.core`` as fast as they can: TrialBus -> the allocation's Unix
   socket -> the worker's link and SQLite outbox -> JetStream -> tracker -> Postgres. The clock starts
   when every trial is ready and told to go and stops when Postgres shows every point; on the way it
   notes when the trials finished reporting, when every batch was in the workers' outboxes and when
   the metrics stream held every message.
   After the real-path repetitions the searcher and scheduler are stopped (so they neither react to
   the synthetic experiments below nor compete for the CPU) and the old direct path is measured on the
   same shape for comparison: simulated trials publish ``TrainingMetricsReported`` straight to
   JetStream on the admin credential (``Bench.bus``), as this benchmark did before trials lost theirs.
2. The same points, in the same repetition, into the physical limit: raw asyncpg
   ``copy_records_to_table`` into a copy of ``metric_points`` (same columns, same primary key).
3. The same points from the same number of clients into an MLflow tracking server (separate venv,
   Postgres backend store in the same Postgres, ``MlflowClient.log_batch``), on a time budget.
   Repetitions rotate the order of 1-3; medians and ranges are reported.
4. Publish -> queryable latency at the Core API's own cadence (each trial one 500-step batch a second).
5. Gateway queries: a 100k-point series downsampled to 1,000 points, and the 1,000-trial summary.
6. Replay of every stream into a fresh schema with --verify.

A *point* is one (metric name, step, value) of one trial: one ``metric_points`` row, one MLflow
``Metric``. Usage: .venv/bin/python benchmarks/ingest/run.py [--reps 3] [--trials 8] [--batches 96] [--profile DIR]
(``just bench-ingest`` first makes MLflow's venv, benchmarks/ingest/.venv-mlflow).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import workload  # noqa: E402

from deploy import parts, stack, supervise  # noqa: E402
from deploy.ports import free_port_block  # noqa: E402
from schemas import events as ev  # noqa: E402
from services.runtime import Bus, BusSettings, connect_bus  # noqa: E402

POLL_S = 0.02  # how often the read model is sampled for freshly visible batches
# How often nats-server's /jsz is sampled on the real path: it serialises every stream's state, which cost
# nats-server and this script ~2 µs per point at 20 ms; the "in the stream" stage is this coarse.
JS_POLL_S = 0.25
TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))] if s else float("nan")


def med_range(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """'median (min–max)'."""
    if not values:
        return "n/a"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def tree(pid: int | None) -> list[int]:
    """A process and all its descendants."""
    if pid is None:
        return []
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def cpu_of(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds (user + system) each live pid has used."""
    out = {}
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[p] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every process, ours or not)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK  # all but idle and iowait


class CpuMeter:
    """CPU seconds used by named process trees between start() and stop(), and by the whole machine.

    A process that exits in between (a short-lived Postgres backend) is not counted in its group;
    "machine" counts everything, including other users of this shared machine.
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.before: dict[str, dict[int, float]] = {}
        self.busy = 0.0

    def start(self) -> None:
        self.before = {name: cpu_of(f()) for name, f in self.groups.items()}
        self.busy = machine_busy()

    def stop(self) -> dict[str, float]:
        out = {}
        for name, f in self.groups.items():
            now, was = cpu_of(f()), self.before.get(name, {})
            out[name] = sum(v - was.get(p, 0.0) for p, v in now.items())
        out["machine"] = machine_busy() - self.busy
        return out


def fmt_cpu(cpu: dict[str, float], seconds: float) -> str:
    return ", ".join(f"{k} {v / seconds:.2f}" for k, v in cpu.items()) + " cores"


# ---------------------------------------------------------------------------------------------
# The stack and the MLflow server
# ---------------------------------------------------------------------------------------------


def _repo_relative(value: Any) -> Any:
    """A path inside the repository, recorded relative to it: a saved run names no machine's directories."""
    if isinstance(value, str) and os.path.isabs(value) and Path(value).is_relative_to(REPO):
        return str(Path(value).relative_to(REPO))
    return value


class Bench:
    """A running Kiln stack (plus MLflow server) and what the phases share."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state = Path(tempfile.mkdtemp(prefix="kiln-ingest-"))
        self.state.chmod(0o755)  # the unprivileged postgres user must reach its data dir inside
        base = free_port_block(16)
        self.cfg = stack.StackConfig.load(
            self.state, nats_port=base, nats_monitor_port=base + 1, pg_port=base + 2, s3_port=base + 3,
            http_port=base + 4, s3_ports_base=base + 5, workers=args.workers, slots_per_worker=args.slots_per_worker,
        )
        self.mlflow_port = base + 15
        self.mlflow: subprocess.Popen[bytes] | None = None
        self.creds: stack.Credentials
        self.next_trial = 1_000_000  # synthetic trials' ids stay clear of the real experiments' trials
        self._headers: dict[str, str] | None = None
        self.results: dict[str, Any] = {"args": {k: _repo_relative(v) for k, v in vars(args).items()}}

    @property
    def dsn(self) -> str:
        return f"postgresql://kiln:{self.creds.pg_password}@{self.cfg.host}:{self.cfg.pg_port}/kiln"

    def up(self) -> None:
        info = stack.up(self.cfg)
        self.creds = stack.Credentials.load_or_create(self.cfg.state_dir)
        print(f"stack up in {info.seconds:.1f}s on {self.cfg.master_url} ({self.cfg.workers} workers ×"
              f" {self.cfg.slots_per_worker} slots)", flush=True)

    def stop_deciders(self) -> None:
        """Stop the searcher and scheduler (through supervisord, which would restart a killed one): the
        synthetic experiments of the later phases are not for them."""
        stopped = supervise.Supervisor(supervise.Paths.of(self.cfg.state_dir)).stop(["searcher", "scheduler"])
        print(f"stopped {', '.join(stopped) or 'nothing'} for the synthetic phases", flush=True)

    def admin_headers(self) -> dict[str, str]:
        """The stack admin's bearer header, or none where the gateway has no sign-in (older gateways)."""
        if self._headers is None:
            resp = httpx.post(f"{self.cfg.master_url}/api/v1/auth/login", timeout=30,
                              json={"username": "admin", "password": self.creds.admin_password})
            if resp.status_code in (404, 405):
                self._headers = {}
            else:
                self._headers = {"Authorization": f"Bearer {resp.raise_for_status().json()['token']}"}
        return self._headers

    def pid(self, name: str) -> int | None:
        return parts.read_pid(self.cfg.state_dir, name)

    def down(self) -> None:
        if self.mlflow is not None and self.mlflow.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.mlflow.pid, signal.SIGTERM)
            try:
                self.mlflow.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.mlflow.pid, signal.SIGKILL)
                self.mlflow.wait(5)
        stack.down(self.cfg)
        if not self.args.keep_state:
            shutil.rmtree(self.state, ignore_errors=True)

    async def start_mlflow(self) -> None:
        """``CREATE DATABASE mlflow OWNER kiln`` (the kiln role cannot create databases, so as the
        cluster's superuser over its trust-authenticated Unix socket), then ``mlflow server`` on it."""
        data_dir = parts.postgres_data_dir(stack.parts_config(self.cfg, self.creds))
        su = await asyncpg.connect(host=str(data_dir), port=self.cfg.pg_port, user=parts.PG_SUPERUSER,
                                   database="postgres")
        try:
            await su.execute("CREATE DATABASE mlflow OWNER kiln")
        finally:
            await su.close()
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; name the psycopg2 driver installed beside mlflow.
        uri = f"postgresql+psycopg2://kiln:{self.creds.pg_password}@{self.cfg.host}:{self.cfg.pg_port}/mlflow"
        log = (self.state / "logs" / "mlflow.log").open("ab")
        mlflow_bin = str(Path(self.args.mlflow_python).parent / "mlflow")
        # The default pool (5 + 10 overflow per worker) times out under 64 concurrent clients; give each
        # worker enough connections for its share of the clients.
        per_worker = -(-self.args.trials // self.args.mlflow_workers)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
        env.update(MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=str(max(5, per_worker)), MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW="4")
        self.mlflow = subprocess.Popen(
            [mlflow_bin, "server", "--backend-store-uri", uri, "--host", self.cfg.host, "--port",
             str(self.mlflow_port), "--workers", str(self.args.mlflow_workers),
             "--default-artifact-root", f"file://{self.state}/mlartifacts", "--no-serve-artifacts"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=self.state, env=env,
        )
        started = time.monotonic()
        while time.monotonic() - started < 240:
            if self.mlflow.poll() is not None:
                tail = (self.state / "logs" / "mlflow.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"mlflow server exited:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=1) as resp:
                    if resp.status == 200:
                        print(f"mlflow server up in {time.monotonic() - started:.1f}s", flush=True)
                        return
            except OSError:
                pass
            await asyncio.sleep(0.5)
        raise RuntimeError("mlflow server did not come up")

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.cfg.host}:{self.mlflow_port}"

    def profile(self, name: str, label: str) -> subprocess.Popen[bytes] | None:
        """``py-spy record`` of a stack process into --profile DIR (collapsed stacks), if asked."""
        pid = self.pid(name)
        if not self.args.profile or pid is None:
            return None
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen([str(REPO / ".venv" / "bin" / "py-spy"), "record", "--pid", str(pid), "--rate", "200",
                                 "--format", "raw", "--nonblocking", "-o", str(out / f"{label}.txt")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    def stop_profile(spy: subprocess.Popen[bytes] | None) -> None:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)

    def trial_ids(self, n: int) -> list[int]:
        ids = list(range(self.next_trial, self.next_trial + n))
        self.next_trial += n
        return ids

    def bus(self, name: str) -> contextlib.AbstractAsyncContextManager[Bus]:
        """The admin's bus, for the synthetic phases only (direct publish, paced, queries).

        The stack has no ``trial`` NATS user (a trial speaks to its worker over services/worker/link.py and
        the worker publishes from its outbox); the headline Kiln number takes that real path
        (``kiln_real_ingest``). These phases publish simulated trials' batches, and the gateway's and
        searcher's events of their synthetic experiments, straight to JetStream on the admin credential:
        the old direct path, kept as the comparison for what the link -> outbox hop costs.
        """
        settings = BusSettings(nats_url=f"nats://{self.cfg.host}:{self.cfg.nats_port}", nats_user="admin",
                               nats_password=self.creds.nats["admin"])
        return connect_bus(settings, name, ensure=False)


# ---------------------------------------------------------------------------------------------
# Domain events for the synthetic experiments (published like the gateway and searcher would)
# ---------------------------------------------------------------------------------------------


async def create_experiment(bench: Bench, bus: Bus, conn: Any, name: str, trial_ids: list[int]) -> int:
    """ExperimentSubmitted + one TrialCreated per trial, through the bus; return the experiment id."""
    exp_id = await conn.fetchval("SELECT nextval('experiment_ids')")
    config = {"name": name, "entrypoint": "python3 train.py",
              "searcher": {"name": "random", "metric": "val_loss", "smaller_is_better": True,
                           "max_trials": len(trial_ids), "max_length": 1000},
              "hyperparameters": {"lr": {"type": "log", "minval": -5, "maxval": -1, "base": 10},
                                  "layers": {"type": "int", "minval": 1, "maxval": 8}},
              "resources": {"slots_per_trial": 1}}
    await bus.publish(ev.ExperimentSubmitted(experiment_id=exp_id, config=config, config_yaml=json.dumps(config),
                                             context_digest="0" * 64, context_size=0, seed=1,
                                             submitted_at=workload.T0))
    rng = random.Random(exp_id)
    sem = asyncio.Semaphore(64)

    async def one(k: int, tid: int) -> None:
        async with sem:
            await bus.publish(ev.TrialCreated(experiment_id=exp_id, trial_id=tid, request_id=k + 1,
                                              hparams={"lr": 10 ** rng.uniform(-5, -1), "layers": rng.randint(1, 8)},
                                              seed=k, max_length=1000))

    await asyncio.gather(*(one(k, t) for k, t in enumerate(trial_ids)))
    return exp_id


# ---------------------------------------------------------------------------------------------
# Kiln ingest
# ---------------------------------------------------------------------------------------------


def metric_events(exp_id: int, tid: int, index: int, batches: int, steps: int) -> list[ev.TrainingMetricsReported]:
    return [
        ev.TrainingMetricsReported(
            experiment_id=exp_id, trial_id=tid, batch_id=f"bench-{tid}:{b}",
            points=[ev.MetricPoint(steps_completed=s, metrics=m, reported_at=at)
                    for s, m, at in workload.batch(index, b, steps)],
        )
        for b in range(batches)
    ]


async def kiln_ingest(bench: Bench, buses: list[Bus], conn: Any, exp_id: int, trials: list[int], batches: int,
                      steps: int, pace_s: float | None = None) -> dict[str, Any]:
    """Publish every batch of every trial; return rate, latencies and CPU.

    ``pace_s`` None: each trial publishes its next batch as soon as JetStream acked the previous one
    (saturation). Otherwise each trial publishes one batch every ``pace_s`` from a random phase.
    A batch is *queryable* when ``metric_summaries`` (written in the same transaction as its points)
    shows its last step; the read model is sampled every POLL_S by one query for all trials.
    """
    events = {tid: metric_events(exp_id, tid, i, batches, steps) for i, tid in enumerate(trials)}
    n_points = workload.total_points(len(trials), batches, steps)
    last_step = [(b + 1) * steps - 1 for b in range(batches)]
    published: dict[tuple[int, int], float] = {}
    visible: dict[tuple[int, int], float] = {}
    pub_done: list[float] = []
    rng = random.Random(len(trials) * 1000 + batches)
    offsets = {tid: rng.uniform(0, pace_s or 0.0) for tid in trials}

    async def trial(k: int, tid: int, t0: float) -> None:
        bus = buses[k % len(buses)]
        for b, e in enumerate(events[tid]):
            if pace_s is not None:
                delay = t0 + offsets[tid] + b * pace_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            published[(tid, b)] = time.perf_counter()
            await bus.publish(e)
        pub_done.append(time.perf_counter())

    async def poll() -> None:
        nxt = {tid: 0 for tid in trials}
        while len(visible) < len(trials) * batches:
            rows = await conn.fetch(
                "SELECT trial_id, min(last_step) AS s FROM metric_summaries WHERE kind = 'training'"
                " AND trial_id = ANY($1::bigint[]) GROUP BY trial_id", trials)
            now = time.perf_counter()
            for r in rows:
                tid = r["trial_id"]
                while nxt[tid] < batches and r["s"] >= last_step[nxt[tid]]:
                    visible[(tid, nxt[tid])] = now
                    nxt[tid] += 1
            await asyncio.sleep(POLL_S)

    meter = cpu_meter(bench)
    spy = bench.profile("tracker", f"tracker-{len(trials)}x{batches}-{'paced' if pace_s else 'saturated'}")
    meter.start()
    t0 = time.perf_counter()
    await asyncio.gather(poll(), *(trial(k, tid, t0) for k, tid in enumerate(trials)))
    t_end = max(visible.values())
    cpu = meter.stop()
    bench.stop_profile(spy)
    stored = await conn.fetchval("SELECT count(*) FROM metric_points WHERE trial_id = ANY($1::bigint[])", trials)
    if stored != n_points:
        raise RuntimeError(f"expected {n_points} points, metric_points holds {stored}")
    lat = [visible[k] - published[k] for k in published]
    return {"points": n_points, "seconds": t_end - t0, "rate": n_points / (t_end - t0),
            "publish_rate": n_points / (max(pub_done) - t0),
            "lat_p50": pct(lat, 0.5), "lat_p95": pct(lat, 0.95), "lat_max": max(lat), "cpu": cpu,
            "cpu_seconds": t_end - t0}


# The real path: an experiment through the gateway, run by the stack's workers (bench_train.py).

TRIAL_FILES = ("bench_train.py", "workload.py")


def real_config(name: str, trials: int, batches: int, steps: int, sync_dir: Path) -> str:
    """Grid over the workload's trial numbers: one trial per index, all of them at once."""
    return json.dumps({  # JSON is YAML
        "name": name, "entrypoint": "python3 bench_train.py",
        "hyperparameters": {"index": {"type": "categorical", "vals": list(range(trials))},
                            "batches": batches, "steps": steps, "sync_dir": str(sync_dir)},
        "searcher": {"name": "grid", "metric": "loss", "smaller_is_better": True,
                     "max_length": {"batches": batches * steps}, "max_concurrent_trials": trials},
        "resources": {"slots_per_trial": 1}, "max_restarts": 0,
    })


async def jetstream_messages(http: httpx.AsyncClient, stream: str) -> int:
    """Messages the stream holds now (nats-server's monitoring endpoint)."""
    data = (await http.get("/jsz", params={"streams": "true"})).raise_for_status().json()
    for account in data.get("account_details", []):
        for st in account.get("stream_detail", []) or []:
            if st["name"] == stream:
                return int(st["state"]["messages"])
    return 0


async def kiln_real_ingest(bench: Bench, conn: Any, label: str, trials: int, batches: int,
                           steps: int) -> dict[str, Any]:
    """Submit the workload as an experiment and time its points from the trials' first report to Postgres.

    Every trial process starts, builds its points and writes ``ready-<i>``; the clock starts when this
    writes ``go``. Stages, each the time from ``go`` until the last trial/batch passed it: the trials'
    ``report_training_metrics`` calls returned; the worker stored every batch in its outbox (the trials'
    core context closed, which waits for that); the metrics stream held every batch; Postgres showed
    every point (``metric_summaries``, sampled every POLL_S).
    """
    from schemas import context as code_context
    from schemas import subjects

    work = bench.state / f"real-{label}"
    sync, ctx = work / "sync", work / "context"
    sync.mkdir(parents=True)
    ctx.mkdir()
    for d in (work, sync):  # trials run as the worker's unprivileged trial user
        d.chmod(0o777)
    for f in TRIAL_FILES:
        shutil.copy(HERE / f, ctx / f)
    cfg_yaml = real_config(f"ingest-{label}", trials, batches, steps, sync)
    n_points = workload.total_points(trials, batches, steps)
    t_submit = time.perf_counter()
    async with httpx.AsyncClient(base_url=bench.cfg.master_url, timeout=60, headers=bench.admin_headers()) as http:
        resp = await http.post("/api/v1/experiments", data={"config": cfg_yaml},
                               files={"context": ("context.tar.gz", code_context.pack(ctx), "application/gzip")})
        if resp.status_code >= 400:
            raise RuntimeError(f"gateway refused the experiment: {resp.status_code} {resp.text[:500]}")
        exp_id = int(resp.json()["id"])
        deadline = time.perf_counter() + 300
        while len(list(sync.glob("ready-*"))) < trials:
            if time.perf_counter() > deadline:
                exp = (await http.get(f"/api/v1/experiments/{exp_id}")).json()
                raise RuntimeError(f"only {len(list(sync.glob('ready-*')))} of {trials} trials ready after 300 s:"
                                   f" {exp}")
            await asyncio.sleep(0.05)
    ready = {int(f.name.split("-")[1]): json.loads(f.read_text()) for f in sync.glob("ready-*")}
    trial_ids = [ready[i]["trial_id"] for i in range(trials)]
    startup_s = time.perf_counter() - t_submit
    last = batches * steps - 1
    stream = subjects.METRICS.name
    mon = httpx.AsyncClient(base_url=f"http://{bench.cfg.host}:{bench.cfg.nats_monitor_port}", timeout=10)
    js_before = await jetstream_messages(mon, stream)
    js_samples: list[tuple[float, int]] = []
    pg_samples: list[tuple[float, int]] = []
    meter = cpu_meter(bench)
    spies = [bench.profile(name, f"{name}-real-{label}")
             for name in ("tracker", *(f"worker-{i}" for i in range(bench.cfg.workers)))]
    done_pg = asyncio.Event()

    async def poll_js() -> None:
        while not done_pg.is_set():
            js_samples.append((time.time(), await jetstream_messages(mon, stream) - js_before))
            await asyncio.sleep(JS_POLL_S)

    meter.start()
    t0 = time.time()
    (sync / "go").write_text("go")
    js_task = asyncio.create_task(poll_js())
    try:
        while True:
            # Trials fully queryable, and points queryable so far (steps through each series' last step).
            got, seen = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE s >= $2), coalesce(sum(n), 0) FROM"
                " (SELECT trial_id, min(last_step) AS s, sum(last_step + 1) AS n FROM metric_summaries"
                " WHERE kind = 'training' AND trial_id = ANY($1::bigint[])"
                " GROUP BY trial_id) t", trial_ids, last)
            pg_samples.append((time.time(), int(seen)))
            if got == trials:
                break
            if time.time() - t0 > 600:
                raise RuntimeError(f"only {got} of {trials} trials fully queryable after 600 s")
            await asyncio.sleep(POLL_S)
        t_end = time.time()
        cpu = meter.stop()
    finally:
        done_pg.set()
        await js_task
        for spy in spies:
            bench.stop_profile(spy)
    js_final = await jetstream_messages(mon, stream) - js_before
    await mon.aclose()
    t_js = next(t for t, n in js_samples if n >= js_final) if js_samples else t_end
    deadline = time.time() + 60
    while len(list(sync.glob("done-*"))) < trials and time.time() < deadline:
        await asyncio.sleep(0.05)
    done = [json.loads(f.read_text()) for f in sync.glob("done-*")]
    if len(done) < trials:
        raise RuntimeError(f"only {len(done)} of {trials} trials wrote their timings")
    stored = await conn.fetchval("SELECT count(*) FROM metric_points WHERE trial_id = ANY($1::bigint[])", trial_ids)
    if stored != n_points:
        raise RuntimeError(f"expected {n_points} points, metric_points holds {stored}")
    cpu["trials"] = sum(d["cpu"] for d in done)
    # How far the tracker was when the metrics stream held every batch, and its rate on the rest (a backlog).
    at_js = max((n for t, n in pg_samples if t <= t_js), default=0)
    seconds = t_end - t0
    t_rep = max(d["t_reported"] for d in done) - t0
    t_out = max(d["t_stored"] for d in done) - t0
    return {
        "points": n_points, "experiment_id": exp_id, "trial_ids": trial_ids, "startup_s": startup_s,
        "seconds": seconds, "rate": n_points / seconds,
        "stages": {"reported": t_rep, "outbox": t_out, "jetstream": t_js - t0, "postgres": seconds},
        "stage_rates": {"reported": n_points / t_rep, "outbox": n_points / t_out,
                        "jetstream": n_points / max(t_js - t0, 1e-9), "postgres": n_points / seconds},
        "trial_report_rates": [d["points"] / (d["t_reported"] - d["t_go"]) for d in done],
        "queryable_at_jetstream": at_js / n_points,
        "tracker_backlog_rate": (n_points - at_js) / max(t_end - t_js, 1e-9),
        "tracker_cpu_us_per_point": (cpu["tracker"] + cpu["postgres"]) / n_points * 1e6,
        "go_skew_s": max(d["t_go"] for d in done) - min(d["t_go"] for d in done),
        "messages": js_final, "cpu": cpu, "cpu_seconds": seconds,
    }


async def gateway_check(bench: Bench, trials: list[int], indices: list[int], batches: int, steps: int) -> None:
    """Every trial's metrics, as the gateway serves them, end at the last step published."""
    async with httpx.AsyncClient(base_url=bench.cfg.master_url, timeout=30, headers=bench.admin_headers()) as http:
        for tid, i in zip(trials, indices, strict=True):
            rows = (await http.get(f"/api/v1/trials/{tid}/metric-names")).raise_for_status().json()
            got = {r["name"]: r["last_step"] for r in rows if r["kind"] == "training"}
            want = {n: batches * steps - 1 for n in workload.names_of(i)}
            if got != want:
                raise RuntimeError(f"gateway shows {got} for trial {tid}, expected {want}")


def cpu_meter(bench: Bench) -> CpuMeter:
    me = os.getpid()
    return CpuMeter({
        "tracker": lambda: tree(bench.pid("tracker")),
        "postgres": lambda: tree(bench.pid("postgres")),
        "nats": lambda: tree(bench.pid("nats")),
        "gateway": lambda: tree(bench.pid("gateway")),
        "searcher+scheduler": lambda: [p for n in ("searcher", "scheduler") if (p := bench.pid(n)) is not None],
        # The workers alone; their trial processes exit before the meter stops, so each trial meters its own
        # CPU (``trials``, added by kiln_real_ingest).
        "workers": lambda: [p for i in range(bench.cfg.workers) if (p := bench.pid(f"worker-{i}")) is not None],
        "bench": lambda: [me],
    })


# ---------------------------------------------------------------------------------------------
# Raw COPY: the physical limit
# ---------------------------------------------------------------------------------------------


def raw_rows(trials: list[int], batches: int, steps: int) -> list[list[tuple[Any, ...]]]:
    """The same rows the tracker writes, grouped like the tracker's fetches (256 messages, stream order)."""
    msgs = []
    for b in range(batches):
        for i, tid in enumerate(trials):
            msgs.append([(tid, "training", n, s, v, None, dt.datetime.fromtimestamp(at, tz=dt.UTC))
                         for n, s, v, at in workload.points(i, b, steps)])
    return [[r for m in msgs[k:k + 256] for r in m] for k in range(0, len(msgs), 256)]


async def raw_copy(bench: Bench, conn: Any, trials: list[int], batches: int, steps: int) -> dict[str, Any]:
    """COPY the rows into bench_raw.metric_points (same columns and primary key), one transaction per
    256-message chunk, on one connection like the tracker's one metrics consumer."""
    chunks = raw_rows(trials, batches, steps)
    n = sum(len(c) for c in chunks)
    meter = cpu_meter(bench)
    meter.start()
    t0 = time.perf_counter()
    for chunk in chunks:
        await conn.copy_records_to_table("metric_points", schema_name="bench_raw", records=chunk,
                                         columns=["trial_id", "kind", "name", "step", "value", "text_value",
                                                  "reported_at"])
    seconds = time.perf_counter() - t0
    return {"points": n, "seconds": seconds, "rate": n / seconds, "cpu": meter.stop(), "cpu_seconds": seconds}


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------


async def mlflow_ingest(bench: Bench, rep: int, trials: int, batches: int, steps: int) -> dict[str, Any]:
    """The same points from the same number of clients (one thread per run, spread over processes)."""
    py = bench.args.mlflow_python
    script = str(HERE / "mlflow_clients.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["MLFLOW_HTTP_POOL_MAXSIZE"] = "64"
    setup = subprocess.run([py, script, "setup", bench.mlflow_uri, f"ingest-rep{rep}", str(trials)],
                           capture_output=True, text=True, env=env, check=True)
    info = json.loads(setup.stdout.strip().splitlines()[-1])
    runs_file = bench.state / f"mlflow-runs-{rep}.json"
    runs_file.write_text(json.dumps(info))
    procs = bench.args.mlflow_procs
    groups = [list(range(p, trials, procs)) for p in range(procs)]
    clients = [subprocess.Popen([py, script, "log", bench.mlflow_uri, str(runs_file), ",".join(map(str, g)),
                                 str(batches), str(steps)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env) for g in groups if g]
    try:
        for c in clients:
            assert c.stdout is not None
            line = await asyncio.to_thread(c.stdout.readline)
            if line.strip() != "ready":
                raise RuntimeError(f"mlflow client said {line!r}")
        meter = CpuMeter({
            "mlflow server": lambda: tree(bench.mlflow.pid if bench.mlflow else None),
            "postgres": lambda: tree(bench.pid("postgres")),
        })
        meter.start()
        t0 = time.time()
        deadline = t0 + bench.args.mlflow_budget_s
        for c in clients:
            assert c.stdin is not None
            c.stdin.write(f"go {deadline}\n")
            c.stdin.flush()
        outs = await asyncio.gather(*(asyncio.to_thread(c.communicate) for c in clients))
        cpu = meter.stop()
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
    done: list[list[float]] = []
    errors: list[str] = []
    for out, _ in outs:
        data = json.loads(out.strip().splitlines()[-1])
        done += data["batches"]
        errors += data["errors"]
        cpu["clients"] = cpu.get("clients", 0.0) + data["cpu"]
    if errors:
        raise RuntimeError(f"mlflow clients failed: {errors[:3]}")
    n = int(sum(d[2] for d in done))
    t_end = max(d[4] for d in done)
    full = workload.total_points(trials, batches, steps)
    conn = await asyncpg.connect(bench.dsn.rsplit("/", 1)[0] + "/mlflow")
    try:
        stored = await conn.fetchval("SELECT count(*) FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid"
                                     " WHERE r.experiment_id = $1", int(info["experiment_id"]))
    finally:
        await conn.close()
    if stored != n:
        raise RuntimeError(f"mlflow acknowledged {n} points but its database holds {stored}")
    lat = [d[4] - d[3] for d in done]
    return {"points": n, "full_points": full, "complete": n == full, "seconds": t_end - t0,
            "rate": n / (t_end - t0), "lat_p50": pct(lat, 0.5), "lat_p95": pct(lat, 0.95), "cpu": cpu,
            "cpu_seconds": t_end - t0}


# ---------------------------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------------------------


async def timed_gets(http: httpx.AsyncClient, path: str, calls: int) -> list[float]:
    for _ in range(3):  # warm the connection, the plan cache and Postgres' buffers
        (await http.get(path)).raise_for_status()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        resp = await http.get(path)
        resp.raise_for_status()
        _ = resp.content
        out.append(time.perf_counter() - t0)
    return out


async def timed_sql(fn: Callable[[], Any], calls: int) -> list[float]:
    for _ in range(3):
        await fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def queries_phase(bench: Bench, bus: Bus, conn: Any) -> dict[str, Any]:
    from services.gateway import queries

    args = bench.args
    out: dict[str, Any] = {}
    # One trial, one metric ("loss": workload index 0), args.series_points points, through the bus.
    steps = 500
    batches = args.series_points // steps
    (tid,) = bench.trial_ids(1)
    exp_id = await create_experiment(bench, bus, conn, "series-bench", [tid])
    r = await kiln_ingest(bench, [bus], conn, exp_id, [tid], batches, steps)
    out["series_load"] = r
    # The 1,000-trial experiment: TrialCreated and ValidationReported through the bus.
    ids = bench.trial_ids(args.summary_trials)
    sexp = await create_experiment(bench, bus, conn, "summary-bench", ids)
    rng = random.Random(7)
    sem = asyncio.Semaphore(64)

    async def validations(tid: int) -> None:
        async with sem:
            base = rng.uniform(0.2, 1.0)
            for v in range(args.validations):
                await bus.publish(ev.ValidationReported(
                    experiment_id=sexp, trial_id=tid, steps_completed=100 * (v + 1),
                    metrics={"val_loss": base * (0.9 ** v), "val_acc": 1 - base * (0.9 ** v) / 2},
                    reported_at=workload.T0 + v))

    t0 = time.perf_counter()
    await asyncio.gather(*(validations(t) for t in ids))
    while await conn.fetchval("SELECT count(*) FROM trials WHERE experiment_id = $1 AND steps_completed = $2",
                              sexp, 100 * args.validations) < len(ids):
        await asyncio.sleep(0.05)
    n_events = len(ids) * (1 + args.validations)
    out["summary_load"] = {"events": n_events, "seconds": time.perf_counter() - t0}
    # Postgres caches, the visibility map and statistics settle as they would on a live system.
    await conn.execute("VACUUM ANALYZE metric_points")
    await conn.execute("VACUUM ANALYZE trials")
    series_path = f"/api/v1/trials/{tid}/series?name=loss&max_points=1000"
    summary_path = f"/api/v1/experiments/{sexp}/trials?sort=best_metric&limit=1000"
    await queries.init_connection(conn)
    async with httpx.AsyncClient(base_url=bench.cfg.master_url, timeout=30, headers=bench.admin_headers()) as http:
        got = (await http.get(series_path)).raise_for_status().json()
        out["series_returned"] = len(got["series"]["loss"])
        rows = (await http.get(summary_path)).raise_for_status().json()
        if len(rows) != len(ids):
            raise RuntimeError(f"summary returned {len(rows)} trials, expected {len(ids)}")
        out["series_http"] = await timed_gets(http, series_path, args.query_calls)
        out["summary_http"] = await timed_gets(http, summary_path, args.query_calls)
    out["series_sql"] = await timed_sql(lambda: queries.series(conn, tid, "training", "loss", 1000), args.query_calls)
    out["summary_sql"] = await timed_sql(
        lambda: queries.list_trials(conn, sexp, 1000, 0, "best_metric", False), args.query_calls)
    return out


# ---------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------


async def replay_phase(bench: Bench) -> dict[str, Any]:
    os.environ.update(stack.service_env(bench.cfg, bench.creds, "tracker"))
    from services.runtime import read_settings
    from services.tracker import replay as rp

    out: dict[str, Any] = {}
    conn = await asyncpg.connect(bench.dsn)
    try:
        pos = await rp.positions(conn, "public")
        out["training_points"] = await conn.fetchval("SELECT count(*) FROM metric_points WHERE kind = 'training'")
        async with connect_bus(read_settings(BusSettings), "replay-bench", ensure=False) as bus:
            # Reading alone (ordered reads + decode, no projection): the ceiling for replay's rate.
            spec, kind = rp.CONSUMERS[0]
            decoder = msgspec.json.Decoder(kind)
            t0, n = time.perf_counter(), 0
            async with contextlib.aclosing(bus.read(spec.stream, spec.filter_subjects[0], decoder)) as stream:
                async for _ in stream:
                    n += 1
            out["read_only"] = {"events": n, "seconds": time.perf_counter() - t0,
                                "rate": n / (time.perf_counter() - t0)}
            domain = await rp.replay(bus, conn, "replay_domain", {"tracker-events": pos["tracker-events"]})
        await conn.execute('DROP SCHEMA "replay_domain" CASCADE')
        out["domain"] = {"events": domain.events, "seconds": domain.seconds, "rate": domain.rate}
    finally:
        await conn.close()
    meter = cpu_meter(bench)
    meter.start()
    t0 = time.perf_counter()
    report = await rp.run("replay_bench", verify=True)
    out["full"] = {"events": report.events, "seconds": report.seconds, "rate": report.rate,
                   "per_consumer": report.per_consumer, "equal": report.equal,
                   "differs": [t for t in report.digests if report.digests[t] != report.live_digests.get(t)],
                   "cpu": meter.stop(), "cpu_seconds": time.perf_counter() - t0}
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


async def run(bench: Bench) -> dict[str, Any]:
    args = bench.args
    res = bench.results
    conn = await asyncpg.connect(bench.dsn)
    try:
        await conn.execute("CREATE SCHEMA bench_raw")
        await conn.execute("CREATE TABLE bench_raw.metric_points (LIKE public.metric_points INCLUDING ALL)")
        if not args.skip_mlflow:
            await bench.start_mlflow()
        async with contextlib.AsyncExitStack() as stack_:
            buses = [await stack_.enter_async_context(bench.bus(f"bench-{k}")) for k in range(args.connections)]
            reps: list[dict[str, Any]] = []
            orders = [("kiln", "copy", "mlflow"), ("mlflow", "kiln", "copy"), ("copy", "mlflow", "kiln")]
            for rep in range(args.reps):
                r: dict[str, Any] = {}
                for what in orders[rep % 3]:
                    if what == "kiln":
                        r["kiln"] = await kiln_real_ingest(bench, conn, f"rep{rep}", args.trials, args.batches,
                                                           args.steps)
                        await gateway_check(bench, r["kiln"]["trial_ids"], list(range(args.trials)), args.batches,
                                            args.steps)
                    elif args.real_only:
                        continue
                    elif what == "copy":
                        trials = bench.trial_ids(args.trials)
                        r["copy"] = await raw_copy(bench, conn, trials, args.batches, args.steps)
                    elif not args.skip_mlflow:
                        r["mlflow"] = await mlflow_ingest(bench, rep, args.trials, args.batches, args.steps)
                    await asyncio.sleep(1)  # let checkpoints and autovacuum start between phases
                reps.append(r)
                st = r["kiln"]["stages"]
                line = (f"rep {rep}: kiln {r['kiln']['rate']:,.0f} pts/s (reported {st['reported']:.2f}s, outbox"
                        f" {st['outbox']:.2f}s, jetstream {st['jetstream']:.2f}s, postgres {st['postgres']:.2f}s)")
                if "copy" in r:
                    line += f", copy {r['copy']['rate']:,.0f} pts/s"
                if "mlflow" in r:
                    line += f", mlflow {r['mlflow']['rate']:,.0f} pts/s"
                print(line, flush=True)
            res["reps"] = reps
            if args.real_only:
                return res
            # The old direct path on the same shape, for what the real path costs: simulated trials publish
            # their batches straight to JetStream (admin credential); no trial processes, link or outbox.
            bench.stop_deciders()
            direct = []
            for rep in range(args.direct_reps):
                trials = bench.trial_ids(args.trials)
                exp_id = await create_experiment(bench, buses[0], conn, f"direct-rep{rep}", trials)
                direct.append(await kiln_ingest(bench, buses, conn, exp_id, trials, args.batches, args.steps))
                await gateway_check(bench, trials, list(range(len(trials))), args.batches, args.steps)
                print(f"direct publish rep {rep}: {direct[-1]['rate']:,.0f} pts/s", flush=True)
                await asyncio.sleep(1)
            res["direct"] = direct
            # Latency below saturation, at the Core API's timer cadence: each trial sends one batch a second
            # from a random phase, the batch sized so the offered load is --paced-load of the measured capacity
            # (a trial logging fewer than 500 steps a second flushes what it has every second).
            trials = bench.trial_ids(args.paced_trials)
            exp_id = await create_experiment(bench, buses[0], conn, "ingest-paced", trials)
            capacity = statistics.median(d["rate"] for d in direct)
            names = sum(len(workload.names_of(i)) for i in range(len(trials)))
            steps = max(10, min(args.steps, round(args.paced_load * capacity * args.pace_s / names)))
            res["paced"] = await kiln_ingest(bench, buses, conn, exp_id, trials, args.paced_batches, steps,
                                             pace_s=args.pace_s)
            res["paced"]["steps"] = steps
            res["paced"]["offered"] = names * steps / args.pace_s
            print(f"paced: p50 {res['paced']['lat_p50'] * 1000:.0f} ms, p95 {res['paced']['lat_p95'] * 1000:.0f} ms",
                  flush=True)
            res["queries"] = await queries_phase(bench, buses[0], conn)
        res["replay"] = await replay_phase(bench)
    finally:
        await conn.close()
    return res


def cores(runs: list[dict[str, Any]]) -> str:
    """Median cores per CPU group over these runs (CPU seconds / wall seconds)."""
    keys = list(runs[0]["cpu"])
    return ", ".join(f"{k} {statistics.median(r['cpu'].get(k, 0.0) / r['cpu_seconds'] for r in runs):.2f}"
                     for k in keys)


def table(res: dict[str, Any]) -> str:
    reps, direct = res["reps"], res["direct"]
    k = [r["kiln"]["rate"] for r in reps]
    c = [r["copy"]["rate"] for r in reps]
    d = [x["rate"] for x in direct]
    frac = [r["kiln"]["rate"] / r["copy"]["rate"] for r in reps]
    a = res["args"]
    lines = ["| measure | median (min–max) | target |", "|---|---|---|",
             f"| Kiln ingest, real path ({a['trials']} trial processes on {a['workers']} workers × "
             f"{a['slots_per_worker']} slots), points/s from first report until all queryable | {med_range(k)} |"
             " ≥ 100,000 |"]
    if all("mlflow" in r for r in reps):
        m = [r["mlflow"]["rate"] for r in reps]
        ratio = [r["kiln"]["rate"] / r["mlflow"]["rate"] for r in reps]
        lines.append(f"| MLflow `log_batch`, points/s | {med_range(m)} | |")
        lines.append(f"| Kiln real path / MLflow (per rep) | {med_range(ratio, '{:.1f}×')} | ≥ 20× |")
        md = statistics.median(m)
        lines.append(f"| Kiln direct publish (old path, admin credential) / MLflow (medians) |"
                     f" {statistics.median(d) / md:.1f}× | |")
    lines.append(f"| raw asyncpg COPY, points/s (physical limit) | {med_range(c)} | |")
    lines.append(f"| Kiln real path / raw COPY (per rep) | {med_range([f * 100 for f in frac], '{:.0f} %')} | ≥ 50 % |")
    lines.append(f"| Kiln direct publish (old path, same shape, after the reps), points/s | {med_range(d)} | |")
    share = statistics.median(k) / statistics.median(d) * 100
    lines.append(f"| Kiln real path / direct publish (medians) | {share:.0f} % | |")
    for stage, label in (("reported", "trials' `report_training_metrics` calls done"),
                         ("outbox", "every batch stored in the workers' outboxes (trials' `core` closed)"),
                         ("jetstream", "every batch in the metrics stream (worker publish from outbox)"),
                         ("postgres", "every point queryable (tracker)")):
        secs = [r["kiln"]["stages"][stage] for r in reps]
        rates = [r["kiln"]["stage_rates"][stage] for r in reps]
        lines.append(f"| real path: {label}: s after go / points/s | {med_range(secs, '{:.2f}')}"
                     f" / {med_range(rates)} | |")
    lines.append(f"| real path: points queryable when the stream held every batch | "
                 f"{med_range([r['kiln']['queryable_at_jetstream'] * 100 for r in reps], '{:.0f} %')} | |")
    lines.append(f"| real path: tracker on the rest (backlog after the last publish), points/s | "
                 f"{med_range([r['kiln']['tracker_backlog_rate'] for r in reps])} | |")
    direct_us = [(x["cpu"]["tracker"] + x["cpu"]["postgres"]) / x["points"] * 1e6 for x in direct]
    lines.append(f"| tracker + Postgres CPU per point, µs: real path / direct publish | "
                 f"{med_range([r['kiln']['tracker_cpu_us_per_point'] for r in reps], '{:.2f}')} / "
                 f"{med_range(direct_us, '{:.2f}')} | |")
    per_trial = [x for r in reps for x in r["kiln"]["trial_report_rates"]]
    lines.append(f"| real path: one trial's report rate, points/s (all trials of all reps) | {med_range(per_trial)}"
                 " | |")
    lines.append(f"| real path: trial start-up (submit → every trial ready), s | "
                 f"{med_range([r['kiln']['startup_s'] for r in reps], '{:.1f}')} | |")
    lines.append(f"| real path: CPU, cores (median over reps) | {cores([r['kiln'] for r in reps])} | |")
    lines.append(f"| direct publish: CPU, cores | {cores(direct)} | |")
    publish_rates = [x["publish_rate"] for x in direct]
    lines.append(f"| direct publish: JetStream publish (acked), points/s | {med_range(publish_rates)} | |")
    lines.append("| direct publish, saturated: publish → queryable p50 / p95, ms | "
                 f"{med_range([x['lat_p50'] * 1000 for x in direct])} / "
                 f"{med_range([x['lat_p95'] * 1000 for x in direct])} | |")
    if all("mlflow" in r for r in reps):
        lines.append("| saturated: MLflow 500-step batch logged p50 / p95, ms | "
                     f"{med_range([r['mlflow']['lat_p50'] * 1000 for r in reps])} / "
                     f"{med_range([r['mlflow']['lat_p95'] * 1000 for r in reps])} | |")
    p = res["paced"]
    lines.append(f"| direct publish, paced ({a['paced_trials']} trials, 1 batch of {p['steps']} steps/s/trial"
                 f" = {p['offered']:,.0f} pts/s offered):"
                 f" publish → queryable p50 / p95, ms | {p['lat_p50'] * 1000:.0f} / {p['lat_p95'] * 1000:.0f} | |")
    q = res["queries"]
    for key, label, target in (("series_http", "100k-point series → 1,000 points, gateway", "p95 < 100 ms"),
                               ("series_sql", "  same, the SQL alone (asyncpg)", ""),
                               ("summary_http", "1,000-trial summary sorted by best_metric, gateway", "p95 < 50 ms"),
                               ("summary_sql", "  same, the SQL alone (asyncpg)", "")):
        v = q[key]
        lines.append(f"| {label}: p50 / p95, ms | {pct(v, 0.5) * 1000:.1f} / {pct(v, 0.95) * 1000:.1f}"
                     f" (max {max(v) * 1000:.1f}) | {target} |")
    rp = res["replay"]
    lines.append(f"| replay --verify, all streams, events/s | {rp['full']['rate']:,.0f}"
                 f" ({rp['full']['events']:,} events"
                 f" in {rp['full']['seconds']:.1f} s; verify {'equal' if rp['full']['equal'] else 'DIFFERS'}) |"
                 " ≥ 50,000 |")
    lines.append(f"| replay, domain events only, events/s | {rp['domain']['rate']:,.0f} ({rp['domain']['events']:,}"
                 f" events in {rp['domain']['seconds']:.2f} s) | ≥ 50,000 |")
    lines.append(f"| reading the events stream alone (bus.read + decode), events/s | {rp['read_only']['rate']:,.0f}"
                 " | |")
    metric_s = rp["full"]["seconds"] - rp["domain"]["seconds"]
    lines.append("| replay, metrics stream (full − domain-only time), points/s |"
                 f" {rp['training_points'] / metric_s:,.0f}"
                 f" ({rp['full']['per_consumer'].get('tracker-metrics', 0):,} messages,"
                 f" {rp['training_points']:,} points in ≈{metric_s:.1f} s) | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8,
                        help="trials per repetition (real trial processes: at most workers × slots run at once)")
    parser.add_argument("--batches", type=int, default=96, help="batches per trial per repetition")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots-per-worker", type=int, default=4)
    parser.add_argument("--direct-reps", type=int, default=0, help="old direct-publish runs (default: --reps)")
    parser.add_argument("--paced-trials", type=int, default=64)
    parser.add_argument("--steps", type=int, default=500, help="steps per batch (the Core API flushes at 500)")
    parser.add_argument("--connections", type=int, default=4, help="NATS connections the trials share")
    parser.add_argument("--paced-batches", type=int, default=8)
    parser.add_argument("--pace-s", type=float, default=1.0)
    parser.add_argument("--paced-load", type=float, default=0.5, help="offered load as a fraction of capacity")
    parser.add_argument("--series-points", type=int, default=100_000)
    parser.add_argument("--summary-trials", type=int, default=1000)
    parser.add_argument("--validations", type=int, default=10, help="ValidationReported per summary trial")
    parser.add_argument("--query-calls", type=int, default=50)
    parser.add_argument("--mlflow-python", default=str(HERE / ".venv-mlflow" / "bin" / "python"),
                        help="MLflow's own venv (`just bench-ingest` makes it)")
    parser.add_argument("--mlflow-workers", type=int, default=2)
    parser.add_argument("--mlflow-procs", type=int, default=4, help="client processes (threads = trials)")
    parser.add_argument("--mlflow-budget-s", type=float, default=30.0)
    parser.add_argument("--real-only", action="store_true",
                        help="only the real-path repetitions (no MLflow, COPY, direct, paced, queries, replay):"
                        " for profiling")
    parser.add_argument("--skip-mlflow", action="store_true")
    parser.add_argument("--keep-state", action="store_true")
    parser.add_argument("--profile", default="",
                        help="py-spy the tracker (and, on the real path, the workers) during each Kiln ingest"
                        " into this dir")
    parser.add_argument("--json", default=str(HERE / "last_run.json"))
    args = parser.parse_args()
    args.direct_reps = args.direct_reps or args.reps
    args.skip_mlflow = args.skip_mlflow or args.real_only
    if args.trials > args.workers * args.slots_per_worker:
        # Every trial waits for `go` until all are ready, so all of them must run at once.
        parser.error(f"--trials {args.trials} > workers × slots ({args.workers * args.slots_per_worker})")
    args.mlflow_python = os.path.abspath(args.mlflow_python)  # the server runs in the state dir; keep the venv's link
    if not args.skip_mlflow and not Path(args.mlflow_python).exists():
        parser.error(f"no MLflow venv at {args.mlflow_python}: run `just bench-ingest` (it makes one) or pass"
                     " --mlflow-python / --skip-mlflow")
    bench = Bench(args)
    try:
        bench.up()
        res = asyncio.run(run(bench))
    finally:
        bench.down()
    if args.real_only:  # no table: the per-repetition lines and CPU per point only (last_run.json is kept)
        for rep, r in enumerate(res["reps"]):
            v = r["kiln"]
            print(f"rep {rep} real path: {v['rate']:,.0f} pts/s over {v['seconds']:.2f}s; cpu"
                  f" {fmt_cpu(v['cpu'], v['cpu_seconds'])}; per point, µs: "
                  + ", ".join(f"{k} {c / v['points'] * 1e6:.2f}" for k, c in v["cpu"].items()))
        return
    Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print(table(res))
    for rep, r in enumerate(res["reps"]):
        for what, v in r.items():
            print(f"rep {rep} {what}: {v['rate']:,.0f} pts/s over {v['seconds']:.2f}s;"
                  f" cpu {fmt_cpu(v['cpu'], v['cpu_seconds'])}")
    for rep, v in enumerate(res["direct"]):
        print(f"direct {rep}: {v['rate']:,.0f} pts/s over {v['seconds']:.2f}s;"
              f" cpu {fmt_cpu(v['cpu'], v['cpu_seconds'])}")
    print(f"replay (incl. digests) cpu: {fmt_cpu(res['replay']['full']['cpu'], res['replay']['full']['cpu_seconds'])};"
          f" per consumer {res['replay']['full']['per_consumer']}")


if __name__ == "__main__":
    main()
