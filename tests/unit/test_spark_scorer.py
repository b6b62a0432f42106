"""kiln.spark's partition function, without Spark: a model is built once per process (not per batch or task),
every output row carries a prediction and the model's tags, and a predictor that loses rows is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from kiln import spark as kspark


def _cached(tmp_path: Path, uuid: str) -> Path:
    """A checkpoint already in the host's cache: kiln.models.fetch reads nothing over the network for it."""
    (tmp_path / uuid).mkdir()
    (tmp_path / uuid / "bias.txt").write_text("10")
    return tmp_path


def _model(uuid: str) -> kspark.ModelRef:
    # An unroutable master: any attempt to download would fail the test.
    return kspark.ModelRef(checkpoint_uuid=uuid, master="http://127.0.0.1:9", model_name="digits", model_version=3,
                           experiment_id=12, trial_id=40, token="secret-token-x")


loads: list[Path] = []


def load_adder(path: Path) -> Any:
    """A 'model' whose files say what to add to column x."""
    loads.append(path)
    bias = int((path / "bias.txt").read_text())
    return lambda batch: (batch["x"] + bias).tolist()


def test_a_model_is_loaded_once_per_process_and_every_row_is_tagged(tmp_path: Path) -> None:
    loads.clear()
    cache = _cached(tmp_path, "ck-once")
    scorer = kspark._Scorer(_model("ck-once"), load_adder, ("x",), "prediction", str(cache))
    partitions = [[pd.DataFrame({"x": [1, 2], "name": ["a", "b"]}), pd.DataFrame({"x": [3], "name": ["c"]})],
                  [pd.DataFrame({"x": [4, 5, 6], "name": ["d", "e", "f"]})]]
    out = pd.concat([batch for partition in partitions for batch in scorer(iter(partition))])
    assert loads == [cache / "ck-once"]  # two tasks, three batches: one load
    assert out["prediction"].tolist() == [11, 12, 13, 14, 15, 16]
    assert out["name"].tolist() == list("abcdef")  # the input columns stay
    assert set(out["model_name"]) == {"digits"} and set(out["model_version"]) == {3}
    assert set(out["checkpoint_uuid"]) == {"ck-once"} and set(out["experiment_id"]) == {12}


def test_an_empty_partition_loads_nothing(tmp_path: Path) -> None:
    loads.clear()
    scorer = kspark._Scorer(_model("ck-empty"), load_adder, None, "prediction", str(_cached(tmp_path, "ck-empty")))
    assert list(scorer(iter([]))) == []
    assert loads == []


def test_a_predictor_must_return_one_value_per_row(tmp_path: Path) -> None:
    def load_short(path: Path) -> Any:
        return lambda batch: [0]

    scorer = kspark._Scorer(_model("ck-short"), load_short, None, "prediction", str(_cached(tmp_path, "ck-short")))
    with pytest.raises(ValueError, match="returned 1 values for a batch of 2 rows"):
        list(scorer(iter([pd.DataFrame({"x": [1, 2]})])))


def test_the_token_stays_out_of_the_reference_repr() -> None:
    assert "secret-token-x" not in repr(_model("ck"))


def test_importing_kiln_spark_loads_neither_spark_nor_pandas_nor_torch() -> None:
    code = "import json, sys, kiln.spark; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], check=True,
                         capture_output=True, text=True)
    roots = set(json.loads(out.stdout.splitlines()[-1]))
    assert not roots & {"pyspark", "pandas", "torch", "pyarrow", "services", "deploy"}
