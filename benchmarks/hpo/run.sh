#!/usr/bin/env bash
# Reproduce the README's results table from the committed learning-curve table (no training).
#   benchmarks/hpo/run.sh            # every method, 1/2/4 workers (about 20 min on the 2-core dev machine)
#   benchmarks/hpo/run.sh --quick    # without the Optuna TPE rows (about 5 min)
#   JOBS=2 benchmarks/hpo/run.sh     # spread the replays over 2 processes
# Writes benchmarks/hpo/results/{results.md,regret_w*.png} and every run to build/runs.json.gz (not committed);
# replay.py --all --from-runs benchmarks/hpo/build/runs.json.gz re-makes the report and plots from that file.
# Rebuilding the table itself (about 30 CPU-minutes) is: build_table.py, then build_table.py --finalize;
# the digits GBDT table (about 12 CPU-minutes): build_table_gbdt.py --configs 199, then --finalize.
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/python benchmarks/hpo/replay.py --all --jobs "${JOBS:-1}" "$@"
# The time-to-hard-target protocol on both tables (README "Hard targets"): 200 seeds, 1 and 4 workers.
# Resumable: runs land in build/protocol/runs.jsonl as they finish; the report goes to results/protocol.md.
.venv/bin/python benchmarks/hpo/protocol.py --seeds 200 --jobs "${JOBS:-1}"
