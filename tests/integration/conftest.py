"""Real NATS, PostgreSQL and S3 for integration tests, started by deploy/parts.py on free ports."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy import parts as p
from deploy.ports import free_port_block
from services.runtime import BusSettings, connect_bus

# Quotes and a dollar sign on purpose: the generated nats config and the SQL must escape them.
TEST_NATS_USERS = {"kiln-test": "nats-secret-\"quoted'$", "other": "other-secret"}


def bootstrap_bus(cfg: p.PartsConfig, user: str = "kiln-test") -> None:
    """Create the streams and key-value buckets, as `kiln up` does with its admin user: services connect
    with ``ensure=False`` and may not create them."""
    settings = BusSettings(nats_url=f"nats://{cfg.host}:{cfg.nats_port}", nats_user=user,
                           nats_password=cfg.nats_users[user])

    async def run() -> None:
        async with connect_bus(settings, "bootstrap", ensure=True):
            pass

    asyncio.run(run())


def make_parts_config(state_dir: Path, host: str = "127.0.0.1") -> p.PartsConfig:
    """A PartsConfig whose every port (weed's +10000 gRPC ports included) is free now."""
    base = free_port_block(8, host)
    return p.PartsConfig(
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
