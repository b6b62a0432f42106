"""The MLflow side of the ingest benchmark; runs under the separate MLflow venv, driven by run.py.

    setup: <python> mlflow_clients.py setup URI EXPERIMENT_NAME TRIALS  -> prints {"runs": [run_id, ...]}
    log:   <python> mlflow_clients.py log URI RUNS_JSON INDICES BATCHES STEPS
           builds every Metric first, prints "ready", waits for one stdin line "go DEADLINE" (epoch
           seconds), then one thread per run logs that run's batches in order with
           ``MlflowClient.log_batch`` (at most 1,000 metrics per call, MLflow's limit), until done or the
           deadline; prints {"batches": [[index, batch_no, points, t_first_call, t_done], ...]}.

One run = one trial, one thread = one client, the same points as the Kiln side (workload.py).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload

MAX_PER_CALL = 1000


def setup(uri: str, name: str, trials: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(name)
    runs = [client.create_run(exp, run_name=f"trial-{i}").info.run_id for i in range(trials)]
    print(json.dumps({"experiment_id": exp, "runs": runs}))


def log(uri: str, runs_json: str, indices: list[int], batches: int, steps: int) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    runs = json.loads(Path(runs_json).read_text())["runs"]
    client = MlflowClient(uri)
    # Every call's payload is built before the clock starts (the Kiln side pre-builds its events too).
    calls: dict[int, list[list[list[Metric]]]] = {}
    for i in indices:
        per_batch = []
        for b in range(batches):
            ms = [Metric(n, v, int(round(at * 1000)), s) for n, s, v, at in workload.points(i, b, steps)]
            per_batch.append([ms[k:k + MAX_PER_CALL] for k in range(0, len(ms), MAX_PER_CALL)])
        calls[i] = per_batch
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    deadline = float(line[1])
    cpu0 = os.times()
    results: list[list[float]] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client_thread(i: int) -> None:
        mine = []
        try:
            for b, chunks in enumerate(calls[i]):
                if time.time() >= deadline:
                    break
                t0 = time.time()
                for chunk in chunks:
                    client.log_batch(runs[i], metrics=chunk)
                mine.append([i, b, sum(len(c) for c in chunks), t0, time.time()])
        except Exception as exc:  # noqa: BLE001 - reported to the driver
            errors.append(f"run {i}: {exc!r}")
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in indices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    print(json.dumps({"batches": results, "errors": errors, "cpu": cpu}), flush=True)


def main() -> None:
    os.environ.setdefault("MLFLOW_HTTP_POOL_MAXSIZE", "64")
    mode = sys.argv[1]
    if mode == "setup":
        setup(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "log":
        log(sys.argv[2], sys.argv[3], [int(x) for x in sys.argv[4].split(",")], int(sys.argv[5]), int(sys.argv[6]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
