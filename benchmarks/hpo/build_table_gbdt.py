"""Build the second HPO learning-curve table: gradient-boosted trees on scikit-learn's bundled digits.

A different task and model family from ``build_table.py`` (an MLP on MNIST-1D): scikit-learn's
``HistGradientBoostingClassifier`` on the 8x8 digits images that ship inside the scikit-learn wheel
(``load_digits``; nothing is downloaded). One unit of the time metric is one boosting iteration; every
run boosts ``--iterations`` (243) iterations with early stopping off, and the validation and test scores
after each iteration come from ``staged_predict_proba``. The searcher metric is the validation log loss
(smaller is better, continuous: no ties); the accuracies are kept beside it.

Each configuration is trained with ``--seeds`` seeds (``random_state``: the features each split may use
when ``max_features`` < 1). The CPU seconds of a run's ``fit`` are spread evenly over its iterations (a
boosting iteration costs about the same throughout), and each unit adds its share of the staged
validation pass.

Resumable: each finished configuration is written atomically to ``<work>/c<id>.npz``; a rerun skips
those. ``--finalize`` gathers configurations 0..N-1 into the compressed table.

    nice -n 10 .venv/bin/python benchmarks/hpo/build_table_gbdt.py --configs 199      # train (resumable)
    .venv/bin/python benchmarks/hpo/build_table_gbdt.py --configs 199 --finalize      # -> table_gbdt.npz
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

HERE = Path(__file__).resolve().parent

MAX_BINS = [15, 63, 255]
MAX_DEPTHS = [2, 4, 8, 16]
# Continuous dims, drawn uniformly in the transformed coordinate shown.
SPACE = {
    "log10_learning_rate": (-2.5, 0.0),  # 0.0032 .. 1
    "log2_max_leaf_nodes": (2.0, 7.0),  # 4 .. 128 (rounded)
    "log2_min_samples_leaf": (0.0, 6.0),  # 1 .. 64 (rounded)
    "log10_l2_regularization": (-4.0, 1.0),
    "max_features": (0.2, 1.0),
}
SPACE_SPEC = [
    {"name": "learning_rate", "type": "log", "base": 10, "min": -2.5, "max": 0.0},
    {"name": "max_leaf_nodes", "type": "log", "base": 2, "min": 2.0, "max": 7.0},
    {"name": "min_samples_leaf", "type": "log", "base": 2, "min": 0.0, "max": 6.0},
    {"name": "l2_regularization", "type": "log", "base": 10, "min": -4.0, "max": 1.0},
    {"name": "max_features", "type": "double", "min": 0.2, "max": 1.0},
    {"name": "max_bins", "type": "categorical", "vals": MAX_BINS},
    {"name": "max_depth", "type": "categorical", "vals": MAX_DEPTHS},
]
N_TRAIN, N_VAL = 1000, 500  # of digits' 1,797 images; the other 297 are the test set
EPS = 1e-15


def draw_configs(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` configurations, the same for the same seed (the first k do not depend on n)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in [*SPACE, "max_bins", "max_depth"]}
    for _ in range(n):
        for name, (lo, hi) in SPACE.items():
            cols[name].append(rng.uniform(lo, hi))
        cols["max_bins"].append(MAX_BINS[rng.integers(len(MAX_BINS))])
        cols["max_depth"].append(MAX_DEPTHS[rng.integers(len(MAX_DEPTHS))])
    out = {k: np.asarray(v) for k, v in cols.items()}
    out["learning_rate"] = 10.0 ** out["log10_learning_rate"]
    out["l2_regularization"] = 10.0 ** out["log10_l2_regularization"]
    out["max_leaf_nodes"] = 2.0 ** out["log2_max_leaf_nodes"]
    out["min_samples_leaf"] = 2.0 ** out["log2_min_samples_leaf"]
    return out


def load_data() -> dict[str, np.ndarray]:
    """Digits from the scikit-learn wheel, split (stratified, seeded) into train / validation / test."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, train_size=N_TRAIN, stratify=y, random_state=0)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, train_size=N_VAL, stratify=y_rest, random_state=0)
    return {"x_train": x_tr, "y_train": y_tr, "x_val": x_va, "y_val": y_va, "x_test": x_te, "y_test": y_te}


def _scores(model: HistGradientBoostingClassifier, x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Log loss and accuracy after every boosting iteration."""
    loss = np.empty(n, np.float32)
    acc = np.empty(n, np.float32)
    rows = np.arange(len(y))
    for i, proba in enumerate(model.staged_predict_proba(x)):
        p = np.clip(proba[rows, y], EPS, 1.0)
        loss[i] = -np.log(p).mean() if np.all(np.isfinite(proba)) else np.log(1 / EPS)
        acc[i] = (proba.argmax(1) == y).mean()
    return loss, acc


def train_run(cfg: dict, run_seed: int, data: dict, iterations: int) -> dict[str, np.ndarray]:
    """One (config, seed): per-iteration validation/test log loss and accuracy, and CPU seconds."""
    model = HistGradientBoostingClassifier(
        max_iter=iterations,
        learning_rate=float(cfg["learning_rate"]),
        max_leaf_nodes=int(round(cfg["max_leaf_nodes"])),
        min_samples_leaf=int(round(cfg["min_samples_leaf"])),
        l2_regularization=float(cfg["l2_regularization"]),
        max_features=float(cfg["max_features"]),
        max_bins=int(cfg["max_bins"]),
        max_depth=int(cfg["max_depth"]),
        early_stopping=False,
        random_state=run_seed,
    )
    t0 = time.thread_time()
    model.fit(data["x_train"], data["y_train"])
    fit_s = time.thread_time() - t0
    t0 = time.thread_time()
    val_loss, val_acc = _scores(model, data["x_val"], data["y_val"], iterations)
    val_s = time.thread_time() - t0
    test_loss, test_acc = _scores(model, data["x_test"], data["y_test"], iterations)
    done = model.n_iter_  # fewer than asked only if training stopped (it does not with early_stopping off)
    for a in (val_loss, val_acc, test_loss, test_acc):
        a[done:] = a[done - 1]
    secs = np.full(iterations, (fit_s + val_s) / iterations, np.float32)
    return {"val": val_loss, "val_acc": val_acc, "test": test_loss, "test_acc": test_acc, "seconds": secs}


def run_seed_for(base_seed: int, config_id: int, seed: int) -> int:
    return (base_seed * 1_000_003 + config_id * 101 + seed) % (2**31)


def build(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    configs = draw_configs(args.configs, args.seed)
    data = load_data()
    t_start = time.time()
    done_now = 0
    for cid in range(args.configs):
        path = work / f"c{cid:05d}.npz"
        if path.exists():
            continue
        cfg = {k: v[cid] for k, v in configs.items()}
        runs = [train_run(cfg, run_seed_for(args.seed, cid, s), data, args.iterations) for s in range(args.seeds)]
        tmp = work / f".c{cid:05d}.tmp.npz"
        np.savez(tmp, **{k: np.stack([r[k] for r in runs]) for k in runs[0]})
        os.replace(tmp, path)
        done_now += 1
        print(
            f"config {cid}: final val loss {np.mean([r['val'][-1] for r in runs]):.3f} "
            f"acc {np.mean([r['val_acc'][-1] for r in runs]):.3f} cpu {sum(r['seconds'].sum() for r in runs):.1f}s "
            f"({done_now} done in {time.time() - t_start:.0f}s wall)",
            flush=True,
        )


def finalize(args: argparse.Namespace) -> None:
    work = Path(args.work)
    n = args.configs
    missing = [c for c in range(n) if not (work / f"c{c:05d}.npz").exists()]
    if missing:
        sys.exit(f"{len(missing)} configurations not built yet (first: {missing[0]})")
    parts = [np.load(work / f"c{c:05d}.npz") for c in range(n)]
    configs = draw_configs(n, args.seed)
    out = {f"hp_{s['name']}": configs[s["name"]] for s in SPACE_SPEC}
    out["space"] = np.array(json.dumps(SPACE_SPEC))
    for key in ("val", "test", "val_acc", "test_acc", "seconds"):
        out[key] = np.stack([p[key] for p in parts])  # [config, seed, unit]
    out["units_per_epoch"] = np.int64(1)  # one unit = one boosting iteration; "epochs" below are iterations
    out["epochs"] = np.int64(args.iterations)
    out["build_seed"] = np.int64(args.seed)
    out["metric"] = np.array("validation log loss")
    out["smaller_is_better"] = np.bool_(True)
    out["unit_name"] = np.array("iteration")
    np.savez_compressed(args.out, **out)
    v = out["val"]
    print(f"wrote {args.out}: {v.shape} ({os.path.getsize(args.out) / 1e6:.1f} MB); "
          f"best mean final val loss {v[:, :, -1].mean(1).min():.4f}; total CPU {out['seconds'].sum():.0f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=int, default=199)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--iterations", type=int, default=243)
    p.add_argument("--seed", type=int, default=0, help="seed of the configuration draw and the training")
    p.add_argument("--work", default=str(HERE / "build" / "gbdt"), help="per-configuration results (resumable)")
    p.add_argument("--out", default=str(HERE / "table_gbdt.npz"))
    p.add_argument("--finalize", action="store_true")
    args = p.parse_args()
    with threadpool_limits(1):
        if args.finalize:
            finalize(args)
        else:
            build(args)


if __name__ == "__main__":
    main()
