"""End to end: the CLI submits the digits example to the whole local stack, as README tells a user to."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import asyncpg
import pytest
import torch

from tests.e2e.conftest import REPO, Stack

pytestmark = pytest.mark.e2e


def test_digits_const_completes_with_metrics_and_a_loadable_checkpoint(kiln_stack: Stack, tmp_path: Path) -> None:
    """`kiln experiment create examples/digits/const.yaml examples/digits --follow` ends COMPLETED."""
    run = kiln_stack.kiln("experiment", "create", "examples/digits/const.yaml", "examples/digits", "--follow")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "COMPLETED" in run.stdout
    experiment_id = int(run.stdout.split("Created experiment ", 1)[1].split()[0])

    described = json.loads(kiln_stack.kiln("experiment", "describe", str(experiment_id), "--json").stdout)
    assert described["experiment"]["state"] == "COMPLETED"
    (trial,) = described["trials"]
    assert trial["state"] == "COMPLETED"

    # The validation metrics are in Postgres...
    async def rows() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(kiln_stack.pg_dsn)
        try:
            return await conn.fetch("SELECT step AS steps_completed, value FROM metric_points WHERE trial_id = $1"
                                    " AND kind = 'validation' AND name = 'validation_accuracy' ORDER BY step",
                                    trial["id"])
        finally:
            await conn.close()

    import asyncio

    db_rows = asyncio.run(rows())
    assert len(db_rows) >= 2
    accuracies = [r["value"] for r in db_rows]
    assert accuracies[-1] > 0.8

    # ...and the gateway serves the same points.
    served = kiln_stack.http.get(f"{kiln_stack.cfg.master_url}/api/v1/trials/{trial['id']}/metrics",
                       params={"kind": "validation"}).json()
    assert [p["steps_completed"] for p in served] == [r["steps_completed"] for r in db_rows]
    assert [p["metrics"]["validation_accuracy"] for p in served] == accuracies
    training = kiln_stack.http.get(f"{kiln_stack.cfg.master_url}/api/v1/trials/{trial['id']}/metrics",
                         params={"kind": "training"}).json()
    assert training and all("loss" in p["metrics"] for p in training)

    # The latest checkpoint downloads through the CLI and loads into the example's model.
    uuid = trial["latest_checkpoint"]
    assert uuid
    target = tmp_path / "ckpt"
    dl = kiln_stack.kiln("checkpoint", "download", uuid, str(target))
    assert dl.returncode == 0, dl.stderr
    state = torch.load(target / "model.pt", weights_only=True)
    sys.path.insert(0, str(REPO / "examples" / "digits"))
    try:
        import model as digits_model
    finally:
        sys.path.pop(0)
    net = digits_model.build_model(int(trial["hparams"]["width"]))
    net.load_state_dict(state)

    # The logs of the run are there too.
    logs = kiln_stack.kiln("trial", "logs", str(trial["id"]))
    assert "trial process exited with code 0" in logs.stdout
