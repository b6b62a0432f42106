"""Continue, fork and fine-tune on the whole stack, with Determined's semantics.

* fine-tune: ``searcher.source_checkpoint_uuid`` (or ``source_trial_id``) starts every trial from that checkpoint's
  weights: a PyTorchTrial validated at step 0 (``perform_initial_validation``) reports the digest of the weights it
  loaded, which equals the source's at the checkpoint's step; the trial may read the source and no other checkpoint
  of its experiment; the resolved uuid is in the event log;
* continue: an ended single-trial experiment trains on from its latest checkpoint to the longer length;
* fork: a new experiment with the old one's code and its config merged with the overrides;
* the refusals: an unknown or deleted checkpoint, another user's checkpoint, a continue that cannot be.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from schemas import context as code_context
from tests.e2e.conftest import Stack, wait_for

pytestmark = pytest.mark.e2e

# A PyTorchTrial small enough to train in a second; each validation reports a digest of the model's weights.
TINY = textwrap.dedent("""\
    import hashlib

    import torch

    from kiln import pytorch


    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 4, generator=g)
        return torch.utils.data.TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))


    class TinyTrial(pytorch.PyTorchTrial):
        def __init__(self, context):
            self.context = context
            self.model = context.wrap_model(torch.nn.Linear(4, 1))
            self.opt = context.wrap_optimizer(torch.optim.SGD(self.model.parameters(),
                                                              lr=float(context.get_hparam("lr"))))

        def build_training_data_loader(self):
            return pytorch.DataLoader(data(64, 0), batch_size=self.context.get_per_slot_batch_size(), shuffle=True)

        def build_validation_data_loader(self):
            return pytorch.DataLoader(data(16, 1), batch_size=16)

        def train_batch(self, batch, epoch_idx, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.model(x), y)
            self.context.backward(loss)
            self.context.step_optimizer(self.opt)
            return {"loss": loss}

        def evaluate_full_dataset(self, data_loader):
            with torch.no_grad():
                losses = [float(torch.nn.functional.mse_loss(self.model(x), y)) for x, y in data_loader]
            raw = b"".join(p.detach().cpu().numpy().tobytes() for p in self.model.parameters())
            return {"loss": sum(losses) / len(losses), "weights": hashlib.sha256(raw).hexdigest()[:16]}
""")
SOURCE = textwrap.dedent("""\
    name: tiny-source
    entrypoint: tiny:TinyTrial
    hyperparameters: {lr: 0.05, global_batch_size: 8}
    searcher: {name: single, metric: loss, max_length: {batches: 4}}
    min_validation_period: {batches: 2}
    min_checkpoint_period: {batches: 2}
    checkpoint_policy: all
    max_restarts: 0
""")
FINE_TUNE = textwrap.dedent("""\
    name: tiny-fine-tune
    entrypoint: tiny:TinyTrial
    hyperparameters:
      lr: {type: double, minval: 0.01, maxval: 0.1}
      global_batch_size: 8
    searcher: {name: random, metric: loss, max_trials: 2, max_length: {batches: 2}, source_checkpoint_uuid: "UUID"}
    perform_initial_validation: true
    min_validation_period: {batches: 2}
    max_restarts: 0
""")

# Core API, no torch: a counter trained one step at a time, checkpointed every step, resumed from the latest.
COUNTER = textwrap.dedent("""\
    import kiln as det

    info = det.get_cluster_info()
    with det.core.init() as ctx:
        steps = 0
        if info.latest_checkpoint:
            with ctx.checkpoint.restore_path(info.latest_checkpoint) as path:
                steps = int((path / "steps.txt").read_text())
            print(f"resumed from {info.latest_checkpoint} at step {steps}", flush=True)
        for op in ctx.searcher.operations():
            while steps < op.length:
                steps += 1
                ctx.train.report_validation_metrics(steps_completed=steps, metrics={"loss": 1.0 / steps})
                with ctx.checkpoint.store_path({"steps_completed": steps}) as (path, _):
                    (path / "steps.txt").write_text(str(steps))
                op.report_progress(steps)
""")
COUNTER_CONFIG = textwrap.dedent("""\
    name: counter
    entrypoint: python3 counter.py
    searcher: {name: single, metric: loss, max_length: {batches: 3}}
    max_restarts: 0
""")

# Core API, no torch: what a fine-tune trial may read of its source's experiment.
PROBE = textwrap.dedent("""\
    import json
    import kiln as det
    from kiln.core._bus import LinkError

    info = det.get_cluster_info()
    other = info.trial.user_data["other"]
    with det.core.init() as ctx:
        link = ctx._reporter
        out = {"latest": info.latest_checkpoint}
        with ctx.checkpoint.restore_path(info.latest_checkpoint) as path:
            out["source_files"] = sorted(p.name for p in path.iterdir())
            out["source_steps"] = (path / "steps.txt").read_text()
        prefix = "checkpoints/%d/" % info.trial.user_data["source_experiment"]

        def attempt(fn):
            try:
                return "allowed: " + str(fn())[:200]
            except (LinkError, OSError) as exc:
                return "refused: " + str(exc)

        out["other_list"] = attempt(lambda: link.list_keys(prefix + other + "/"))
        out["other_get"] = attempt(lambda: link.presign("GET", prefix + other + "/steps.txt"))
        out["experiment_list"] = attempt(lambda: link.list_keys(prefix))
        out["source_put"] = attempt(lambda: link.presign("PUT", prefix + info.latest_checkpoint + "/steps.txt"))
        print("PROBE " + json.dumps(out), flush=True)
        ctx.train.report_validation_metrics(steps_completed=1, metrics={"loss": 1.0})
""")


def _created(out: Any) -> int:
    assert out.returncode == 0, out.stdout + out.stderr
    return int(out.stdout.split("Created experiment ", 1)[1].split()[0])


def _experiment(s: Stack, experiment_id: int) -> dict[str, Any]:
    resp = s.http.get(f"/api/v1/experiments/{experiment_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _wait_ended(s: Stack, experiment_id: int, timeout: float = 300.0) -> dict[str, Any]:
    return wait_for(lambda: (x := _experiment(s, experiment_id))["ended_at"] and x, timeout=timeout,
                    what=f"experiment {experiment_id} to end")


def _trials(s: Stack, experiment_id: int) -> list[dict[str, Any]]:
    return s.http.get(f"/api/v1/experiments/{experiment_id}/trials").json()  # type: ignore[no-any-return]


def _validations(s: Stack, trial_id: int) -> dict[int, dict[str, Any]]:
    points = s.http.get(f"/api/v1/trials/{trial_id}/metrics", params={"kind": "validation"}).json()
    return {p["steps_completed"]: p["metrics"] for p in points}


def _logs(s: Stack, trial_id: int) -> str:
    return "\n".join(line["text"] for line in s.http.get(f"/api/v1/trials/{trial_id}/logs").json())


def _submitted_event(s: Stack, experiment_id: int) -> dict[str, Any]:
    events = s.http.get(f"/api/v1/experiments/{experiment_id}/events").json()
    return next(e["event"] for e in events if e["type"] == "ExperimentSubmitted")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tiny(kiln_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The source experiment: TinyTrial trained 4 batches, validated and checkpointed at 2 and 4."""
    s = kiln_stack
    root = tmp_path_factory.mktemp("tiny")
    model = root / "model"
    model.mkdir()
    (model / "tiny.py").write_text(TINY)
    (root / "source.yaml").write_text(SOURCE)
    experiment_id = _created(s.kiln("experiment", "create", str(root / "source.yaml"), str(model)))
    assert _wait_ended(s, experiment_id)["state"] == "COMPLETED"
    (trial,) = _trials(s, experiment_id)
    checkpoints = {c["steps_completed"]: c for c in s.http.get(f"/api/v1/trials/{trial['id']}/checkpoints").json()}
    assert set(checkpoints) == {2, 4} and trial["latest_checkpoint"] == checkpoints[4]["uuid"]
    validations = _validations(s, trial["id"])
    assert sorted(validations) == [2, 4]
    return {"root": root, "model": model, "experiment_id": experiment_id, "trial": trial,
            "checkpoint": checkpoints[4]["uuid"], "weights": validations[4]["weights"]}


def test_fine_tune_starts_every_trial_from_the_source_checkpoints_weights(kiln_stack: Stack,
                                                                           tiny: dict[str, Any]) -> None:
    s = kiln_stack
    config = tiny["root"] / "fine_tune.yaml"
    config.write_text(FINE_TUNE.replace("UUID", tiny["checkpoint"]))
    experiment_id = _created(s.kiln("experiment", "create", str(config), str(tiny["model"])))
    # Resolved once, at submission, into the log: a replay reads it from there.
    source = _submitted_event(s, experiment_id)["source_checkpoint"]
    assert (source["uuid"], source["experiment_id"], source["steps_completed"]) == \
        (tiny["checkpoint"], tiny["experiment_id"], 4)
    assert _wait_ended(s, experiment_id)["state"] == "COMPLETED"
    trials = _trials(s, experiment_id)
    assert len(trials) == 2
    for trial in trials:
        validations = _validations(s, trial["id"])
        assert sorted(validations) == [0, 2], validations  # the trial's own steps count from 0
        assert validations[0]["weights"] == tiny["weights"], (trial["id"], validations)  # the source's weights
        assert validations[2]["weights"] != tiny["weights"]  # and it trained on from them
        assert trial["latest_checkpoint"] not in (None, tiny["checkpoint"])  # its own checkpoints from there


def test_fork_merges_the_overrides_into_the_config_and_keeps_the_code(kiln_stack: Stack, tiny: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    s = kiln_stack
    overrides = tmp_path / "overrides.yaml"
    # Fine-tuned from the source trial's latest checkpoint this time (source_trial_id), 2 batches.
    overrides.write_text(textwrap.dedent(f"""\
        name: tiny-fork
        searcher:
          max_length: {{batches: 2}}
          source_trial_id: {tiny['trial']['id']}
        perform_initial_validation: true
    """))
    out = s.kiln("experiment", "fork", str(tiny["experiment_id"]), "--config", str(overrides),
                 "--config", "hyperparameters.lr=0.02")
    forked = _created(out)
    assert f"(forked from {tiny['experiment_id']})" in out.stdout
    x = _experiment(s, forked)
    original = _experiment(s, tiny["experiment_id"])
    assert x["name"] == "tiny-fork" and x["context_digest"] == original["context_digest"]
    cfg = x["config"]
    assert cfg["hyperparameters"] == {"lr": {"type": "const", "val": 0.02},
                                      "global_batch_size": {"type": "const", "val": 8}}
    assert cfg["searcher"]["max_length"] == {"batches": 2} and cfg["searcher"]["metric"] == "loss"
    assert cfg["searcher"]["source_trial_id"] == tiny["trial"]["id"]
    assert cfg["min_checkpoint_period"] == {"batches": 2} and cfg["checkpoint_policy"] == "all"  # kept as they were
    submitted = _submitted_event(s, forked)
    assert submitted["forked_from"] == tiny["experiment_id"]
    assert submitted["source_checkpoint"]["uuid"] == tiny["checkpoint"]  # the trial's latest, resolved now
    assert _wait_ended(s, forked)["state"] == "COMPLETED"
    (trial,) = _trials(s, forked)
    validations = _validations(s, trial["id"])
    assert validations[0]["weights"] == tiny["weights"]
    # The original is untouched; --json prints the new experiment's record.
    assert _experiment(s, tiny["experiment_id"])["config"]["searcher"]["max_length"] == {"batches": 4}
    again = s.kiln("experiment", "fork", str(tiny["experiment_id"]), "--paused", "--json")
    assert again.returncode == 0, again.stderr
    body = json.loads(again.stdout)
    assert body["forked_from"] == tiny["experiment_id"] and body["paused"] is True
    assert body["config_yaml"] == SOURCE  # no overrides: the YAML as submitted, byte for byte
    wait_for(lambda: s.http.get(f"/api/v1/experiments/{body['id']}").status_code == 200, timeout=30.0,
             what="the fork to be projected")
    assert _experiment(s, body["id"])["config"] == original["config"]
    assert s.kiln("experiment", "kill", str(body["id"])).returncode == 0


def test_continue_trains_the_trial_on_from_its_latest_checkpoint_to_the_longer_length(kiln_stack: Stack,
                                                                                      tmp_path: Path) -> None:
    s = kiln_stack
    model = tmp_path / "model"
    model.mkdir()
    (model / "counter.py").write_text(COUNTER)
    (tmp_path / "cfg.yaml").write_text(COUNTER_CONFIG)
    experiment_id = _created(s.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(model)))
    assert _wait_ended(s, experiment_id, 180.0)["state"] == "COMPLETED"
    (trial,) = _trials(s, experiment_id)
    first_latest = trial["latest_checkpoint"]
    assert sorted(_validations(s, trial["id"])) == [1, 2, 3]

    # Followed: it trains on from step 3 to 5 and the command exits 0 once it completed again (not on the old end).
    followed = s.kiln("experiment", "continue", str(experiment_id), "--config", "searcher.max_length.batches=5", "-f")
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert f"experiment {experiment_id}: COMPLETED" in followed.stdout
    assert sorted(_validations(s, trial["id"])) == [1, 2, 3, 4, 5]  # the read model had caught up when it said so
    second_latest = _trials(s, experiment_id)[0]["latest_checkpoint"]

    out = s.kiln("experiment", "continue", str(experiment_id), "--config", "searcher.max_length.batches=6", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    answer = json.loads(out.stdout)
    assert answer["trial_ids"] == [trial["id"]] and answer["state"] == "ACTIVE"
    x = wait_for(lambda: (e := _experiment(s, experiment_id))["ended_at"] and e["state"] == "COMPLETED" and
                 e["config"]["searcher"]["max_length"] == {"batches": 6} and
                 _trials(s, experiment_id)[0]["steps_completed"] == 6 and e,
                 timeout=180.0, what="the continued experiment to complete again")
    (after,) = _trials(s, experiment_id)
    assert (after["id"], after["state"], after["max_length"], after["restarts"]) == (trial["id"], "COMPLETED", 6, 0)
    # Steps go on from each latest checkpoint: nothing was trained from 0 again.
    assert sorted(_validations(s, trial["id"])) == [1, 2, 3, 4, 5, 6]
    logs = _logs(s, trial["id"])
    assert f"resumed from {first_latest} at step 3" in logs and f"resumed from {second_latest} at step 5" in logs
    assert logs.count("resumed from") == 2
    assert yaml.safe_load(x["config_yaml"])["searcher"]["max_length"] == {"batches": 6}  # what ran, as YAML
    events = [e["type"] for e in s.http.get(f"/api/v1/experiments/{experiment_id}/events").json()]
    assert events.count("ExperimentEnded") == 3 and events.count("TrialExited") == 3
    assert events.count("ExperimentContinued") == 2 and events.count("TrialContinueRequested") == 2

    # Continuing something running, or another user's experiment, is refused with the reason.
    running = _created(s.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(model), "--paused"))
    wait_for(lambda: s.http.get(f"/api/v1/experiments/{running}").status_code == 200, timeout=30.0,
             what="the paused experiment to be projected")
    refused = s.kiln("experiment", "continue", str(running))
    assert refused.returncode == 1 and "only an ended experiment can be continued" in refused.stderr
    assert s.kiln("experiment", "kill", str(running)).returncode == 0
    other = _other_user(s)
    resp = httpx.post(f"{s.cfg.master_url}/api/v1/experiments/{experiment_id}/continue", json={"config": ""},
                      headers=other, timeout=30.0)
    assert resp.status_code == 403, resp.text

    # The continue is in the log: a replay rebuilds the same read model (it decides nothing again).
    _wait_ended(s, running)

    def settled(exp: int) -> bool:
        kinds = [e["type"] for e in s.http.get(f"/api/v1/experiments/{exp}/events").json()]
        return kinds.count("CheckpointsDeleted") >= kinds.count("CheckpointGCRequested")

    wait_for(lambda: settled(experiment_id) and settled(running), timeout=60.0, what="retention after the ends")
    replay = s.kiln("events", "replay", "--verify", "--state-dir", str(s.cfg.state_dir))
    assert replay.returncode == 0 and "reproducible (every table equal)" in replay.stdout, \
        replay.stdout + replay.stderr


def test_a_fine_tune_trial_reads_its_source_and_nothing_else_of_that_experiment(kiln_stack: Stack,
                                                                                 tmp_path: Path) -> None:
    s = kiln_stack
    model = tmp_path / "model"
    model.mkdir()
    (model / "counter.py").write_text(COUNTER)
    (model / "probe.py").write_text(PROBE)
    (tmp_path / "cfg.yaml").write_text(COUNTER_CONFIG.replace("batches: 3", "batches: 2"))
    source_id = _created(s.kiln("experiment", "create", str(tmp_path / "cfg.yaml"), str(model)))
    assert _wait_ended(s, source_id, 180.0)["state"] == "COMPLETED"
    (trial,) = _trials(s, source_id)
    uuids = {c["steps_completed"]: c["uuid"]
             for c in s.http.get(f"/api/v1/trials/{trial['id']}/checkpoints").json()}
    # The latest checkpoint is the source; the one before it (collected by retention or not) is another one of
    # the same experiment, which the grant must refuse whether its files are there or not.
    (tmp_path / "probe.yaml").write_text(textwrap.dedent(f"""\
        name: probe
        entrypoint: python3 probe.py
        searcher: {{name: single, metric: loss, max_length: {{batches: 1}}, source_checkpoint_uuid: "{uuids[2]}"}}
        data: {{other: "{uuids[1]}", source_experiment: {source_id}}}
        max_restarts: 0
    """))
    probe_id = _created(s.kiln("experiment", "create", str(tmp_path / "probe.yaml"), str(model)))
    assert _wait_ended(s, probe_id, 180.0)["state"] == "COMPLETED"
    (probe,) = _trials(s, probe_id)
    line = next(ln for ln in _logs(s, probe["id"]).splitlines() if ln.startswith("PROBE "))
    out = json.loads(line[len("PROBE "):])
    assert out["latest"] == uuids[2] and out["source_steps"] == "2" and "steps.txt" in out["source_files"]
    for key in ("other_list", "other_get", "experiment_list", "source_put"):
        assert out[key].startswith("refused: "), (key, out[key])


def _other_user(s: Stack) -> dict[str, str]:
    created = s.http.post("/api/v1/users", json={"username": "carol", "password": "carol-pass-123"})
    assert created.status_code in (201, 409), created.text
    return {"Authorization": f"Bearer {s.login('carol', 'carol-pass-123')}"}


def test_a_fine_tune_from_a_checkpoint_it_cannot_use_is_refused_at_submission(kiln_stack: Stack,
                                                                              tiny: dict[str, Any]) -> None:
    s = kiln_stack
    context = tiny["root"] / "context.tar.gz"
    context.write_bytes(code_context.pack(tiny["model"]))

    def submit(config: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.post(f"{s.cfg.master_url}/api/v1/experiments", headers=headers or s.headers, timeout=60.0,
                          data={"config": config},
                          files={"context": ("context.tar.gz", context.read_bytes(), "application/gzip")})

    def problems(resp: httpx.Response) -> dict[str, str]:
        return {e["path"]: e["message"] for e in resp.json()["extra"]["errors"]}

    unknown = submit(FINE_TUNE.replace("UUID", "no-such-checkpoint"))
    assert unknown.status_code == 400, unknown.text
    assert problems(unknown) == {"searcher.source_checkpoint_uuid": "no checkpoint 'no-such-checkpoint'"}
    no_trial = submit(FINE_TUNE.replace('source_checkpoint_uuid: "UUID"', "source_trial_id: 987654"))
    assert no_trial.status_code == 400 and problems(no_trial) == {"searcher.source_trial_id": "no trial 987654"}

    # A deleted checkpoint (its files left the store): the source trial's checkpoint at step 2.
    steps2 = next(c for c in s.http.get(f"/api/v1/trials/{tiny['trial']['id']}/checkpoints").json()
                  if c["steps_completed"] == 2)
    if steps2["state"] != "DELETED":
        assert s.http.delete(f"/api/v1/checkpoints/{steps2['uuid']}").status_code == 200
    wait_for(lambda: s.http.get(f"/api/v1/checkpoints/{steps2['uuid']}").json()["state"] == "DELETED",
             timeout=60.0, what="the deletion to be projected")
    deleted = submit(FINE_TUNE.replace("UUID", steps2["uuid"]))
    assert deleted.status_code == 400, deleted.text
    assert "was deleted" in problems(deleted)["searcher.source_checkpoint_uuid"]

    # Another user's checkpoint is private (its experiment's owner or an admin): 403, nothing recorded.
    other = _other_user(s)
    before = s.http.get("/api/v1/experiments", params={"limit": 1}).json()[0]["id"]
    mine = submit(FINE_TUNE.replace("UUID", tiny["checkpoint"]), other)
    assert mine.status_code == 403, mine.text
    assert "only its owner or an admin" in mine.json()["detail"]
    forked = httpx.post(f"{s.cfg.master_url}/api/v1/experiments/{tiny['experiment_id']}/fork", json={},
                        headers=other, timeout=30.0)
    assert forked.status_code == 403, forked.text
    assert s.http.get("/api/v1/experiments", params={"limit": 1}).json()[0]["id"] == before
    # The CLI says the same, naming the field.
    bad = tiny["root"] / "bad.yaml"
    bad.write_text(FINE_TUNE.replace("UUID", "no-such-checkpoint"))
    out = s.kiln("experiment", "create", str(bad), str(tiny["model"]))
    assert out.returncode == 1 and "searcher.source_checkpoint_uuid" in out.stderr, out.stderr
