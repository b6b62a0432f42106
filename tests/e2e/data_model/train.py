"""A tiny trial for the data-version tests: reads its experiment's pinned Delta table version and reports what it
read (rows, the sum of ``x``, the version) as validation metrics, then stores one checkpoint."""

import kiln as det
import kiln.data

with det.core.init() as core:
    data = kiln.data.delta_table()
    rows = sum(len(batch["x"]) for batch in data.torch_batches(2, columns=["x"], shuffle=True, seed=1))
    x_sum = float(sum(data.to_pyarrow(["x"]).column("x").to_pylist()))
    print(f"read {data.uri} version {data.version}: {rows} rows", flush=True)
    with core.checkpoint.store_path({"steps_completed": 1}) as (path, _):
        (path / "rows.txt").write_text(str(rows))
    core.train.report_validation_metrics(steps_completed=1,
                                         metrics={"rows": rows, "x_sum": x_sum, "version": data.version})
