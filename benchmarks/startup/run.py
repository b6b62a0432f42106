"""Startup benchmark: `kiln up` from a fresh state dir, and submit-to-first-metric latency.

Side by side in one run, as BENCHMARKS.md asks: the same digits script run bare (`python train.py`,
torch import included) until its first training report, which is the floor any platform adds to.
Usage: .venv/bin/python benchmarks/startup/run.py [--runs N]
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
from kiln.client import Client
from deploy.ports import free_port_block

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits"


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
    main_with(parser.parse_args().runs)


def main_with(runs: int) -> None:
    """Start a stack on free ports, measure ``runs`` times, stop it, print the table."""
    state = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    state.chmod(0o755)
    base = free_port_block(16)
    cfg = stack.StackConfig.load(state, nats_port=base, nats_monitor_port=base + 1, pg_port=base + 2,
                                 s3_port=base + 3, http_port=base + 4, s3_ports_base=base + 5, workers=1,
                                 slots_per_worker=1)
    up_s = stack.up(cfg).seconds
    try:
        admin = stack.Credentials.load_or_create(state).admin_password
        client = Client(cfg.master_url, token=Client(cfg.master_url, token="").login("admin", admin)["token"])
        kiln, bare = [], []
        for _ in range(runs):
            bare.append(bare_first_report())
            kiln.append(kiln_first_report(client))
            time.sleep(6)  # let the trial finish so the next one finds the slot free
    finally:
        stack.down(cfg)
        shutil.rmtree(state, ignore_errors=True)
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
