"""The `det` verbs on the whole stack: create --config/--paused, config, set name/description, labels, list-trials
--json, trial logs --follow, experiment wait's exit codes, describe's best trial and checkpoint."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import Stack, wait_for

pytestmark = pytest.mark.e2e

TRAIN = textwrap.dedent("""\
    import json, time
    import kiln as det

    with det.core.init() as ctx:
        for step in range(1, 4):
            time.sleep(0.5)
            print(f"training step {step}", flush=True)
            ctx.train.report_validation_metrics(steps_completed=step, metrics={"accuracy": step / 3})
            with ctx.checkpoint.store_path({"steps_completed": step}) as (path, _):
                (path / "state.json").write_text(json.dumps({"step": step}))
""")

CONFIG = textwrap.dedent("""\
    name: verbs  # replaced by --config
    entrypoint: python3 train.py
    searcher: {name: single, metric: accuracy, smaller_is_better: false, max_length: {batches: 100}}
""")


def _json(stack: Stack, *args: str) -> Any:
    out = stack.kiln(*args, "--json")
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return json.loads(out.stdout)


def _experiment(stack: Stack, exp_id: int) -> dict[str, Any]:
    return _json(stack, "experiment", "describe", str(exp_id))["experiment"]  # type: ignore[no-any-return]


def test_a_paused_overridden_experiment_renamed_labelled_followed_and_waited_for(kiln_stack: Stack,
                                                                                 tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    created = _json(kiln_stack, "experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path), "--paused",
                    "--config", "name=overridden", "--config", "searcher.max_length.batches=3")
    exp_id = int(created["id"])
    assert created["paused"] is True

    # The YAML as submitted, with the overrides in it; the experiment is paused from its first event.
    shown = kiln_stack.kiln("experiment", "config", str(exp_id))
    assert yaml.safe_load(shown.stdout)["searcher"]["max_length"] == {"batches": 3}
    exp = wait_for(lambda: _experiment(kiln_stack, exp_id), what="the experiment in the read model")
    assert (exp["name"], exp["state"]) == ("overridden", "PAUSED")
    trials = wait_for(lambda: _json(kiln_stack, "experiment", "list-trials", str(exp_id)), what="its trial")
    trial_id = int(trials[0]["id"])

    # Name, description, labels: owner's changes, folded by the tracker.
    assert _json(kiln_stack, "experiment", "set", "name", str(exp_id), "renamed")["name"] == "renamed"
    kiln_stack.kiln("experiment", "set", "description", str(exp_id), "a test run")
    kiln_stack.kiln("experiment", "label", "add", str(exp_id), "keep", "drop")
    assert _json(kiln_stack, "experiment", "label", "remove", str(exp_id), "drop")["labels"] == ["keep"]
    wait_for(lambda: (e := _experiment(kiln_stack, exp_id))["labels"] == ["keep"]
             and (e["name"], e["description"]) == ("renamed", "a test run"), what="the new name and labels")
    assert "[keep]" in kiln_stack.kiln("experiment", "list").stdout
    assert _json(kiln_stack, "trial", "describe", str(trial_id))["trial"]["steps_completed"] == 0  # nothing ran
    refused = kiln_stack.kiln("experiment", "archive", str(exp_id))
    assert refused.returncode == 1 and "only an ended experiment can be archived" in refused.stderr

    assert kiln_stack.kiln("experiment", "activate", str(exp_id)).returncode == 0
    followed = kiln_stack.kiln("trial", "logs", str(trial_id), "-f", "--json", timeout=180)
    assert followed.returncode == 0, followed.stderr
    lines = [json.loads(x) for x in followed.stdout.splitlines()]
    messages = [x["message"] for x in lines]
    assert [m for m in messages if m.startswith("training step")] == [f"training step {i}" for i in (1, 2, 3)]
    assert messages[-1].startswith("trial process exited"), messages
    assert all(x["worker"] and x["ts"] for x in lines)
    assert len({(x["allocation_id"], x["line_no"]) for x in lines}) == len(lines)  # each line once

    waited = kiln_stack.kiln("experiment", "wait", str(exp_id), timeout=180)
    assert (waited.returncode, waited.stdout.strip()) == (0, f"experiment {exp_id}: COMPLETED")
    assert _json(kiln_stack, "experiment", "list-trials", str(exp_id))[0]["state"] == "COMPLETED"
    described = kiln_stack.kiln("experiment", "describe", str(exp_id)).stdout
    assert f"best trial {trial_id}: accuracy=1" in described
    assert "best checkpoint " in described and "step 3" in described

    # Archived: left out of the list, shown with --all; unarchived: back. A running one cannot be archived.
    assert _json(kiln_stack, "experiment", "archive", str(exp_id))["archived"] is True
    wait_for(lambda: exp_id not in {e["id"] for e in _json(kiln_stack, "experiment", "list")}, what="archived")
    assert exp_id in {e["id"] for e in _json(kiln_stack, "experiment", "list", "--all")}
    kiln_stack.kiln("experiment", "unarchive", str(exp_id))
    wait_for(lambda: exp_id in {e["id"] for e in _json(kiln_stack, "experiment", "list")}, what="unarchived")


def test_wait_exits_non_zero_for_a_killed_experiment(kiln_stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    exp_id = _json(kiln_stack, "experiment", "create", str(tmp_path / "cfg.yaml"), str(tmp_path), "--paused")["id"]
    wait_for(lambda: kiln_stack.kiln("experiment", "kill", str(exp_id)).returncode == 0, what="the kill")
    waited = kiln_stack.kiln("experiment", "wait", str(exp_id), "--json", timeout=120)
    assert waited.returncode == 1
    assert json.loads(waited.stdout)["state"] == "CANCELED"
