# Kiln's tasks. `bash deploy/setup.sh` installs `just` itself into .venv/bin.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv/bin"

# Create or update .venv with everything (idempotent)
setup:
    bash deploy/setup.sh

# Start the local stack (NATS, Postgres, S3, five services, one worker)
up *ARGS: setup
    {{venv}}/kiln up {{ARGS}}

# Stop everything `up` started
down:
    {{venv}}/kiln down

# Start the stack, train the digits example, show its metrics and checkpoint
demo: setup
    #!/usr/bin/env bash
    set -euo pipefail
    {{venv}}/kiln up
    out=$({{venv}}/kiln experiment create examples/digits/const.yaml examples/digits --follow | tee /dev/stderr)
    id=$(sed -n 's/^Created experiment \([0-9]*\)$/\1/p' <<<"$out")
    trial=$({{venv}}/kiln experiment describe "$id" --json | {{venv}}/python -c 'import json,sys; print(json.load(sys.stdin)["trials"][0]["id"])')
    {{venv}}/kiln trial describe "$trial"
    echo
    echo "The stack keeps running: try"
    echo "  source .venv/bin/activate && kiln experiment create examples/digits/const.yaml examples/digits --follow"
    echo "Stop it with: just down"

# The seed story on the local stack (examples/seed_story): Spark ETL to Delta, ASHA, more data, 2-slot fine-tune, Spark inference
demo-seed *ARGS: setup
    {{venv}}/kiln up
    {{venv}}/python examples/seed_story/story.py {{ARGS}}

# Run the whole test suite: unit, integration (real NATS/Postgres/S3), e2e (CLI -> whole stack)
test *ARGS: setup
    {{venv}}/python -m pytest -q {{ARGS}}

# Lint and type-check: ruff (style, imports, likely bugs) and mypy (strict on schemas/, kiln/ and the cores)
lint: setup
    {{venv}}/ruff check .
    {{venv}}/mypy

# Build Horovod 0.28.1 (PyTorch + gloo, CPU) against .venv's torch and install it: minutes the first time, then
# from the wheel cached in deploy/horovod/build/. Enables `kiln.launch.horovod` and the Horovod test.
horovod: setup
    bash deploy/horovod/build.sh

# Only the fast no-I/O tests
test-unit: setup
    {{venv}}/python -m pytest -q tests/unit

# The long chaos run: every service killed 3 times, 2 workers, NATS 10 s and Postgres 15 s away (twice), 24 trials
chaos *ARGS: setup
    KILN_CHAOS=full {{venv}}/python -m pytest -q -s tests/chaos {{ARGS}}

# Fuzz the HTTP API on a stack of its own: schemathesis, >= 10,000 cases signed in and as many anonymous; no 5xx
fuzz EXAMPLES="500" *ARGS: setup
    KILN_FUZZ_EXAMPLES={{EXAMPLES}} {{venv}}/python -m pytest -q -s tests/e2e/test_fuzz.py -k fuzzing {{ARGS}}

# Benchmarks (long; not part of `test`)
bench-startup: setup
    {{venv}}/python benchmarks/startup/run.py --runs 5

bench-scheduler: setup
    {{venv}}/python benchmarks/scheduler/run.py --passes 7 --runs 5

# How the scheduler's decision pass, its per-heartbeat step and the heartbeat load grow up to 1,000 workers x 8 slots
bench-cluster *ARGS: setup
    {{venv}}/python benchmarks/cluster/run.py decision --workers 100,250,500,1000 {{ARGS}}
    {{venv}}/python benchmarks/cluster/run.py heartbeats --workers 100,250,500,1000

# Workers on separate hosts (network namespaces; root): a trial spanning two hosts, a host cut off and fenced
multihost *ARGS: setup
    {{venv}}/python -m pytest -q tests/e2e/test_remote_hosts.py tests/e2e/test_nats_cluster.py {{ARGS}}

# Checkpoint upload/download MiB/s through the real S3 store (1 GiB: one big file, 256 files) vs raw disk
bench-checkpoints *ARGS: setup
    {{venv}}/python benchmarks/checkpoints/run.py --mib 1024 --files 256 --runs 3 {{ARGS}}

# Metric ingest: Kiln's real trial -> worker -> JetStream -> Postgres path vs MLflow (own venv, made here) vs raw COPY
bench-ingest *ARGS: setup
    #!/usr/bin/env bash
    set -euo pipefail
    mlflow_venv=benchmarks/ingest/.venv-mlflow  # gitignored (benchmarks/ingest/.gitignore)
    if ! "$mlflow_venv/bin/python" -c 'import mlflow, psycopg2, sys; sys.exit(mlflow.__version__ != "3.17.2")' 2>/dev/null; then
        python3 -m venv "$mlflow_venv"
        "$mlflow_venv/bin/pip" install --quiet mlflow==3.17.2 psycopg2-binary==2.9.13
    fi
    {{venv}}/python benchmarks/ingest/run.py --mlflow-python "$mlflow_venv/bin/python" {{ARGS}}

bench-replay: setup
    {{venv}}/python benchmarks/ingest/replay_profile.py --shape mixed
    {{venv}}/python benchmarks/ingest/replay_profile.py --shape validations

bench-hpo: setup
    {{venv}}/python -m pip install --quiet -e ".[bench]"
    bash benchmarks/hpo/run.sh

# Web UI page load: 1,000 trials x 1,000 points (built through the bus) to drawn curves in chromium vs the JSON alone
bench-ui *ARGS: setup
    {{venv}}/python benchmarks/ui/run.py {{ARGS}}
