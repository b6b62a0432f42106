#!/usr/bin/env bash
# Idempotent setup: a .venv with Kiln, its pinned dependencies, the stack binaries (NATS, SeaweedFS)
# and the test tools. Re-running it only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "Kiln needs Python 3.11 or newer (found $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.kiln-setup-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch is pinned to 2.13.0 in pyproject.toml: that CPU wheel is local here; an unpinned torch
    # would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet -e ".[stack,test,lint]"
    rm -f .venv/.kiln-setup-*
    touch "$stamp"
fi
echo "setup done: .venv ready ($(.venv/bin/python --version))"
