"""`kiln experiment create --follow` streams every validation; experiment progress never goes backwards."""

from __future__ import annotations

import re
import textwrap
import threading
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e

STEPS = 5
TRAIN = textwrap.dedent(f"""\
    import time
    import kiln as det

    info = det.get_cluster_info()
    lr = info.trial.hparams["lr"]
    with det.core.init() as ctx:
        for step in range(1, {STEPS} + 1):
            for k in range(4):  # several training points per step: the follower throttles them
                time.sleep(0.05)
                ctx.train.report_training_metrics(steps_completed=step, metrics={{"loss": lr / (step + k)}})
            ctx.train.report_progress(step / {STEPS})
            ctx.train.report_validation_metrics(steps_completed=step, metrics={{"acc": 1 - lr / step}})
""")
CONFIG = textwrap.dedent(f"""\
    name: follow
    entrypoint: python3 train.py
    hyperparameters:
      lr: {{type: double, minval: 0.01, maxval: 0.9}}
    searcher: {{name: random, metric: acc, smaller_is_better: false, max_trials: 4, max_concurrent_trials: 2,
               max_length: {{batches: {STEPS}}}}}
""")


def test_follow_prints_every_validation_and_progress_never_goes_backwards(kiln_stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    samples: list[float] = []
    done = threading.Event()

    def sample_progress() -> None:  # the experiment's progress as a user polling `describe` sees it
        while not done.wait(0.1):
            rows = kiln_stack.http.get("/api/v1/experiments", params={"limit": 1}).json()
            if rows and rows[0]["name"] == "follow":
                got = kiln_stack.http.get(f"/api/v1/experiments/{rows[0]['id']}")
                if got.status_code == 200:
                    samples.append(got.json()["progress"])

    sampler = threading.Thread(target=sample_progress, daemon=True)
    sampler.start()
    try:
        out = kiln_stack.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path), "--follow",
                              timeout=300)
    finally:
        done.set()
        sampler.join()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "\r" not in out.stdout and all(line == line.rstrip() for line in out.stdout.splitlines())  # no padding
    exp_id = int(out.stdout.split("Created experiment ", 1)[1].split()[0])
    printed = re.findall(r"trial (\d+): validation at step (\d+): acc=(\S+)", out.stdout)
    trials = kiln_stack.http.get(f"/api/v1/experiments/{exp_id}/trials").json()
    assert len(trials) == 4
    for t in trials:  # every validation every trial reported is in the output, once
        reported = [m["steps_completed"] for m in
                    kiln_stack.http.get(f"/api/v1/trials/{t['id']}/metrics", params={"kind": "validation"}).json()]
        shown = [int(step) for tid, step, _ in printed if int(tid) == t["id"]]
        assert sorted(shown) == sorted(reported) == list(range(1, STEPS + 1)), out.stdout
    assert re.search(r"trial \d+: step \d+: loss=\S+ {2}\(\d+%\)", out.stdout), out.stdout  # training + progress
    best = re.search(r"best trial (\d+): acc=(\S+)", out.stdout)
    assert best, out.stdout
    assert (best.group(1), best.group(2)) in {(tid, value) for tid, _, value in printed}, out.stdout
    assert samples and samples == sorted(samples), samples  # never backwards
    assert kiln_stack.http.get(f"/api/v1/experiments/{exp_id}").json()["progress"] == 1.0
