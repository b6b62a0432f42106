"""Startup benchmark: the CLI and SDK's own start, `kiln up` from a fresh state dir, submit-to-first-metric.

CLI part: fresh processes timed from spawn to exit (`python -c pass` as the floor, `import kiln`,
`import kiln.client`, `kiln --help`, `kiln experiment list` against the stack started here, and
`kiln preview-search`, an operator command that loads the searcher on demand).
Stack part: the same digits script run bare (`python train.py`, torch import included) until its first
training report, side by side with the platform doing it, in one run: the bare run is the floor any
platform adds to.
Usage: .venv/bin/python benchmarks/startup/run.py [--runs N] [--cli-only] [--compare-with DIR]

``--compare-with DIR`` times the CLI part of another checkout too (e.g. ``git archive <commit> | tar -x -C DIR``),
interleaved with this one under the same load and against the same stack: before/after numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploy import stack
from deploy.ports import free_port_block
from kiln.client import Client

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits"
KILN = Path(sys.executable).parent / "kiln"  # the console script pip made, as a user runs it


def cli_commands() -> list[tuple[str, list[str]]]:
    """(row label, argv) of each fresh-process measure."""
    py = sys.executable
    return [
        ("`python -c pass` (the floor)", [py, "-c", "pass"]),
        ("`python -c 'import kiln'`", [py, "-c", "import kiln"]),
        ("`python -c 'import kiln.core'` (what training code loads)", [py, "-c", "import kiln.core"]),
        ("`python -c 'import kiln.client'` (SDK)", [py, "-c", "import kiln.client"]),
        ("`kiln --help`", [str(KILN), "--help"]),
        ("`kiln experiment list` (a typical call to the gateway)", [str(KILN), "experiment", "list"]),
        ("`kiln preview-search examples/digits/adaptive.yaml`",
         [str(KILN), "preview-search", str(DIGITS / "adaptive.yaml")]),
    ]


def time_process(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    """Seconds from spawning ``argv`` to its exit; it must succeed."""
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def cli_rows(
    master: str, token: str, runs: int, trees: list[Path]
) -> tuple[float, list[tuple[str, list[list[float]]]]]:
    """Each CLI measure ``runs`` times per checkout in ``trees``, interleaved so that a burst of load on the
    machine hits them all alike.

    The first tree is this one (the editable install); another is put first on ``PYTHONPATH`` and is the
    working directory (``python -c`` looks there first). Returns the 1-minute load average at the start
    (the machine is shared) and, per row, the samples of each tree."""
    load = os.getloadavg()[0]
    envs = []
    for tree in trees:
        env = {**os.environ, "KILN_MASTER": master, "KILN_TOKEN": token}
        if tree != REPO:
            env["PYTHONPATH"] = str(tree)
        envs.append(env)
    commands = cli_commands()
    for _, argv in commands:  # warm the page cache and .pyc files; not counted
        for tree, env in zip(trees, envs, strict=True):
            time_process(argv, env, tree)
    samples: list[list[list[float]]] = [[[] for _ in trees] for _ in commands]
    for _ in range(runs):
        for i, (_, argv) in enumerate(commands):
            for j, (tree, env) in enumerate(zip(trees, envs, strict=True)):
                samples[i][j].append(time_process(argv, env, tree))
    return load, [(label, times) for (label, _), times in zip(commands, samples, strict=True)]


def bare_first_report() -> float:
    """Seconds from `python train.py` to its first training report line, run by hand."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(DIGITS, tmp, dirs_exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "KILN_CLUSTER_INFO"}
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "train.py", "--epochs", "1"], cwd=tmp, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:
            if "training metrics" in line:
                elapsed = time.monotonic() - start
                proc.kill()
                proc.wait()
                return elapsed
        raise RuntimeError("the bare script never reported")


def kiln_first_report(client: Client) -> float:
    """Seconds from submitting the digits experiment to its first training point being queryable."""
    start = time.monotonic()
    exp = client.create_experiment((DIGITS / "const.yaml").read_text(), DIGITS)
    while True:
        try:
            trials = client.list_trials(exp["id"])
        except Exception:  # noqa: BLE001 - not projected yet
            trials = []
        if trials and client.trial_metrics(trials[0]["id"], kind="training"):
            return time.monotonic() - start
        time.sleep(0.02)


def main() -> None:
    """Run and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cli-runs", type=int, default=20, help="Repetitions of each CLI measure.")
    parser.add_argument("--cli-only", action="store_true", help="Only the CLI part (no trials are run).")
    parser.add_argument("--compare-with", type=Path, default=None, metavar="DIR",
                        help="Another checkout whose CLI part is timed alongside (before/after).")
    args = parser.parse_args()
    main_with(args.runs, args.cli_runs, args.cli_only, args.compare_with)


def main_with(runs: int, cli_runs: int = 20, cli_only: bool = False, compare_with: Path | None = None) -> None:
    """Start a stack on free ports, measure ``runs`` times, stop it, print the tables."""
    state = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    state.chmod(0o755)
    base = free_port_block(16)
    cfg = stack.StackConfig.load(state, nats_port=base, nats_monitor_port=base + 1, pg_port=base + 2,
                                 s3_port=base + 3, http_port=base + 4, s3_ports_base=base + 5, workers=1,
                                 slots_per_worker=1)
    up_s = stack.up(cfg).seconds
    try:
        admin = stack.Credentials.load_or_create(state).admin_password
        token = Client(cfg.master_url, token="").login("admin", admin)["token"]
        client = Client(cfg.master_url, token=token)
        trees = [REPO] + ([compare_with.resolve()] if compare_with else [])
        load, cli = cli_rows(cfg.master_url, token, cli_runs, trees)
        kiln: list[float] = []
        bare: list[float] = []
        for _ in range(0 if cli_only else runs):
            bare.append(bare_first_report())
            kiln.append(kiln_first_report(client))
            time.sleep(6)  # let the trial finish so the next one finds the slot free
    finally:
        stack.down(cfg)
        shutil.rmtree(state, ignore_errors=True)
    print(f"CLI and SDK start, fresh process each, {cli_runs} runs (load average at the start: {load:.1f}):")
    if compare_with is None:
        print("| measure | median s | min s | max s |")
        print("|---|---|---|---|")
        for label, (times,) in cli:
            print(f"| {label} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} |")
    else:
        print(f"| measure | {compare_with.name}: median s (min–max) | this checkout: median s (min–max) |")
        print("|---|---|---|")
        for label, (now, then) in cli:
            print(f"| {label} | {statistics.median(then):.3f} ({min(then):.3f}–{max(then):.3f}) "
                  f"| {statistics.median(now):.3f} ({min(now):.3f}–{max(now):.3f}) |")
    print()
    if cli_only:
        return
    med_k, med_b = statistics.median(kiln), statistics.median(bare)
    print(f"kiln up (fresh state dir, includes initdb): {up_s:.2f} s")
    print("| measure | median s | min s | max s |")
    print("|---|---|---|---|")
    print(f"| bare `python train.py` to first report | {med_b:.2f} | {min(bare):.2f} | {max(bare):.2f} |")
    print(f"| kiln submit to first metric queryable | {med_k:.2f} | {min(kiln):.2f} | {max(kiln):.2f} |")
    print(f"| platform overhead (difference of medians) | {med_k - med_b:.2f} | | |")
    print(f"| ratio kiln / bare | {med_k / med_b:.2f} | | |")


if __name__ == "__main__":
    main()
