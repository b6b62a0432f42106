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
    # spark: PySpark for the seed story's jobs and their e2e test (about 1.5 min to install, ~0.45 GB).
    .venv/bin/python -m pip install --quiet -e ".[stack,test,lint,spark]"
    rm -f .venv/.kiln-setup-*
    touch "$stamp"
fi
# The web UI's end-to-end tests drive Debian's Chromium through Playwright (Playwright's own browser download
# cannot reach its host here). Installed when missing and we may (root with apt, as in CI).
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: /usr/bin/chromium is missing: the web UI's e2e tests need it (apt-get install chromium, as root)" >&2
    fi
fi
echo "setup done: .venv ready ($(.venv/bin/python --version))"
