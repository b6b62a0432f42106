"""The seed story (examples/seed_story) end to end on a stack with a 2-slot worker, with small budgets: Spark ETL
into Delta v0, an ASHA search, the weak class found, v1 appended, a 2-slot fine-tune from the search's best
checkpoint, a registered model version, Spark batch inference writing predictions back to Delta.

What a user relies on, checked against the stack itself rather than the story's own summary where possible:
lineage records v0 for the search and v1 plus the parent checkpoint for the fine-tune; the fine-tune's weights at
step 0 are the parent checkpoint's, byte for byte; the weak class's accuracy rose; every input row got exactly
one prediction, tagged with the registered version.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from deltalake import DeltaTable

from schemas.data import s3_storage_options
from tests.e2e.conftest import REPO, Stack, wait_for

pytestmark = pytest.mark.e2e

STORY = REPO / "examples" / "seed_story"


def _digest_of(path: Path) -> str:
    """The weights digest (net.weights_digest) of a downloaded checkpoint's model.pt."""
    sys.path.insert(0, str(STORY / "model"))
    try:
        from net import weights_digest
    finally:
        sys.path.remove(str(STORY / "model"))
    return weights_digest(torch.load(path / "model.pt", weights_only=True))


def test_the_seed_story_end_to_end(two_slot_stack: Stack, tmp_path: Path) -> None:
    stack = two_slot_stack
    run, model = f"e2e-{uuid.uuid4().hex[:8]}", f"seed-e2e-{uuid.uuid4().hex[:8]}"
    summary_path = tmp_path / "summary.json"
    env = {**stack.env, "KILN_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, str(STORY / "story.py"), "--quick", "--run", run, "--model", model,
                          "--json", str(summary_path)], cwd=REPO, env=env, text=True, capture_output=True,
                         timeout=540)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    found: dict[str, Any] = json.loads(summary_path.read_text())
    assert "class 8 accuracy (the weak one)" in out.stdout and "rows scored by Spark: " in out.stdout
    search, tune = found["search_experiment"], found["finetune_experiment"]

    # Lineage: the search read v0; the fine-tune v1, from the search's best trial's checkpoint.
    lineage = {e: wait_for(lambda e=e: (r := stack.http.get(f"/api/v1/experiments/{e}/lineage")).status_code == 200
                           and r.json(), what=f"lineage of {e}") for e in (search, tune)}
    assert lineage[search]["data"]["table"] == found["table"] and lineage[search]["data"]["version"] == 0
    assert lineage[tune]["data"]["table"] == found["table"] and lineage[tune]["data"]["version"] == 1
    parent = lineage[tune]["parent"]
    assert parent["experiment_id"] == search and parent["trial_id"] == found["best_trial"]

    # The fine-tune started from the parent's weights: the digest it logged on loading them is the digest of the
    # parent checkpoint's model.pt as the store holds it.
    download = tmp_path / "parent"
    got = stack.kiln("checkpoint", "download", parent["uuid"], "--output", str(download))
    assert got.returncode == 0, got.stderr
    parent_digest = _digest_of(download)
    trial = found["finetune_trial"]
    logs = "\n".join(line["text"] for line in stack.http.get(f"/api/v1/trials/{trial}/logs").json())
    loaded = re.findall(r"fine-tune: loaded weights of checkpoint (\S+) .*digest (sha256:[0-9a-f]{64})", logs)
    assert loaded, logs[-3000:]
    assert {(parent["uuid"], parent_digest)} == set(loaded)  # every rank loaded the parent's exact weights
    assert len(loaded) == 2  # two slots: two ranks
    described = stack.http.get(f"/api/v1/checkpoints/{parent['uuid']}").json()
    assert described["metadata"]["weights_digest"] == parent_digest

    # More data for the weak class raised its accuracy (the class the Spark aggregation found short of rows).
    assert found["weak_class"] == 8
    assert found["after"]["weak"] > found["before"]["weak"]

    # Spark inference: one prediction per row of v1, each tagged with the registered version.
    options = s3_storage_options(f"{stack.cfg.host}:{stack.cfg.s3_port}", stack.creds.s3_access_key,
                                 stack.creds.s3_secret_key, secure=False)
    images = DeltaTable(found["table"], version=1, storage_options=options).to_pyarrow_table(columns=["id"])
    predictions = DeltaTable(found["inference"]["table"], storage_options=options).to_pyarrow_table()
    ids = predictions.column("id").to_pylist()
    assert predictions.num_rows == images.num_rows == found["inference"]["rows_scored"]
    assert Counter(ids) == Counter(images.column("id").to_pylist())  # exactly one per input row
    version = stack.http.get(f"/api/v1/models/{model}/versions/latest").json()
    assert version["version"] == found["model_version"]
    assert set(predictions.column("model_name").to_pylist()) == {model}
    assert set(predictions.column("model_version").to_pylist()) == {version["version"]}
    assert set(predictions.column("checkpoint_uuid").to_pylist()) == {version["checkpoint_uuid"]}
    assert set(predictions.column("prediction").to_pylist()) <= set(range(10))

    # By experiment instead of by name: a checkpoint of the fine-tune with its best metric (ties may pick either).
    import kiln.spark

    by_experiment = kiln.spark.best_checkpoint(tune, master=stack.cfg.master_url, token=stack.token)
    metrics = {c["uuid"]: c["metric"] for c in stack.http.get(f"/api/v1/experiments/{tune}/checkpoints").json()}
    assert metrics[by_experiment.checkpoint_uuid] == max(m for m in metrics.values() if m is not None)
    assert by_experiment.experiment_id == tune and by_experiment.model_version is None
    by_name = kiln.spark.model_version(model, "latest", master=stack.cfg.master_url, token=stack.token)
    assert (by_name.checkpoint_uuid, by_name.model_version) == (version["checkpoint_uuid"], version["version"])
