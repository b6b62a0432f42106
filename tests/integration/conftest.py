"""Real NATS, PostgreSQL and S3 for integration tests, started by deploy/parts.py on free ports."""

from __future__ import annotations

import random
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy import parts as p

# Quotes and a dollar sign on purpose: the generated nats config and the SQL must escape them.
TEST_NATS_USERS = {"kiln-test": "nats-secret-\"quoted'$", "other": "other-secret"}


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _all_ports(cfg: p.PartsConfig) -> list[int]:
    return [cfg.nats_port, cfg.nats_monitor_port, cfg.pg_port, *p.weed_ports(cfg).values()]


def make_parts_config(state_dir: Path, host: str = "127.0.0.1") -> p.PartsConfig:
    """A PartsConfig whose every port (weed's included) is free now, at a random spot."""
    rng = random.Random()
    for _ in range(200):
        # 8 consecutive ports from a random base; weed's gRPC ports land at +10000, and all of them stay
        # below the ephemeral range (32768+) so no client connection can be holding one.
        base = rng.randrange(12000, 22000 - 8)
        cfg = p.PartsConfig(
            state_dir=state_dir,
            host=host,
            nats_port=base,
            nats_monitor_port=base + 1,
            pg_port=base + 2,
            s3_port=base + 3,
            s3_ports_base=base + 4,
            nats_users=dict(TEST_NATS_USERS),
            pg_user="kiln",
            pg_password="pg-secret-'quoted\"",
            pg_database="kiln_test",
            s3_access_key="kiln-test-key",
            s3_secret_key="kiln-test-secret",
            s3_buckets=["kiln", "kiln-extra"],
        )
        ports = _all_ports(cfg)
        if all(_free(host, port) for port in ports):
            return cfg
    raise RuntimeError("no free set of ports found")


@pytest.fixture(scope="session")
def parts_config_factory() -> Callable[[Path], p.PartsConfig]:
    """Builds a PartsConfig on free ports for a given state dir (for tests that start their own parts)."""
    return make_parts_config


@pytest.fixture(scope="session")
def parts() -> Iterator[p.RunningParts]:
    """NATS, PostgreSQL and S3 running under a temporary state dir for the whole session."""
    # mkdtemp makes a 0700 dir (as does pytest's tmp_path base): open it up so the unprivileged
    # postgres user can reach its data dir inside.
    state_dir = Path(tempfile.mkdtemp(prefix="kiln-parts-"))
    state_dir.chmod(0o755)
    cfg = make_parts_config(state_dir)
    pg_data_dir = p.postgres_data_dir(cfg)
    running = p.start_all(cfg)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(pg_data_dir, ignore_errors=True)
