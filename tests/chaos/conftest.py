"""A whole local stack of its own for the chaos test (it kills things; no other test shares it)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import stack
from deploy.ports import free_port_block
from tests.e2e.conftest import Stack


@pytest.fixture(scope="module")
def chaos_stack() -> Iterator[Stack]:
    """Three 2-slot workers, a short worker timeout, state in a temporary dir."""
    state_dir = Path(tempfile.mkdtemp(prefix="kiln-chaos-"))
    state_dir.chmod(0o755)  # the unprivileged postgres user must reach its data dir inside
    base = free_port_block(16)
    cfg = stack.StackConfig.load(
        state_dir, nats_port=base, nats_monitor_port=base + 1, pg_port=base + 2, s3_port=base + 3,
        http_port=base + 4, s3_ports_base=base + 5, workers=3, slots_per_worker=2,
        max_context_bytes=2 * 1024 * 1024, worker_timeout_s=6.0,
    )
    try:
        stack.up(cfg)
        yield Stack(cfg)
    finally:
        stack.down(cfg)
        if os.environ.get("KILN_KEEP_CHAOS_STATE") != "1":
            shutil.rmtree(state_dir, ignore_errors=True)
