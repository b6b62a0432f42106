"""Replay search methods against a learning-curve table with a simulated clock and W parallel workers.

Each worker trains one trial at a time, unit by unit; a unit takes the seconds the table recorded for
that (configuration, seed, unit), and the validation score recorded for it is delivered to the method
when the unit ends. A stopped or pruned trial frees its worker at once (a stop that arrives while the
trial is mid-unit charges the part of the unit already trained); a paused trial (promotion ASHA) frees
its worker and goes back to the end of the queue when resumed, from where it stopped (checkpoint and
restore are free here). Trials wait in a FIFO queue for a free worker, as in Kiln's scheduler.

Methods: Kiln's own state machines from ``services/searcher/methods.py`` (driven exactly as Kiln's
searcher core drives them), and Optuna samplers x pruners through the ask/tell API
(``trial.report(value, step)`` after every unit, then ``trial.should_prune()``).

The incumbent is the best validation score reported by any trial so far (at any unit). "Time to target"
is the work consumed, summed over all trials (epochs = units / units-per-epoch, partial units included),
and the simulated wall-clock seconds, until the incumbent first reaches the target. A run stops when the
hardest target is reached or when a cap (epochs of work, trials) is reached: then the unreached targets
are censored (reported as ∞).

    .venv/bin/python benchmarks/hpo/replay.py --all            # the README table (~20 min; --quick: ~5 min)
    .venv/bin/python benchmarks/hpo/replay.py --methods kiln-random,optuna-tpe-sha --workers 1 --seeds 3
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from schemas.config import parse_config  # noqa: E402
from services.searcher import asha as asha_math  # noqa: E402
from services.searcher.methods import (  # noqa: E402
    CreateTrial,
    ResumeTrial,
    SearchContext,
    Shutdown,
    StopTrial,
    new_method,
)

TARGET_LEVELS = (0.98, 0.99, 0.995)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


class Table:
    """A learning-curve table (README "Table format") plus the hyperparameter -> row mapping."""

    def __init__(self, path: Path, mapping: str = "nearest") -> None:
        z = np.load(path)
        self.path = path
        # Scores: larger is better. A table whose metric is smaller-is-better (a loss) is negated here,
        # and ``sign`` turns a score back into the metric a trial reports.
        self.sign = -1 if "smaller_is_better" in z.files and bool(z["smaller_is_better"]) else 1
        self.val = self.sign * z["val"].astype(np.float64)  # [config, seed, unit]
        self.test = self.sign * z["test"].astype(np.float64)
        self.seconds = z["seconds"].astype(np.float64)
        self.n_configs, self.n_seeds, self.n_units = self.val.shape
        self.units_per_epoch = int(z["units_per_epoch"])
        self.space: list[dict[str, Any]] = json.loads(str(z["space"])) if "space" in z else []
        self.hp = {k[3:]: z[k] for k in z.files if k.startswith("hp_")}
        self.mapping = mapping if self.space else "ids"
        self.best_mean_final = float(self.val[:, :, -1].mean(1).max())
        self.targets = [lvl * self.best_mean_final for lvl in TARGET_LEVELS]
        best_seen = self.val.max(2)  # a full-length run "reaches" a target if any validation does
        self.reach_fraction = [float((best_seen >= t).mean()) for t in self.targets]
        self.reach_fraction_final = [float((self.val[:, :, -1] >= t).mean()) for t in self.targets]
        if self.mapping == "nearest":
            self._prepare_nearest()

    # The search space each method samples from. With ``nearest`` every method samples the space the
    # table was drawn from, and a sample trains as the table configuration nearest to it (same
    # categorical values, then Euclidean distance in the unit cube of the continuous coordinates,
    # log10/log2 for log-scaled ones). With ``ids`` the space is one categorical over row ids.

    def _coord(self, spec: dict[str, Any], value: float) -> float:
        x = math.log(value, spec["base"]) if spec["type"] == "log" else float(value)
        return (x - spec["min"]) / (spec["max"] - spec["min"])

    def _prepare_nearest(self) -> None:
        self.cont = [s for s in self.space if s["type"] != "categorical"]
        self.cats = [s for s in self.space if s["type"] == "categorical"]
        coords = np.stack(
            [np.array([self._coord(s, v) for v in self.hp[s["name"]]]) for s in self.cont], axis=1
        )
        self.cells: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        keys = [tuple(self.hp[s["name"]][i].item() for s in self.cats) for i in range(self.n_configs)]
        for key in set(keys):
            rows = np.array([i for i, k in enumerate(keys) if k == key])
            self.cells[key] = (rows, coords[rows])

    def row_for(self, hparams: dict[str, Any]) -> int:
        """The table configuration a sampled hyperparameter dict trains as."""
        return self.rows_near(hparams)[0]

    def rows_near(self, hparams: dict[str, Any]) -> list[int]:
        """The table configurations of the sample's categorical cell, nearest first."""
        if self.mapping == "ids":
            return [int(hparams["config_id"])]
        key = tuple(hparams[s["name"]] for s in self.cats)
        rows, coords = self.cells[key]
        x = np.array([self._coord(s, hparams[s["name"]]) for s in self.cont])
        return [int(r) for r in rows[np.argsort(((coords - x) ** 2).sum(1), kind="stable")]]

    # ``fresh``: a sample whose nearest (configuration, seed) this run already trained trains as the
    # nearest configuration not yet trained with that seed (protocol.py; see README "Fresh rows").
    fresh = False

    def assign(self, hparams: dict[str, Any], seed: int, used: set[tuple[int, int]]) -> int:
        """The row a sample trains as (with table seed ``seed``); records it in ``used``."""
        rows = self.rows_near(hparams)
        row = rows[0]
        if self.fresh:
            row = next((r for r in rows if (r, seed) not in used), rows[0])
        used.add((row, seed))
        return row

    def kiln_hyperparameters(self) -> dict[str, Any]:
        if self.mapping == "ids":
            return {"config_id": {"type": "categorical", "vals": list(range(self.n_configs))}}
        out: dict[str, Any] = {}
        for s in self.space:
            if s["type"] == "categorical":
                out[s["name"]] = {"type": "categorical", "vals": s["vals"]}
            elif s["type"] == "log":
                out[s["name"]] = {"type": "log", "base": s["base"], "minval": s["min"], "maxval": s["max"]}
            else:
                out[s["name"]] = {"type": "double", "minval": s["min"], "maxval": s["max"]}
        return out

    def optuna_params(self, trial: Any) -> dict[str, Any]:
        if self.mapping == "ids":
            return {"config_id": trial.suggest_categorical("config_id", list(range(self.n_configs)))}
        out: dict[str, Any] = {}
        for s in self.space:
            name = s["name"]
            if s["type"] == "categorical":
                out[name] = trial.suggest_categorical(name, s["vals"])
            elif s["type"] == "log":
                lo, hi = s["base"] ** s["min"], s["base"] ** s["max"]
                out[name] = trial.suggest_float(name, lo, hi, log=True)
            else:
                out[name] = trial.suggest_float(name, s["min"], s["max"])
        return out

    def random_rows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` rows as a random search draws them (for the large-sample random reference)."""
        if self.mapping == "ids":
            return rng.integers(self.n_configs, size=n)
        out = np.empty(n, np.int64)
        cat_draws = {s["name"]: rng.integers(len(s["vals"]), size=n) for s in self.cats}
        cont = rng.uniform(size=(n, len(self.cont)))
        keys = [tuple(self.cats[j]["vals"][cat_draws[s["name"]][i]] for j, s in enumerate(self.cats)) for i in range(n)]
        for key in set(keys):
            idx = np.array([i for i, k in enumerate(keys) if k == key])
            rows, coords = self.cells[key]
            d = ((cont[idx, None, :] - coords[None, :, :]) ** 2).sum(2)
            out[idx] = rows[d.argmin(1)]
        return out


# ---------------------------------------------------------------------------------------------
# The simulation core: workers, clock, work accounting, incumbent
# ---------------------------------------------------------------------------------------------


@dataclass
class SimTrial:
    key: Any  # the method's handle: Kiln request id or Optuna trial
    row: int
    seed: int
    target: int  # train up to this many units, then pause or finish
    progress: int = 0
    status: str = "queued"  # queued | running | paused | exited
    worker: int = -1
    unit_start: float = 0.0
    unit_secs: float = 0.0
    stop_requested: bool = False


@dataclass
class RunResult:
    method: str
    workers: int
    seed: int
    hits: list[dict[str, float] | None]  # per target level: units, epochs, seconds, test, trials
    trace: list[tuple[float, float, float, float]]  # (epochs, seconds, incumbent val, its test)
    epochs_total: float
    seconds_total: float
    trials: int
    final_val: float
    final_test: float
    wall_s: float


class Simulation:
    """The event loop shared by every method; subclasses decide what trials run and when they stop."""

    def __init__(self, table: Table, workers: int, cap_units: float, cap_trials: int) -> None:
        self.table = table
        self.cap_trials = cap_trials
        self.n_workers = workers
        self.workers: list[SimTrial | None] = [None] * workers
        self.tokens = [0] * workers
        self.heap: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.now = 0.0
        self.units_done = 0.0
        self.cap_units = cap_units
        self.n_trials = 0
        self.best_val = -math.inf
        self.best_test = math.nan
        self.trace: list[tuple[float, float, float, float]] = []
        self.hits: list[dict[str, float] | None] = [None] * len(table.targets)
        self.done = False
        self.used: set[tuple[int, int]] = set()  # (row, seed) pairs this run trained

    # accounting ---------------------------------------------------------------------------------

    def consumed_units(self) -> float:
        partial = 0.0
        for t in self.workers:
            if t is not None and t.unit_secs > 0:
                partial += min(1.0, (self.now - t.unit_start) / t.unit_secs)
        return self.units_done + partial

    def observe(self, trial: SimTrial, unit: int) -> float:
        """A validation at ``unit`` (1-based) of ``trial``: update the incumbent, check the targets."""
        v = self.table.val[trial.row, trial.seed, unit - 1]
        if v > self.best_val:
            self.best_val = v
            self.best_test = self.table.test[trial.row, trial.seed, unit - 1]
            used = self.consumed_units()
            epochs = used / self.table.units_per_epoch
            self.trace.append((epochs, self.now, v, self.best_test))
            for i, target in enumerate(self.table.targets):
                if self.hits[i] is None and v >= target:
                    self.hits[i] = {
                        "epochs": epochs,
                        "seconds": self.now,
                        "test": self.best_test,
                        "trials": self.n_trials,
                    }
            if all(h is not None for h in self.hits):
                self.done = True
        return v

    # workers ------------------------------------------------------------------------------------

    def free_worker(self) -> int | None:
        for w, t in enumerate(self.workers):
            if t is None:
                return w
        return None

    def start_on(self, w: int, trial: SimTrial) -> None:
        trial.status = "running"
        trial.worker = w
        self.workers[w] = trial
        self.schedule_unit(trial)

    def schedule_unit(self, trial: SimTrial) -> None:
        w = trial.worker
        trial.unit_start = self.now
        trial.unit_secs = float(self.table.seconds[trial.row, trial.seed, trial.progress])
        self.tokens[w] += 1
        self.seq += 1
        heapq.heappush(self.heap, (self.now + trial.unit_secs, self.seq, w, self.tokens[w]))

    def release(self, trial: SimTrial) -> None:
        """Take ``trial`` off its worker now, charging the part of the current unit it trained."""
        if trial.status != "running":
            return
        if trial.unit_secs > 0:
            self.units_done += min(1.0, (self.now - trial.unit_start) / trial.unit_secs)
        trial.unit_secs = 0.0
        self.tokens[trial.worker] += 1  # its pending unit event is void
        self.workers[trial.worker] = None
        trial.worker = -1

    def between_units(self, trial: SimTrial) -> None:
        """The unit just ended: nothing is in flight until the next one is scheduled."""
        trial.unit_start = self.now
        trial.unit_secs = 0.0

    # the loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        self.begin()
        self.fill()
        while self.heap and not self.done:
            t, _, w, token = heapq.heappop(self.heap)
            if token != self.tokens[w]:
                continue
            self.now = t
            trial = self.workers[w]
            assert trial is not None
            trial.progress += 1
            self.units_done += 1
            self.between_units(trial)
            self.on_unit(trial)
            if self.done or self.units_done >= self.cap_units or self.n_trials > self.cap_trials:
                break
            self.fill()

    def begin(self) -> None:
        raise NotImplementedError

    def fill(self) -> None:
        raise NotImplementedError

    def on_unit(self, trial: SimTrial) -> None:
        raise NotImplementedError


class KilnSimulation(Simulation):
    """A Kiln method, driven like Kiln's searcher core and scheduler drive it."""

    def __init__(
        self, table: Table, workers: int, caps: tuple[float, int], searcher: dict[str, Any], seed: int
    ) -> None:
        super().__init__(table, workers, *caps)
        raw = {
            "name": "hpo-replay",
            "entrypoint": "model_def:Trial",
            "hyperparameters": table.kiln_hyperparameters(),
            "searcher": {
                "metric": "val_metric",
                "smaller_is_better": table.sign < 0,
                "time_metric": "units",
                "max_time": table.n_units,
                "max_concurrent_trials": workers,
                **searcher,
            },
        }
        self.config, _ = parse_config(raw)
        self.ctx = SearchContext(self.config, seed)
        self.method = new_method(self.config)
        self.trials: dict[int, SimTrial] = {}
        self.queue: deque[int] = deque()
        self.exits: deque[tuple[int, str]] = deque()
        self.shutdown = False
        self.full = table.n_units

    def begin(self) -> None:
        self.apply(self.method.initial_trials(self.ctx))

    def fill(self) -> None:
        while self.queue:
            w = self.free_worker()
            if w is None:
                return
            rid = self.queue.popleft()
            trial = self.trials[rid]
            if trial.status == "queued":
                self.start_on(w, trial)

    def on_unit(self, trial: SimTrial) -> None:
        value = self.observe(trial, trial.progress)  # the table's score: larger is better
        raw = float(value) * self.table.sign  # the metric as the trial reports it
        self.apply(self.method.validation_reported(self.ctx, trial.key, raw, trial.progress))
        if trial.status != "running":
            return
        if trial.progress >= trial.target:
            self.release(trial)
            if trial.target >= self.full:
                self.exit(trial, "completed")
            else:
                trial.status = "paused"  # checkpointed; waits for ResumeTrial or StopTrial
        else:
            self.schedule_unit(trial)

    def exit(self, trial: SimTrial, kind: str) -> None:
        self.release(trial)
        trial.status = "exited"
        self.exits.append((trial.key, kind))
        self.drain()

    def drain(self) -> None:
        while self.exits:
            rid, kind = self.exits.popleft()
            self.apply(self.method.trial_exited(self.ctx, rid, kind))

    def apply(self, decisions: list) -> None:
        for d in decisions:
            if isinstance(d, CreateTrial):
                if self.shutdown or d.request_id in self.trials:
                    continue
                table_seed = d.seed % self.table.n_seeds
                row = self.table.assign(d.hparams, table_seed, self.used)
                target = d.max_length if d.max_length is not None else self.full
                self.trials[d.request_id] = SimTrial(d.request_id, row, table_seed, target)
                self.n_trials += 1
                self.queue.append(d.request_id)
                self.apply(self.method.trial_created(self.ctx, d.request_id))
            elif isinstance(d, StopTrial):
                trial = self.trials.get(d.request_id)
                if trial is None or trial.status == "exited":
                    continue
                trial.stop_requested = True
                self.exit(trial, "completed")  # running, queued or paused: it checkpoints and ends now
            elif isinstance(d, ResumeTrial):
                trial = self.trials.get(d.request_id)
                if trial is None or trial.status == "exited" or trial.stop_requested:
                    continue
                trial.target = max(trial.target, d.max_length)
                if trial.status == "paused":
                    trial.status = "queued"
                    self.queue.append(d.request_id)
            elif isinstance(d, Shutdown):
                self.shutdown = True
        self.drain()


class OptunaSimulation(Simulation):
    """An Optuna sampler x pruner through ask/tell; a free worker asks for the next trial."""

    def __init__(self, table: Table, workers: int, caps: tuple[float, int], sampler: str, pruner: str, seed: int):
        super().__init__(table, workers, *caps)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.seed = seed
        n = table.n_units
        # Rungs at 3, 9, 27, 81, 243 units: the same as Kiln's adaptive_asha with divisor 3 on this table.
        min_resource = max(1, int(n / 3**4))
        pruners = {
            "none": lambda: optuna.pruners.NopPruner(),
            "sha": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=3),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(
                min_resource=min_resource, max_resource=n, reduction_factor=3
            ),
            "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=min_resource),
        }
        samplers = {
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        }
        self.study = optuna.create_study(
            study_name=f"replay-{seed}",
            direction="maximize",
            sampler=samplers[sampler](),
            pruner=pruners[pruner](),
        )
        self.full = n

    def begin(self) -> None:
        pass

    def fill(self) -> None:
        while (w := self.free_worker()) is not None:
            ot = self.study.ask()
            params = self.table.optuna_params(ot)
            s = random.Random(f"{self.seed}:{ot.number}").randrange(self.table.n_seeds)
            row = self.table.assign(params, s, self.used)
            self.n_trials += 1
            self.start_on(w, SimTrial(ot, row, s, self.full))

    def on_unit(self, trial: SimTrial) -> None:
        value = self.observe(trial, trial.progress)
        ot = trial.key
        ot.report(float(value), trial.progress)
        if trial.progress >= self.full:
            self.release(trial)
            self.study.tell(ot, float(value))
            trial.status = "exited"
        elif ot.should_prune():
            self.release(trial)
            self.study.tell(ot, state=self.optuna.trial.TrialState.PRUNED)
            trial.status = "exited"
        else:
            self.schedule_unit(trial)


# ---------------------------------------------------------------------------------------------
# The methods compared
# ---------------------------------------------------------------------------------------------

BIG = 100_000  # max_trials for Kiln's methods: never the limit; the work cap ends a run
KILN_METHODS: dict[str, dict[str, Any]] = {
    "kiln-random": {"name": "random", "max_trials": BIG},
    "kiln-asha-aggressive": {"name": "adaptive_asha", "mode": "aggressive", "divisor": 3, "max_trials": BIG},
    "kiln-asha-standard": {"name": "adaptive_asha", "mode": "standard", "divisor": 3, "max_trials": BIG},
    "kiln-asha-conservative": {"name": "adaptive_asha", "mode": "conservative", "divisor": 3, "max_trials": BIG},
    "kiln-asha-standard-div4": {"name": "adaptive_asha", "mode": "standard", "max_trials": BIG},
    "kiln-asha-promotion": {
        "name": "adaptive_asha", "mode": "aggressive", "divisor": 3, "stop_once": False, "max_trials": BIG,
    },
    "kiln-asha-6rungs": {"name": "adaptive_asha", "bracket_rungs": [6], "divisor": 3, "max_trials": BIG},
}
_PROMO = {"name": "adaptive_asha", "mode": "aggressive", "divisor": 3, "stop_once": False, "max_trials": BIG}
KILN_METHODS.update({
    "kiln-promo-pending": {**_PROMO, "promotion": "pending_aware"},
    "kiln-promo-extrap": {**_PROMO, "rung_metric": "extrapolated"},
    "kiln-bohb": {**_PROMO, "sampler": "tpe"},
    "kiln-bohb-pending": {**_PROMO, "sampler": "tpe", "promotion": "pending_aware"},
    "kiln-bohb-extrap": {**_PROMO, "sampler": "tpe", "rung_metric": "extrapolated"},
    "kiln-bohb-all": {**_PROMO, "sampler": "tpe", "promotion": "pending_aware", "rung_metric": "extrapolated"},
})
OPTUNA_METHODS = {
    f"optuna-{s}-{p}": (s, p) for s in ("random", "tpe") for p in ("sha", "hyperband", "median", "none")
}
ALL_METHODS = [*KILN_METHODS, *OPTUNA_METHODS]


def ceiling(table: Table, method: str) -> tuple[float, str] | None:
    """Successive halving's ceiling eta^s/(s+1) for the method's most aggressive bracket."""
    n = table.n_units
    if method in KILN_METHODS:
        spec = KILN_METHODS[method]
        if spec["name"] != "adaptive_asha":
            return None
        divisor = float(spec.get("divisor", 4.0))
        if spec.get("bracket_rungs"):
            rungs = max(spec["bracket_rungs"])
        else:
            rungs = asha_math.num_rungs(n, spec["max_trials"], divisor, spec.get("max_rungs", 5))
    elif OPTUNA_METHODS[method][1] in ("sha", "hyperband"):
        divisor = 3.0
        rungs = 5
    else:
        return None
    s = rungs - 1
    return divisor**s / (s + 1), f"{divisor:g}^{s}/{s + 1}"


def run_one(table: Table, method: str, workers: int, seed: int, caps: tuple[float, int]) -> RunResult:
    """One replay; ``caps`` = (work cap in units, trial cap)."""
    t0 = time.perf_counter()
    if method in KILN_METHODS:
        sim: Simulation = KilnSimulation(table, workers, caps, KILN_METHODS[method], seed)
    else:
        sampler, pruner = OPTUNA_METHODS[method]
        sim = OptunaSimulation(table, workers, caps, sampler, pruner, seed)
    sim.run()
    upe = table.units_per_epoch
    return RunResult(
        method=method,
        workers=workers,
        seed=seed,
        hits=sim.hits,
        trace=sim.trace,
        epochs_total=sim.consumed_units() / upe,
        seconds_total=sim.now,
        trials=sim.n_trials,
        final_val=sim.best_val,
        final_test=sim.best_test,
        wall_s=time.perf_counter() - t0,
    )


def random_reference(table: Table, draws: int = 4000, seed: int = 12345) -> list[dict[str, float]]:
    """Random search with one worker, many repetitions (numpy): stable epochs-to-target quantiles."""
    rng = np.random.default_rng(seed)
    upe = table.units_per_epoch
    out = []
    rows = table.random_rows(rng, draws * 50)
    seeds = rng.integers(table.n_seeds, size=draws * 50)
    per_target = []
    for target in table.targets:
        reach = table.val[rows, seeds] >= target  # [draw, unit]
        first = np.where(reach.any(1), reach.argmax(1) + 1, -1)
        per_target.append(first)
    for i in range(len(table.targets)):
        first = per_target[i].reshape(draws, 50)
        epochs = []
        for d in range(draws):
            k = np.flatnonzero(first[d] > 0)
            if len(k) == 0:
                epochs.append(math.inf)
            else:
                epochs.append((k[0] * table.n_units + first[d, k[0]]) / upe)
        p = float((per_target[i] > 0).mean())
        out.append({"median": float(np.median(epochs)), "p_trial": p, "mean": float(np.mean(epochs))})
    return out


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def summarize(runs: list[RunResult], level: int, what: str) -> tuple[float, float, float, int]:
    """Median, 25th and 75th percentile of ``what`` at target ``level`` (inf: not reached), reached count."""
    arr = np.sort([r.hits[level][what] if r.hits[level] is not None else math.inf for r in runs])
    if len(arr) == 0:
        return math.nan, math.nan, math.nan, 0
    q1 = float(np.quantile(arr, 0.25, method="lower"))
    q3 = float(np.quantile(arr, 0.75, method="higher"))
    return float(np.median(arr)), q1, q3, int(np.isfinite(arr).sum())


def fmt(x: float, digits: int = 0) -> str:
    if math.isinf(x):
        return "∞"
    if math.isnan(x):
        return "-"
    return f"{x:,.{digits}f}"


def group(results: list[RunResult]) -> dict[tuple[str, int], list[RunResult]]:
    by: dict[tuple[str, int], list[RunResult]] = {}
    for r in results:
        by.setdefault((r.method, r.workers), []).append(r)
    return by


def report(
    table: Table, results: list[RunResult], cap_epochs: float, cap_trials: tuple[int, int], ref: list[dict[str, float]]
) -> str:
    lines: list[str] = []
    names = [f"{round(lvl * 100, 1):g}%" for lvl in TARGET_LEVELS]
    lines.append(
        f"Table `{table.path.name}`: {table.n_configs} configs x {table.n_seeds} seeds x {table.n_units} units "
        f"({table.n_units // table.units_per_epoch} epochs of {table.units_per_epoch} units); best mean final "
        f"validation accuracy {table.best_mean_final:.4f}; mapping `{table.mapping}`."
    )
    lines.append("")
    lines.append(
        "| target | val. acc. | full-length runs reaching it (any unit / final) | a random draw reaching it "
        "| random search, 1 worker, median epochs to it (4000 repetitions) |"
    )
    lines.append("|---|---|---|---|---|")
    for i, name in enumerate(names):
        lines.append(
            f"| {name} | {table.targets[i]:.4f} | {100 * table.reach_fraction[i]:.2f}% / "
            f"{100 * table.reach_fraction_final[i]:.2f}% | {100 * ref[i]['p_trial']:.2f}% | {fmt(ref[i]['median'])} |"
        )
    lines.append("")
    by = group(results)
    methods = list(dict.fromkeys(r.method for r in results))
    for w in sorted({r.workers for r in results}):
        base = by.get(("kiln-random", w))
        lines.append(
            f"#### {w} worker{'s' if w > 1 else ''}: epochs consumed until the incumbent reaches the target "
            f"(median [25th–75th percentile], runs that reached it), and × = random's median / the method's"
        )
        lines.append("")
        lines.append(
            "Seeds per method: the second number in parentheses; "
            f"caps per run: {cap_epochs:,.0f} epochs of work and {cap_trials[0]:,} trials ({cap_trials[1]:,} for TPE, "
            "whose ask() slows with every trial); ∞: not reached within them."
        )
        lines.append("")
        header = "| method | ceiling |"
        sep = "|---|---|"
        for name in names:
            header += f" {name} epochs | × |"
            sep += "---:|---:|"
        header += f" sim. s to {names[-1]} | × | test acc. at {names[-1]} |"
        sep += "---:|---:|---:|"
        lines += [header, sep]
        for m in methods:
            runs = by[(m, w)]
            c = ceiling(table, m)
            row = f"| {m} | {fmt(c[0], 1) + '×' if c else '-'} |"
            for i in range(len(names)):
                med, q1, q3, n = summarize(runs, i, "epochs")
                row += (f" {fmt(med)} [{fmt(q1)}–{fmt(q3)}] ({n}/{len(runs)}) |"
                        f" {speedup(base, med, i, 'epochs', cap_epochs)} |")
            med_s = summarize(runs, len(names) - 1, "seconds")[0]
            tests = [r.hits[-1]["test"] for r in runs if r.hits[-1] is not None]
            row += f" {fmt(med_s)} | {speedup(base, med_s, len(names) - 1, 'seconds')} |"
            row += f" {fmt(float(np.median(tests)), 3) if tests else '-'} |"
            lines.append(row)
        lines.append("")
    lines += verdict(table, results, names)
    return "\n".join(lines)


def _epochs(runs: list[RunResult], level: int) -> np.ndarray:
    return np.array([r.hits[level]["epochs"] if r.hits[level] is not None else math.inf for r in runs])


def ratio_ci(num: np.ndarray, den: np.ndarray, resamples: int = 2000) -> tuple[float, float]:
    """A 90% bootstrap interval of median(num) / median(den) (seeded: the report is deterministic)."""
    rng = np.random.default_rng(0)
    r = [
        np.median(rng.choice(num, len(num))) / np.median(rng.choice(den, len(den)))
        for _ in range(resamples)
    ]
    lo, hi = np.nanpercentile(np.array(r, dtype=float), [5, 95])
    return float(lo), float(hi)


def verdict(table: Table, results: list[RunResult], names: list[str]) -> list[str]:
    """The issue's target: adaptive_asha >= 10x fewer epochs than random (median), and no worse than
    Optuna's best pruner. Per worker count and target: the best adaptive_asha mode (stopping-based,
    divisor 3) against random and against the best Optuna pruner (random sampler; any sampler), with
    90% bootstrap intervals over the seeds."""
    by = group(results)
    modes = [m for m in ("kiln-asha-aggressive", "kiln-asha-standard", "kiln-asha-conservative")
             if any(k[0] == m for k in by)]
    pruned = [m for m in OPTUNA_METHODS if OPTUNA_METHODS[m][1] != "none" and any(k[0] == m for k in by)]
    if not modes or not pruned:
        return []
    c = ceiling(table, modes[0])
    lines = [
        "#### The issue's target: adaptive_asha ≥ 10× fewer epochs than random (median) and no worse than "
        "Optuna's best pruner",
        "",
        f"Ceiling of successive halving on this table with divisor 3 and {table.n_units} units: "
        f"{c[1] if c else '-'} = {fmt(c[0], 1) if c else '-'}×. Brackets: 90% bootstrap intervals over the seeds.",
        "",
        "| workers | target | random | best adaptive_asha mode | × vs random | best Optuna pruner, random sampler "
        "| × | best Optuna pruner, any sampler | × | adaptive_asha epochs / best Optuna's |",
        "|---|---|---:|---|---:|---|---:|---|---:|---:|",
    ]
    for w in sorted({r.workers for r in results}):
        base = by.get(("kiln-random", w))
        if not base:
            continue
        for i, name in enumerate(names):
            b = _epochs(base, i)
            bmed = float(np.median(b))

            def best(cands: list[str], w: str = w, i: int = i) -> tuple[str, np.ndarray]:
                meds = [(float(np.median(_epochs(by[(m, w)], i))), m) for m in cands if (m, w) in by]
                _, m = min(meds)
                return m, _epochs(by[(m, w)], i)

            am, a = best(modes)
            om, o = best([m for m in pruned if OPTUNA_METHODS[m][0] == "random"] or pruned)
            xm, x = best(pruned)
            amed, omed, xmed = (float(np.median(v)) for v in (a, o, x))

            def cell(num: np.ndarray, den: np.ndarray, value: float) -> str:
                if not math.isfinite(value):
                    return "-"
                lo, hi = ratio_ci(num, den)
                return f"{value:.2f} [{lo:.2f}–{hi:.2f}]"

            lines.append(
                f"| {w} | {name} | {fmt(bmed)} | {am} ({fmt(amed)}) | {cell(b, a, bmed / amed)} "
                f"| {om} ({fmt(omed)}) | {cell(b, o, bmed / omed)} | {xm} ({fmt(xmed)}) | {cell(b, x, bmed / xmed)} "
                f"| {cell(a, x, amed / xmed)} |"
            )
    lines.append("")
    return lines


def speedup(base: list[RunResult] | None, med: float, level: int, what: str, cap: float = math.nan) -> str:
    if not base:
        return "-"
    bmed = summarize(base, level, what)[0]
    if math.isinf(med):
        return f"<{bmed / cap:.1f}" if not math.isinf(bmed) and not math.isnan(cap) else "-"
    if math.isinf(bmed):
        return "-"
    return f"{bmed / med:.1f}"


def plot(table: Table, results: list[RunResult], out_dir: Path, cap_epochs: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    grid = np.logspace(0, math.log10(cap_epochs), 200)
    by: dict[tuple[str, int], list[RunResult]] = {}
    for r in results:
        by.setdefault((r.method, r.workers), []).append(r)
    methods = list(dict.fromkeys(r.method for r in results))
    for w in sorted({r.workers for r in results}):
        fig, ax = plt.subplots(figsize=(9, 6))
        for j, m in enumerate(methods):
            curves = []
            for r in by[(m, w)]:
                xs = np.array([t[0] for t in r.trace])
                ys = np.array([t[2] for t in r.trace])
                idx = np.searchsorted(xs, grid, side="right") - 1
                regret = np.where(idx >= 0, 1 - ys[np.maximum(idx, 0)] / table.best_mean_final, np.nan)
                # after the run ended (hardest target reached) the incumbent stays where it was
                curves.append(regret)
            med = np.maximum(np.nanmedian(np.array(curves), axis=0), 1e-3)
            style = "-" if m.startswith("kiln") else "--"
            ax.plot(grid, med, style, label=m, color=plt.cm.tab20(j % 20), lw=1.2)
        for lvl in TARGET_LEVELS:
            ax.axhline(1 - lvl, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(9e-4, 1)
        ax.set_xlabel("epochs consumed (all trials)")
        ax.set_ylabel("regret: 1 - incumbent val. acc. / best mean final val. acc.\n"
                      "(median over seeds; grey: the 3 targets)")
        ax.set_title(
            f"HPO replay on {table.path.name}, {w} worker(s); a run stops at the {TARGET_LEVELS[-1]:.1%} target;"
            " regret floored at 1e-3",
            fontsize=9,
        )
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        p = out_dir / f"regret_w{w}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


_TABLE: Table | None = None


def _init_worker(path: str, mapping: str) -> None:
    global _TABLE
    _TABLE = Table(Path(path), mapping)


def _task(task: tuple[str, int, int, tuple[float, int]]) -> RunResult:
    assert _TABLE is not None
    return run_one(_TABLE, *task)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default=str(HERE / "table.npz"))
    p.add_argument("--mapping", choices=["nearest", "ids"], default="nearest")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--seeds", type=int, default=100, help="seeds per method (Kiln, Optuna RandomSampler)")
    p.add_argument("--tpe-seeds", type=int, default=10, help="seeds for Optuna TPESampler (slow: ask() is O(trials))")
    p.add_argument("--baseline-seeds", type=int, default=1000, help="seeds for kiln-random, the denominator")
    p.add_argument("--quick", action="store_true", help="leave out the TPE rows (most of the run time)")
    p.add_argument("--cap-epochs", type=float, default=10_000, help="work cap per run, in epochs")
    p.add_argument("--cap-trials", type=int, default=10_000, help="trial cap per run")
    p.add_argument("--tpe-cap-trials", type=int, default=1000, help="trial cap per TPE run (ask() is O(trials))")
    p.add_argument("--all", action="store_true", help="every method, 1/2/4 workers; write results/")
    p.add_argument("--jobs", type=int, default=1, help="processes")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--from-runs", help="re-make the report and plots from a runs.json.gz, replaying nothing")
    args = p.parse_args()
    table = Table(Path(args.table), args.mapping)
    methods = ALL_METHODS if args.all else args.methods.split(",")
    if args.quick:
        methods = [m for m in methods if not m.startswith("optuna-tpe")]

    def n_seeds(m: str) -> int:
        if m == "kiln-random":
            return args.baseline_seeds
        return args.tpe_seeds if m.startswith("optuna-tpe") else args.seeds

    workers = [1, 2, 4] if args.all else [int(w) for w in args.workers.split(",")]
    def caps(m: str) -> tuple[float, int]:
        trials = args.tpe_cap_trials if m.startswith("optuna-tpe") else args.cap_trials
        return args.cap_epochs * table.units_per_epoch, trials

    tasks = [
        (m, w, s, caps(m))
        for m in methods
        for w in workers
        for s in range(n_seeds(m))
    ]
    t0 = time.perf_counter()
    results: list[RunResult] = []
    if args.from_runs:
        with gzip.open(args.from_runs, "rt") as f:
            results = [RunResult(**r) for r in json.load(f)]
    elif args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.jobs, _init_worker, (args.table, args.mapping)) as pool:
            results = list(pool.imap(_task, tasks, chunksize=1))
    else:
        _init_worker(args.table, args.mapping)
        results = [_task(t) for t in tasks]
    for (m, w), runs in group(results).items():
        med = summarize(runs, len(TARGET_LEVELS) - 1, "epochs")[0]
        print(
            f"{m:28s} w={w}: median epochs to {TARGET_LEVELS[-1]:.1%}: {fmt(med)}  "
            f"trials/run {statistics.mean(r.trials for r in runs):.0f}  "
            f"replay cpu {sum(r.wall_s for r in runs):.1f}s",
            file=sys.stderr,
        )
    ref = random_reference(table)
    text = report(table, results, args.cap_epochs, (args.cap_trials, args.tpe_cap_trials), ref)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    if not args.from_runs:
        # Every run's hits and incumbent trace (about 10 MB): for the default --out, kept out of git in
        # the ignored build/; for any other --out, next to the report.
        runs_path = HERE / "build" / "runs.json.gz" if out == HERE / "results" else out / "runs.json.gz"
        runs_path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(runs_path, "wt") as f:
            json.dump([r.__dict__ for r in results], f)
    for path in plot(table, results, out, args.cap_epochs):
        print(f"wrote {path}", file=sys.stderr)
    print(f"total {time.perf_counter() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
