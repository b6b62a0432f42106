"""TensorBoard on the whole stack: a Core-API trial's metrics reach TensorBoard's own HTTP API through
``kiln tensorboard start``, and another user cannot read the trial's TensorBoard files."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import REPO, Stack, wait_for

pytestmark = pytest.mark.e2e

STEPS = (10, 20, 30)
TRAIN = textwrap.dedent(f"""\
    import time
    import kiln as det
    from tensorboard.summary import Writer

    with det.core.init() as ctx:
        for step in {STEPS!r}:
            time.sleep(1.0)  # still running when the board starts: it keeps syncing
            ctx.train.report_training_metrics(steps_completed=step, metrics={{"loss": 1.0 / step}})
            ctx.train.report_validation_metrics(steps_completed=step, metrics={{
                "accuracy": step / 100, "per_class_accuracy": {{str(c): c / 10 + step / 1000 for c in range(10)}}}})
        # Files the script writes itself go along: a run of their own, under the trial's.
        writer = Writer(str(ctx.train.get_tensorboard_path() / "custom"))
        writer.add_scalar("lr", 0.125, 30)
        writer.close()
""")
CONFIG = textwrap.dedent("""\
    name: tensorboard
    entrypoint: python3 train.py
    searcher: {name: single, metric: accuracy, smaller_is_better: false, max_length: {batches: 30}}
""")


def _scalars(url: str, run: str, tag: str) -> list[tuple[int, float]]:
    """TensorBoard's own answer for one series: [(step, value)] (empty until it has loaded them)."""
    resp = httpx.get(url + "data/plugin/scalars/scalars", params={"run": run, "tag": tag}, timeout=10.0,
                     trust_env=False)
    return [(int(step), float(value)) for _, step, value in resp.json()] if resp.status_code == 200 else []


def _start_board(s: Stack, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], Any]:
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "tensorboard", "start", *args], cwd=REPO,
                            env=env or s.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or ()], daemon=True).start()
    return proc, lines


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_tensorboard_start_serves_a_running_trials_metrics_and_stops_on_ctrl_c(kiln_stack: Stack,
                                                                              tmp_path: Path) -> None:
    s = kiln_stack
    model = tmp_path / "model"
    model.mkdir()
    (model / "train.py").write_text(TRAIN)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    out = s.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(model))
    assert out.returncode == 0, out.stderr
    experiment_id = int(out.stdout.split("Created experiment ", 1)[1].split()[0])

    # Started while the experiment runs (its trial may not exist yet): the periodic sync brings what comes later.
    proc, lines = _start_board(s, str(experiment_id), "--json", "--sync-interval", "1")
    try:
        started = json.loads(lines.get(timeout=120))
        url, tb_pid = started["url"], started["pid"]
        assert url.startswith("http://127.0.0.1:")
        trials = wait_for(lambda: s.http.get(f"/api/v1/experiments/{experiment_id}/trials").json(), timeout=120.0,
                          what="the trial")
        run = f"{experiment_id}/{trials[0]['id']}"

        loss = wait_for(lambda: len(got := _scalars(url, run, "training/loss")) == len(STEPS) and got,
                        timeout=180.0, what="TensorBoard to show every training point")
        assert [step for step, _ in loss] == list(STEPS)
        assert [v for _, v in loss] == pytest.approx([1.0 / step for step in STEPS], rel=1e-6)
        accuracy = wait_for(lambda: len(got := _scalars(url, run, "validation/accuracy")) == len(STEPS) and got,
                            timeout=60.0, what="every validation")
        assert accuracy == [(step, pytest.approx(step / 100, rel=1e-6)) for step in STEPS]
        for c in range(10):  # the many-series metric: one series per class
            per_class = wait_for(lambda c=c: len(got := _scalars(url, run, f"validation/per_class_accuracy/{c}"))
                                 == len(STEPS) and got, timeout=60.0, what=f"class {c}'s accuracy")
            assert per_class == [(step, pytest.approx(c / 10 + step / 1000, rel=1e-6)) for step in STEPS]
        custom = wait_for(lambda: _scalars(url, f"{run}/custom", "lr"), timeout=60.0, what="the script's own file")
        assert custom == [(30, 0.125)]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    wait_for(lambda: _gone(tb_pid), timeout=30.0, what="TensorBoard to stop with the command")
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=5.0, trust_env=False)

    # Another user may read the experiment but not its trial's TensorBoard files, by the API or the CLI.
    trial_id = trials[0]["id"]
    assert s.http.post("/api/v1/users", json={"username": "tb-eve", "password": "tb-eve-pass-123"}).status_code \
        in (201, 409)
    eve_token = s.login("tb-eve", "tb-eve-pass-123")
    eve = {"Authorization": f"Bearer {eve_token}"}
    listing = s.http.get(f"/api/v1/trials/{trial_id}/tensorboard/files").json()
    some_file = listing["files"][0]["path"]
    for path, params in ((f"/api/v1/trials/{trial_id}/tensorboard/files", None),
                         (f"/api/v1/trials/{trial_id}/tensorboard/file", {"path": some_file})):
        resp = httpx.get(s.cfg.master_url + path, params=params, headers=eve, timeout=30.0)
        assert resp.status_code == 403, (path, resp.status_code, resp.text)
    env = dict(s.env, KILN_TOKEN=eve_token)
    refused = subprocess.run([sys.executable, "-m", "kiln.cli", "tensorboard", "start", str(experiment_id)], cwd=REPO,
                             env=env, text=True, capture_output=True, timeout=120)
    assert refused.returncode == 1 and "only its owner or an admin" in refused.stderr, refused.stderr

    # The owner's own answers: a file's bytes, a bad path (400), a missing file and trial (404).
    whole = s.http.get(f"/api/v1/trials/{trial_id}/tensorboard/file", params={"path": some_file})
    assert whole.status_code == 200 and int(whole.headers["x-file-size"]) == len(whole.content) > 0
    tail = s.http.get(f"/api/v1/trials/{trial_id}/tensorboard/file", params={"path": some_file, "offset": 5})
    assert tail.content == whole.content[5:]
    assert s.http.get(f"/api/v1/trials/{trial_id}/tensorboard/file", params={"path": "../x"}).status_code == 400
    for odd in ("nope", "a?b#c%20d", "ä/ö", "x\x7f", "a b", "x" * 1000, "/".join(["d"] * 400)):
        resp = s.http.get(f"/api/v1/trials/{trial_id}/tensorboard/file", params={"path": odd})
        assert resp.status_code == 404, (odd, resp.status_code, resp.text)
    assert s.http.get("/api/v1/trials/999999999/tensorboard/files").status_code == 404
