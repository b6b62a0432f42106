"""The time-to-hard-target protocol: many seeds per method, medians with bootstrap intervals, on two tables.

For each learning-curve table (``table.npz``: an MLP on MNIST-1D; ``table_gbdt.npz``: gradient-boosted
trees on scikit-learn's digits) and each worker count, every method is replayed with ``--seeds`` seeds by
``replay.py``'s simulator (the same clock, workers and work accounting as the README's first tables).

Targets are set by how rare they are, not as a share of the best value: a target at level ``p`` is the
score that ``p`` of random full-length trials reach at some validation (the (1-p) quantile of the best
score seen by a random draw). The hardest level, 1.5%, is reached by at most 2% of random configurations.

Per method, worker count and target: the median work (epochs; boosting iterations for the GBDT table)
until the incumbent first reaches the target, how many runs never reached it within the work cap, and the
speedup over Kiln's random search (random's median / the method's) with a 90% bootstrap interval (the
seeds of both resampled, 2,000 times, seeded). The ceiling of successive halving for the method's rungs
stands next to it, and for the hardest target the speedup as a share of that ceiling.

Every finished run is appended to ``<out>/runs.jsonl`` at once (``build/protocol/``, not committed): a
stopped run of this script resumes where it was (runs already there are not replayed), and ``--report``
re-makes the report (``results/protocol.md``) from that file.

    .venv/bin/python benchmarks/hpo/protocol.py --seeds 200 --jobs 2           # both tables, 1 and 4 workers
    .venv/bin/python benchmarks/hpo/protocol.py --report                        # the report from runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import replay  # noqa: E402

REACH_LEVELS = (0.10, 0.05, 0.015)
FRESH = True  # README "Fresh rows": a repeated (configuration, seed) trains as the nearest fresh one
TABLES = {"mnist1d": HERE / "table.npz", "gbdt": HERE / "table_gbdt.npz"}
BASELINE = "kiln-random"
METHODS = [
    "kiln-random",
    "kiln-asha-promotion",
    "kiln-promo-pending",
    "kiln-promo-extrap",
    "kiln-bohb",
    "kiln-bohb-extrap",
    "optuna-random-sha",
    "optuna-random-median",
    "optuna-tpe-median",  # Optuna's default sampler and pruner
]
# Not replayed: on the GBDT table `sampler: tpe` without the curve rule stalls on configurations that look
# good early (10 of 10 pilot runs reached no target within the 1,500-trial cap, ~55 CPU-s each).
SKIP = {("gbdt", "kiln-bohb")}


def prepare(name: str) -> replay.Table:
    """The table with its rarity-based targets (on scores: larger is better)."""
    table = replay.Table(TABLES[name])
    table.fresh = FRESH
    rng = np.random.default_rng(2024)
    n = 200_000
    rows = table.random_rows(rng, n)
    seeds = rng.integers(table.n_seeds, size=n)
    best = table.val[rows, seeds].max(1)  # the best score a random full-length trial sees
    table.targets = [float(np.quantile(best, 1 - p)) for p in REACH_LEVELS]
    table.reach_fraction = [float((best >= t).mean()) for t in table.targets]
    final = table.val[rows, seeds, -1]
    table.reach_fraction_final = [float((final >= t).mean()) for t in table.targets]
    return table


def cap_units(table: replay.Table) -> float:
    """The work cap per run: 3x random search's expected work to the hardest target (geometric trials)."""
    p = table.reach_fraction[-1]
    return 3 * table.n_units / p


_TABLE: replay.Table | None = None


def _run(task: tuple[str, str, int, int, float]) -> dict[str, Any]:
    global _TABLE
    name, method, workers, seed, cap = task
    if _TABLE is None or _TABLE.path != TABLES[name]:
        _TABLE = prepare(name)
    caps = (cap, 1_500)  # trials; a run that stalls on one table configuration ends there
    r = replay.run_one(_TABLE, method, workers, seed, caps)
    upe = _TABLE.units_per_epoch
    return {
        "table": name, "method": method, "workers": workers, "seed": seed,
        "work": [h["epochs"] * upe if h is not None else None for h in r.hits],  # units
        "trials": r.trials, "cpu_s": r.wall_s,
    }


def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def ceiling(table: replay.Table, method: str) -> float | None:
    c = replay.ceiling(table, method)
    return c[0] if c else None


def _work(runs: list[dict[str, Any]], level: int) -> np.ndarray:
    return np.array([r["work"][level] if r["work"][level] is not None else math.inf for r in runs])


def speedup_ci(base: np.ndarray, method: np.ndarray, resamples: int = 2000) -> tuple[float, float, float]:
    """median(base) / median(method) and its 90% bootstrap interval (percentile method, seeded)."""
    rng = np.random.default_rng(0)
    point = float(np.median(base) / np.median(method))
    b = np.median(rng.choice(base, (resamples, len(base))), axis=1)
    m = np.median(rng.choice(method, (resamples, len(method))), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = b / m
    ratios = np.where(np.isnan(ratios), 0.0, ratios)
    lo = np.percentile(ratios, 5, method="lower")  # no interpolation: a bound may be infinite
    hi = np.percentile(ratios, 95, method="higher")
    return point, float(lo), float(hi)


def fmt(x: float, digits: int = 0) -> str:
    if math.isinf(x):
        return "∞"
    if math.isnan(x):
        return "-"
    return f"{x:,.{digits}f}"


def report(results: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for name in TABLES:
        runs_t = [r for r in results if r["table"] == name]
        if not runs_t:
            continue
        table = prepare(name)
        unit = "epochs" if table.units_per_epoch > 1 else "iterations"
        metric = "validation accuracy" if table.sign > 0 else "validation log loss"
        lines += [
            f"### Table `{table.path.name}`: {table.n_configs} configs x {table.n_seeds} seeds x "
            f"{table.n_units} units, metric: {metric}",
            "",
            "| target | value | random full-length trials reaching it (any unit / final) |",
            "|---|---:|---|",
        ]
        for i, p in enumerate(REACH_LEVELS):
            lines.append(f"| {100 * p:g}% | {table.sign * table.targets[i]:.4f} | "
                         f"{100 * table.reach_fraction[i]:.2f}% / {100 * table.reach_fraction_final[i]:.2f}% |")
        lines.append("")
        lines.append(f"Work cap per run: {cap_units(table) / table.units_per_epoch:,.0f} {unit}; ∞: not reached.")
        lines.append("")
        for w in sorted({r["workers"] for r in runs_t}):
            by: dict[str, list[dict[str, Any]]] = {}
            for r in runs_t:
                if r["workers"] == w:
                    by.setdefault(r["method"], []).append(r)
            base = by.get(BASELINE)
            header = "| method | ceiling | seeds |"
            sep = "|---|---:|---:|"
            for p in REACH_LEVELS:
                header += f" {100 * p:g}%: median {unit} (never) | × vs random [90% CI] |"
                sep += "---:|---:|"
            header += " hardest: × / ceiling |"
            sep += "---:|"
            lines += [f"#### {name}, {w} worker{'s' if w > 1 else ''}", "", header, sep]
            for m in [m for m in METHODS if m in by] + sorted(set(by) - set(METHODS)):
                runs = by[m]
                c = ceiling(table, m)
                row = f"| {m} | {fmt(c, 1) + '×' if c else '-'} | {len(runs)} |"
                share = "-"
                for i in range(len(REACH_LEVELS)):
                    wk = _work(runs, i) / table.units_per_epoch
                    never = int(np.isinf(wk).sum())
                    row += f" {fmt(float(np.median(wk)))} ({never}) |"
                    if base is not None:
                        b = _work(base, i) / table.units_per_epoch
                        x, lo, hi = speedup_ci(b, wk)
                        row += f" {x:.1f} [{lo:.1f}–{hi:.1f}] |" if math.isfinite(x) and x > 0 else " - |"
                        if i == len(REACH_LEVELS) - 1 and c and math.isfinite(x) and x > 0:
                            share = f"{100 * x / c:.0f}%"
                    else:
                        row += " - |"
                row += f" {share} |"
                lines.append(row)
            lines.append("")
            lines += verdict(table, by, w)
    return "\n".join(lines)


NEW = ("kiln-bohb", "kiln-bohb-extrap", "kiln-promo-extrap", "kiln-promo-pending")
OLD_KILN = "kiln-asha-promotion"


def verdict(table: replay.Table, by: dict[str, list[dict[str, Any]]], workers: int) -> list[str]:
    """The hardest target: the best new method against promotion ASHA and the best Optuna pair.

    ``a / b`` is median work of a / median work of the new method (above 1: the new method needs less),
    with its 90% bootstrap interval; "ahead" means the interval's lower end is above 1.
    """
    last = len(REACH_LEVELS) - 1
    upe = table.units_per_epoch

    def med(m: str) -> float:
        return float(np.median(_work(by[m], last)))

    new = [m for m in NEW if m in by]
    optuna = [m for m in by if m.startswith("optuna-")]
    if not new or BASELINE not in by:
        return []
    best = min(new, key=med)
    out = [f"Hardest target, {workers} worker{'s' if workers > 1 else ''}: best new method **{best}** "
           f"({fmt(med(best) / upe)} median)."]
    for other in [OLD_KILN, *([min(optuna, key=med)] if optuna else [])]:
        if other not in by:
            continue
        x, lo, hi = speedup_ci(_work(by[other], last), _work(by[best], last))
        ahead = "ahead beyond the interval" if lo > 1 else "not ahead beyond the interval"
        shown = f"{fmt(x, 2)} [{fmt(lo, 2)}–{fmt(hi, 2)}]" + (" (the other's median is ∞)" if math.isinf(x) else "")
        out.append(f"- vs {other} ({fmt(med(other) / upe)}): {other} / {best} = {shown}: {ahead}.")
    return [*out, ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default=",".join(TABLES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--workers", default="1,4")
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "build" / "protocol"), help="where runs.jsonl goes (resumable)")
    p.add_argument("--report-to", default=str(HERE / "results" / "protocol.md"))
    p.add_argument("--report", action="store_true", help="only re-make the report from runs.jsonl")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    if not args.report:
        done = {(r["table"], r["method"], r["workers"], r["seed"]) for r in load(runs_path)}
        tasks = []
        for name in args.tables.split(","):
            cap = cap_units(prepare(name))
            for m in args.methods.split(","):
                for w in (int(x) for x in args.workers.split(",")):
                    for s in range(args.seeds):
                        if (name, m, w, s) not in done and (name, m) not in SKIP:
                            tasks.append((name, m, w, s, cap))
        # In blocks of 50 seeds over every table, method and worker count: a run stopped early still
        # reports every method on the same seeds.
        tasks.sort(key=lambda t: t[3] // 50)
        t0 = time.perf_counter()
        with runs_path.open("a") as f:
            if args.jobs > 1:
                import multiprocessing as mp

                with mp.get_context("fork").Pool(args.jobs) as pool:
                    for i, r in enumerate(pool.imap_unordered(_run, tasks, chunksize=1)):
                        f.write(json.dumps(r) + "\n")
                        f.flush()
                        if i % 50 == 0:
                            print(f"{i + 1}/{len(tasks)} runs, {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            else:
                for i, task in enumerate(tasks):
                    f.write(json.dumps(_run(task)) + "\n")
                    f.flush()
                    if i % 50 == 0:
                        print(f"{i + 1}/{len(tasks)} runs, {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    text = report(load(runs_path))
    Path(args.report_to).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
