"""Build the HPO learning-curve table from real training on MNIST-1D (generated locally).

Every configuration is drawn from the search space below (seeded), then trained for ``--epochs``
epochs with ``--seeds`` training seeds, validating ``--units-per-epoch`` times per epoch. For every
unit (1/units-per-epoch of an epoch) the table holds the validation accuracy, the test accuracy and
the CPU seconds the unit cost (training steps + the validation pass; the test pass is an oracle
measurement, not part of a trial's cost, and is not timed).

Resumable: each finished configuration (all its seeds) is written atomically to
``<work>/c<id>.npz``; a rerun skips those. ``--finalize`` gathers configurations 0..N-1 into the
compressed table. Deterministic given ``--seed`` (except the measured seconds).

    nice -n 10 .venv/bin/python benchmarks/hpo/build_table.py --configs 500       # train (resumable)
    .venv/bin/python benchmarks/hpo/build_table.py --configs 500 --finalize       # -> table.npz
    .venv/bin/python benchmarks/hpo/build_table.py --measure 6                    # time a few runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mnist1d.data import get_dataset_args, make_dataset

HERE = Path(__file__).resolve().parent

# The search space. Continuous dims are drawn uniformly in the transformed coordinate shown.
BATCH_SIZES = [32, 64, 128, 256]
DEPTHS = [1, 2, 3]
SPACE = {
    "log10_lr": (-3.5, 0.0),  # SGD learning rate 3.2e-4 .. 1
    "momentum": (0.0, 0.95),
    "log10_weight_decay": (-6.0, -2.0),
    "log2_width": (4.0, 7.0),  # hidden width 16 .. 128 (rounded to an int)
    "dropout": (0.0, 0.5),
}
# The same space as README/replay see it: natural-unit names; log dims carry their base and exponent range.
SPACE_SPEC = [
    {"name": "lr", "type": "log", "base": 10, "min": -3.5, "max": 0.0},
    {"name": "momentum", "type": "double", "min": 0.0, "max": 0.95},
    {"name": "weight_decay", "type": "log", "base": 10, "min": -6.0, "max": -2.0},
    {"name": "width", "type": "log", "base": 2, "min": 4.0, "max": 7.0},
    {"name": "dropout", "type": "double", "min": 0.0, "max": 0.5},
    {"name": "batch_size", "type": "categorical", "vals": BATCH_SIZES},
    {"name": "depth", "type": "categorical", "vals": DEPTHS},
]
N_TRAIN, N_VAL = 3000, 1000  # of mnist1d's 4000 training examples; its 1000 test examples are the test set


def draw_configs(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` configurations, the same for the same seed (the first k do not depend on n)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in [*SPACE, "batch_size", "depth"]}
    for _ in range(n):
        for name, (lo, hi) in SPACE.items():
            cols[name].append(rng.uniform(lo, hi))
        cols["batch_size"].append(BATCH_SIZES[rng.integers(len(BATCH_SIZES))])
        cols["depth"].append(DEPTHS[rng.integers(len(DEPTHS))])
    out = {k: np.asarray(v) for k, v in cols.items()}
    out["lr"] = 10.0 ** out["log10_lr"]
    out["weight_decay"] = 10.0 ** out["log10_weight_decay"]
    out["width"] = np.rint(2.0 ** out["log2_width"]).astype(np.int64)
    return out


def load_data() -> dict[str, torch.Tensor]:
    """MNIST-1D, generated locally with the package's default arguments (seed 42): no download."""
    d = make_dataset(get_dataset_args())
    x = torch.tensor(d["x"], dtype=torch.float32)
    y = torch.tensor(d["y"], dtype=torch.int64)
    return {
        "x_train": x[:N_TRAIN],
        "y_train": y[:N_TRAIN],
        "x_val": x[N_TRAIN : N_TRAIN + N_VAL],
        "y_val": y[N_TRAIN : N_TRAIN + N_VAL],
        "x_test": torch.tensor(d["x_test"], dtype=torch.float32),
        "y_test": torch.tensor(d["y_test"], dtype=torch.int64),
    }


def make_model(width: int, depth: int, dropout: float) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    fan_in = 40
    for _ in range(depth):
        layers += [torch.nn.Linear(fan_in, width), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
        fan_in = width
    layers.append(torch.nn.Linear(fan_in, 10))
    return torch.nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train_run(cfg: dict, run_seed: int, data: dict, epochs: int, upe: int) -> tuple[np.ndarray, ...]:
    """One (config, seed): per-unit validation accuracy, test accuracy and CPU seconds."""
    torch.manual_seed(run_seed)
    gen = torch.Generator().manual_seed(run_seed)
    model = make_model(int(cfg["width"]), int(cfg["depth"]), float(cfg["dropout"]))
    opt = torch.optim.SGD(
        model.parameters(),
        lr=float(cfg["lr"]),
        momentum=float(cfg["momentum"]),
        weight_decay=float(cfg["weight_decay"]),
    )
    bs = int(cfg["batch_size"])
    steps = math.ceil(N_TRAIN / bs)
    bounds = [round(k * steps / upe) for k in range(upe + 1)]  # unit k trains steps bounds[k]..bounds[k+1]
    n_units = epochs * upe
    val = np.empty(n_units, np.float32)
    test = np.empty(n_units, np.float32)
    secs = np.empty(n_units, np.float32)
    xt, yt = data["x_train"], data["y_train"]
    u = 0
    diverged = False
    for _ in range(epochs):
        perm = torch.randperm(N_TRAIN, generator=gen)
        for k in range(upe):
            t0 = time.thread_time()
            for s in range(bounds[k], bounds[k + 1]):
                idx = perm[s * bs : (s + 1) * bs]
                loss = F.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            val[u] = accuracy(model, data["x_val"], data["y_val"])
            secs[u] = time.thread_time() - t0
            test[u] = accuracy(model, data["x_test"], data["y_test"])
            u += 1
            if not math.isfinite(loss.item()):
                diverged = True
                break
        if diverged:
            break
    if diverged:
        # A diverged (NaN) model stays at its last accuracy; charge the mean measured unit cost.
        val[u:] = val[u - 1]
        test[u:] = test[u - 1]
        secs[u:] = secs[:u].mean()
    return val, test, secs


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
        vals, tests, secs = [], [], []
        for s in range(args.seeds):
            v, t, c = train_run(cfg, run_seed_for(args.seed, cid, s), data, args.epochs, args.units_per_epoch)
            vals.append(v)
            tests.append(t)
            secs.append(c)
        tmp = work / f".c{cid:05d}.tmp.npz"
        np.savez(tmp, val=np.stack(vals), test=np.stack(tests), seconds=np.stack(secs))
        os.replace(tmp, path)
        done_now += 1
        el = time.time() - t_start
        print(
            f"config {cid}: final val {np.mean([v[-1] for v in vals]):.3f} "
            f"cpu {np.sum(secs):.1f}s  ({done_now} done in {el:.0f}s wall)",
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
    out["val"] = np.stack([p["val"] for p in parts])  # [config, seed, unit]
    out["test"] = np.stack([p["test"] for p in parts])
    out["seconds"] = np.stack([p["seconds"] for p in parts])
    out["units_per_epoch"] = np.int64(args.units_per_epoch)
    out["epochs"] = np.int64(args.epochs)
    out["build_seed"] = np.int64(args.seed)
    np.savez_compressed(args.out, **out)
    v = out["val"]
    print(f"wrote {args.out}: {v.shape} ({os.path.getsize(args.out) / 1e6:.1f} MB); "
          f"best mean final val {v[:, :, -1].mean(1).max():.4f}; total CPU {out['seconds'].sum():.0f}s")


def measure(args: argparse.Namespace) -> None:
    configs = draw_configs(max(args.configs, args.measure), args.seed)
    data = load_data()
    for cid in range(args.measure):
        cfg = {k: v[cid] for k, v in configs.items()}
        t0 = time.time()
        v, t, c = train_run(cfg, run_seed_for(args.seed, cid, 0), data, args.measure_epochs, args.units_per_epoch)
        print(
            f"config {cid} bs={cfg['batch_size']} depth={cfg['depth']} width={cfg['width']} lr={cfg['lr']:.2g}: "
            f"{(time.time() - t0) / args.measure_epochs * 1000:.1f} ms wall/epoch, "
            f"{c.sum() / args.measure_epochs * 1000:.1f} ms timed/epoch, val {v[-1]:.3f}",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=int, default=500)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=27)
    p.add_argument("--units-per-epoch", type=int, default=9)
    p.add_argument("--seed", type=int, default=0, help="seed of the configuration draw and the training")
    p.add_argument("--work", default=str(HERE / "build"), help="per-configuration results (resumable)")
    p.add_argument("--out", default=str(HERE / "table.npz"))
    p.add_argument("--finalize", action="store_true")
    p.add_argument("--measure", type=int, default=0, help="only time this many configurations")
    p.add_argument("--measure-epochs", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.measure:
        measure(args)
    elif args.finalize:
        finalize(args)
    else:
        build(args)


if __name__ == "__main__":
    main()
