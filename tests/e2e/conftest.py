"""The whole local stack (parts, five services, workers) for end-to-end tests, on free ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from deploy import stack
from deploy.ports import free_port_block

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_for(pred: Callable[[], T | None], timeout: float = 60.0, what: str = "condition", poll_s: float = 0.2) -> T:
    """Poll ``pred`` until it returns something truthy (and return that), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


class Stack:
    """A running stack and helpers to drive it like a user would."""

    def __init__(self, cfg: stack.StackConfig) -> None:
        self.cfg = cfg
        self.creds = stack.Credentials.load_or_create(cfg.state_dir)
        # Signed in as the stack's admin once: ``http`` and the CLI (KILN_TOKEN) send this token.
        self.token = self.login("admin", self.creds.admin_password)
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.http = httpx.Client(base_url=cfg.master_url, headers=self.headers, timeout=60.0)

    def login(self, username: str, password: str) -> str:
        """A fresh session token of ``username``."""
        resp = httpx.post(f"{self.cfg.master_url}/api/v1/auth/login", timeout=30.0,
                          json={"username": username, "password": password})
        resp.raise_for_status()
        return str(resp.json()["token"])

    @property
    def env(self) -> dict[str, str]:
        """Environment for CLI subprocesses: KILN_MASTER points at this stack, KILN_TOKEN is the admin's, and the
        CLI's auth file lives in the state dir (never the real ~/.kiln)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        env["KILN_MASTER"] = self.cfg.master_url
        env["KILN_STATE_DIR"] = str(self.cfg.state_dir)
        env["KILN_AUTH_DIR"] = str(self.cfg.state_dir / "cli-auth")
        env["KILN_TOKEN"] = self.token
        return env

    def kiln(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run the ``kiln`` CLI against this stack."""
        return subprocess.run([sys.executable, "-m", "kiln.cli", *args], cwd=REPO, env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    @property
    def pg_dsn(self) -> str:
        """A DSN for direct read-model checks."""
        return f"postgresql://kiln:{self.creds.pg_password}@{self.cfg.host}:{self.cfg.pg_port}/kiln"

    @property
    def nats_admin(self) -> tuple[str, str, str]:
        """URL, user and password of the stack's admin NATS user."""
        return f"nats://{self.cfg.host}:{self.cfg.nats_port}", "admin", self.creds.nats["admin"]


@contextlib.contextmanager
def local_stack(prefix: str, **sizes: object) -> Iterator[Stack]:
    """Start a stack of its own under a temporary state dir on free ports; stop and remove it at the end
    (``KILN_KEEP_E2E_STATE=1`` keeps the state dir for a post-mortem)."""
    state_dir = Path(tempfile.mkdtemp(prefix=prefix))
    state_dir.chmod(0o755)  # the unprivileged postgres user must reach its data dir inside
    base = free_port_block(16, str(sizes.get("host", "127.0.0.1")))
    cfg = stack.StackConfig.load(
        state_dir, nats_port=base, nats_monitor_port=base + 1, pg_port=base + 2, s3_port=base + 3,
        http_port=base + 4, s3_ports_base=base + 5, worker_timeout_s=6.0, **sizes,
    )
    try:
        stack.up(cfg)
        s = Stack(cfg)
        yield s
        s.http.close()
    finally:
        stack.down(cfg)
        if os.environ.get("KILN_KEEP_E2E_STATE") != "1":
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def kiln_stack() -> Iterator[Stack]:
    """The shared stack of the e2e tests: three 1-slot workers."""
    with local_stack("kiln-e2e-", workers=3, slots_per_worker=1, max_context_bytes=2 * 1024 * 1024) as s:
        yield s


@pytest.fixture(scope="session")
def two_slot_stack() -> Iterator[Stack]:
    """A stack of its own with one 2-slot worker, shared by the 2-slot tests: a 2-slot trial runs on one host."""
    with local_stack("kiln-e2e-dist-", workers=1, slots_per_worker=2) as s:
        yield s
