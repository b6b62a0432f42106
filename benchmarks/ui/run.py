"""Page-load benchmark: an experiment's learning curves in a real browser, next to the same data's JSON fetch alone.

One invocation, one machine, side by side:

1. A Kiln stack on free ports with no workers; the searcher and scheduler are stopped (the experiment is synthetic:
   no trial runs, nothing to decide).
2. A synthetic experiment built through the bus, as the gateway, searcher and workers would publish it:
   ``ExperimentSubmitted``, one ``TrialCreated`` per trial, then per trial its training points (``loss`` at every
   step, batched in ``TrainingMetricsReported`` as the worker ships them) and a few ``ValidationReported``. The
   tracker projects them into Postgres; the script waits until Postgres holds every point.
3. Debian's chromium (Playwright), signed in as the admin. Each repetition opens a fresh tab at the experiment's
   curves (``/#/experiments/ID/curves?metric=training:loss``) and reads the ``kiln:curves-drawn`` performance mark
   the page sets when uPlot has drawn the lines: its startTime is the time from the navigation's start to a drawn
   chart. Then, in the same tab, the very request the page made for the curves
   (``GET /api/v1/experiments/ID/series?...``) is timed alone: ``fetch`` + ``json()``, the floor of any page
   showing that data. Reported: medians, min-max, and the ratio page / fetch.

Usage: .venv/bin/python benchmarks/ui/run.py [--trials 1000] [--points 1000] [--runs 5] (``just bench-ui``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from deploy import stack, supervise  # noqa: E402
from deploy.ports import free_port_block  # noqa: E402
from schemas import events as ev  # noqa: E402
from services.runtime import Bus, BusSettings, connect_bus  # noqa: E402

CHROMIUM = "/usr/bin/chromium"  # Debian's (deploy/setup.sh installs it), as tests/e2e/test_web_ui.py
MARK = "kiln:curves-drawn"  # services/gateway/ui/static/js/pages/experiment.js
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the synthetic points' wall times
BATCH = 500  # points per TrainingMetricsReported (the Core API flushes every 500 steps or 1 s)
VALIDATIONS = 10  # ValidationReported per trial (the trials table, best metric)


def loss(trial: int, step: int) -> float:
    """A decaying loss with a per-trial rate and a little jitter: a thousand distinct curves."""
    rate = 1.0 + (trial * 7919 % 1000) / 250.0
    jitter = ((step * 104729 + trial * 7919) % 1000) / 20_000.0
    return 2.0 / (1.0 + rate * step / 100.0) + jitter


class Run:
    """The stack and the synthetic experiment."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state = Path(tempfile.mkdtemp(prefix="kiln-bench-ui-"))
        self.state.chmod(0o755)  # the unprivileged postgres user must reach its data dir inside
        base = free_port_block(16)
        self.cfg = stack.StackConfig.load(
            self.state, nats_port=base, nats_monitor_port=base + 1, pg_port=base + 2, s3_port=base + 3,
            http_port=base + 4, s3_ports_base=base + 5, workers=0)
        self.creds: stack.Credentials

    def up(self) -> None:
        info = stack.up(self.cfg)
        self.creds = stack.Credentials.load_or_create(self.cfg.state_dir)
        stopped = supervise.Supervisor(supervise.Paths.of(self.cfg.state_dir)).stop(["searcher", "scheduler"])
        print(f"stack up in {info.seconds:.1f}s on {self.cfg.master_url}; stopped {', '.join(stopped)}", flush=True)

    def down(self) -> None:
        stack.down(self.cfg)
        if not self.args.keep_state:
            shutil.rmtree(self.state, ignore_errors=True)

    @property
    def dsn(self) -> str:
        return f"postgresql://kiln:{self.creds.pg_password}@{self.cfg.host}:{self.cfg.pg_port}/kiln"

    def bus(self) -> Any:
        """The admin's bus: the synthetic experiment's events, published as their publishers would."""
        settings = BusSettings(nats_url=f"nats://{self.cfg.host}:{self.cfg.nats_port}", nats_user="admin",
                               nats_password=self.creds.nats["admin"])
        return connect_bus(settings, "bench-ui", ensure=False)

    def token(self) -> dict[str, Any]:
        resp = httpx.post(f"{self.cfg.master_url}/api/v1/auth/login", timeout=30,
                          json={"username": "admin", "password": self.creds.admin_password})
        return dict(resp.raise_for_status().json())


async def build(run: Run) -> tuple[int, float]:
    """The synthetic experiment through the bus; its id and the seconds until Postgres held every point."""
    trials, points = run.args.trials, run.args.points
    conn = await asyncpg.connect(run.dsn)
    try:
        exp_id = int(await conn.fetchval("SELECT nextval('experiment_ids')"))
        trial_ids = list(range(1_000_000 + exp_id * 10_000, 1_000_000 + exp_id * 10_000 + trials))
        config = {"name": f"bench-ui-{trials}x{points}", "entrypoint": "python3 train.py",
                  "searcher": {"name": "random", "metric": "val_loss", "smaller_is_better": True,
                               "max_trials": trials, "max_length": points},
                  "hyperparameters": {"lr": {"type": "log", "minval": -5, "maxval": -1, "base": 10}},
                  "resources": {"slots_per_trial": 1}}
        rng = random.Random(exp_id)
        sem = asyncio.Semaphore(64)
        t0 = time.perf_counter()
        async with run.bus() as bus:
            await bus.publish(ev.ExperimentSubmitted(
                experiment_id=exp_id, config=config, config_yaml=json.dumps(config), context_digest="0" * 64,
                context_size=0, seed=1, submitted_by="admin", submitted_at=T0))

            async def trial(k: int, tid: int, b: Bus) -> None:
                async with sem:
                    await b.publish(ev.TrialCreated(experiment_id=exp_id, trial_id=tid, request_id=k + 1,
                                                    hparams={"lr": 10 ** rng.uniform(-5, -1)}, seed=k,
                                                    max_length=points))
                    for first in range(1, points + 1, BATCH):
                        steps = range(first, min(points, first + BATCH - 1) + 1)
                        await b.publish(ev.TrainingMetricsReported(
                            experiment_id=exp_id, trial_id=tid, batch_id=f"bench-ui-{tid}:{first}",
                            points=[ev.MetricPoint(steps_completed=s, metrics={"loss": loss(k, s)},
                                                   reported_at=T0 + s) for s in steps]))
                    for v in range(1, VALIDATIONS + 1):
                        step = points * v // VALIDATIONS
                        await b.publish(ev.ValidationReported(
                            experiment_id=exp_id, trial_id=tid, steps_completed=step,
                            metrics={"val_loss": loss(k, step) + 0.05}, reported_at=T0 + step))

            await asyncio.gather(*(trial(k, t, bus) for k, t in enumerate(trial_ids)))
        published = time.perf_counter() - t0
        want = trials * points
        while True:
            have = await conn.fetchval(
                "SELECT count(*) FROM metric_points WHERE trial_id = ANY($1::bigint[]) AND kind = 'training'",
                trial_ids)
            validated = await conn.fetchval("SELECT count(*) FROM trials WHERE experiment_id = $1 AND"
                                            " steps_completed = $2", exp_id, points)
            if have >= want and validated >= trials:
                break
            await asyncio.sleep(0.5)
        projected = time.perf_counter() - t0
        print(f"experiment {exp_id}: {trials} trials x {points} points published in {published:.1f}s, in Postgres"
              f" after {projected:.1f}s", flush=True)
        # Caches, the visibility map and statistics settle as on a live system.
        await conn.execute("VACUUM ANALYZE metric_points")
        await conn.execute("VACUUM ANALYZE trials")
        return exp_id, projected
    finally:
        await conn.close()


FETCH_ALONE = """async ([url, token]) => {
  const t0 = performance.now();
  const resp = await fetch(url, { headers: { Accept: "application/json", Authorization: `Bearer ${token}` } });
  const body = await resp.json();
  const ms = performance.now() - t0;
  return { ms, status: resp.status, trials: body.trials.length,
           points: body.trials.reduce((n, t) => n + t.points.length, 0) };
}"""


def measure(run: Run, exp_id: int) -> dict[str, Any]:
    """Page loads to a drawn chart and the series fetch alone, alternating, ``--runs`` times each."""
    from playwright.sync_api import sync_playwright

    login = run.token()
    user = json.dumps({"username": login["username"], "admin": login["admin"]})
    origin = run.cfg.master_url.rstrip("/")
    hash_path = f"/#/experiments/{exp_id}/curves?metric=training:loss"
    out: dict[str, Any] = {"page_ms": [], "fetch_ms": [], "series_request_ms": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        # Signed in as the UI keeps it (sessionStorage), before any of the page's scripts run.
        context.add_init_script(f"sessionStorage.setItem('kiln.token', {json.dumps(login['token'])});"
                                f" sessionStorage.setItem('kiln.user', {json.dumps(user)});")
        for k in range(run.args.runs + 1):  # the first is a warm-up (the UI's files into the cache), not counted
            page = context.new_page()
            series_urls: list[str] = []
            page.on("request", lambda r, urls=series_urls: urls.append(r.url) if "/series?" in r.url else None)
            page.goto(origin + hash_path)
            # Polled with evaluate (the page's CSP refuses wait_for_function's eval); the mark keeps its own time.
            deadline = time.monotonic() + 120
            while not page.evaluate(f"performance.getEntriesByName({json.dumps(MARK)}).length > 0"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no {MARK} mark within 120 s on {hash_path}")
                time.sleep(0.02)
            mark = page.evaluate(f"(() => {{ const m = performance.getEntriesByName({json.dumps(MARK)})[0];"
                                 f" return {{ ms: m.startTime, detail: m.detail }}; }})()")
            request = page.evaluate("""(() => { const r = performance.getEntriesByType("resource")
                .filter((e) => e.name.includes("/series?")); return r.length ? r[0].duration : null; })()""")
            (url,) = series_urls
            alone = page.evaluate(FETCH_ALONE, [url, login["token"]])
            if alone["status"] != 200 or alone["points"] != mark["detail"]["points"]:
                raise RuntimeError(f"the fetch alone got {alone}, the chart drew {mark['detail']}")
            page.close()
            tag = "warm-up" if k == 0 else f"run {k}"
            print(f"{tag}: chart drawn {mark['ms']:.0f} ms after navigation ({mark['detail']['series']} lines,"
                  f" {mark['detail']['points']} points; its series request {request:.0f} ms); the same fetch alone"
                  f" {alone['ms']:.0f} ms", flush=True)
            if k == 0:
                out["url"] = url.replace(origin, "")
                out["drawn"] = mark["detail"]
                continue
            out["page_ms"].append(mark["ms"])
            out["fetch_ms"].append(alone["ms"])
            out["series_request_ms"].append(request)
        browser.close()
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ms ({min(values):.0f}–{max(values):.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--points", type=int, default=1000, help="training points (loss) per trial")
    ap.add_argument("--runs", type=int, default=5, help="page loads and fetches measured (after one warm-up)")
    ap.add_argument("--keep-state", action="store_true", help="keep the stack's state dir")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "last_run.json")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: `apt-get install chromium` (deploy/setup.sh does it as root)")
    run = Run(args)
    run.up()
    try:
        load_before = os.getloadavg()
        exp_id, projected = asyncio.run(build(run))
        load_measure = os.getloadavg()
        got = measure(run, exp_id)
        load_after = os.getloadavg()
    finally:
        run.down()
    page, fetch = statistics.median(got["page_ms"]), statistics.median(got["fetch_ms"])
    result = {
        "trials": args.trials, "points_per_trial": args.points, "runs": args.runs, "series_url": got["url"],
        "drawn": got["drawn"], "page_ms": got["page_ms"], "fetch_ms": got["fetch_ms"],
        "series_request_in_page_ms": got["series_request_ms"], "ratio_page_to_fetch": page / fetch,
        "build_s": projected, "loadavg_before_build": load_before, "loadavg_before_measure": load_measure,
        "loadavg_after": load_after, "cpus": os.cpu_count(), "machine": platform.platform(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"| {args.trials} trials × {args.points} points | median (min–max) of {args.runs} |")
    print("|---|---|")
    print(f"| navigation → learning curves drawn | {spread(got['page_ms'])} |")
    print(f"| the series JSON fetched alone | {spread(got['fetch_ms'])} |")
    print(f"| page / fetch | {page / fetch:.2f}× |")
    print(f"\nload average (1, 5, 15 min) when measuring: {' '.join(f'{x:.2f}' for x in load_measure)};"
          f" after: {' '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} CPUs; saved {args.out}")


if __name__ == "__main__":
    main()
