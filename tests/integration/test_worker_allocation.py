"""A worker starts a run from its AllocationAssigned alone: no stream history, no bus reads.

No NATS, S3 or Postgres here: the bus is a stand-in that fails any read, the code context comes from
memory, and what the worker reports lands in a list instead of its outbox. The trial process is real.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from schemas import context as code_context
from schemas import events as ev
from schemas.config import config_to_dict, parse_config
from services.runtime import Delivery, S3Settings
from services.worker.main import Worker, WorkerSettings

TRAIN = """\
import json, os, subprocess
# A script that starts Python itself gets the worker's interpreter (with Kiln), not whatever PATH had first.
sub = subprocess.run(["python3", "-c", "import kiln"], capture_output=True, text=True)
print("SUBPYTHON", "ok" if sub.returncode == 0 else sub.stderr.strip().splitlines()[-1])
info = json.loads(os.environ["KILN_CLUSTER_INFO"])
trial = info["trial"]
print("TRIAL", json.dumps([trial["trial_id"], trial["hparams"], trial["trial_seed"], trial["max_length"],
                            trial["config"]["searcher"]["metric"], os.environ.get("GREETING")]))
"""

CONFIG = """\
entrypoint: python3 train.py
environment: {environment_variables: [GREETING=hello]}
searcher: {name: single, metric: loss, max_length: {batches: 10}}
"""


class NoHistory:
    """A bus with nothing to read back: any read of the stream fails the test."""

    def __init__(self) -> None:
        self.js = self

    def read(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the worker read the stream")

    async def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()  # stop requests: none come


class ListOutbox:
    """Records what the worker reports, in order."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    async def append(self, event: Any) -> int:
        self.events.append(event)
        return len(self.events)

    def published(self, row: int) -> bool:
        return True


def assignment(context_digest: str, spec: bool = True) -> ev.AllocationAssigned:
    config = config_to_dict(parse_config(CONFIG)[0])
    return ev.AllocationAssigned(
        experiment_id=3, trial_id=30, allocation_id="30.1", worker_id="w1", slot_ids=["cpu0"], max_length=10,
        spec=ev.TrialSpec(config=config, context_digest=context_digest, hparams={"lr": 0.5}, seed=99) if spec else None,
    )


async def run(tmp_path: Path, assigned: ev.AllocationAssigned, context: bytes) -> list[Any]:
    outbox = ListOutbox()
    worker = Worker(WorkerSettings(worker_id="w1", work_dir=str(tmp_path / "work")), S3Settings(),
                    NoHistory(), outbox)  # type: ignore[arg-type]

    async def fetch(digest: str) -> bytes:
        assert digest == code_context.digest(context)
        return context

    worker._fetch_context = fetch  # type: ignore[method-assign]
    await worker.handle([Delivery(assigned, None, 1, 0.0)])  # type: ignore[arg-type]
    await asyncio.wait_for(asyncio.gather(*worker.tasks), 60)
    return outbox.events


@pytest.fixture
def context(tmp_path: Path) -> bytes:
    model = tmp_path / "model"
    model.mkdir()
    (model / "train.py").write_text(TRAIN)
    return code_context.pack(model)


async def test_a_worker_with_no_stream_history_starts_the_run_from_its_assignment(
        tmp_path: Path, context: bytes) -> None:
    events = await run(tmp_path, assignment(code_context.digest(context)), context)

    assert [type(e) for e in events if not isinstance(e, ev.LogsShipped)] == [ev.TrialStarted, ev.AllocationExited]
    exited = events[-1]
    assert (exited.allocation_id, exited.exit_code) == ("30.1", 0)
    lines = [line.text for e in events if isinstance(e, ev.LogsShipped) for line in e.lines]
    (trial,) = [json.loads(text.removeprefix("TRIAL ")) for text in lines if text.startswith("TRIAL ")]
    assert trial == [30, {"lr": 0.5}, 99, 10, "loss", "hello"]
    assert "SUBPYTHON ok" in lines


async def test_an_assignment_without_a_spec_is_reported_as_not_started_not_retried(
        tmp_path: Path, context: bytes) -> None:
    events = await run(tmp_path, assignment(code_context.digest(context), spec=False), context)

    exits = [e for e in events if isinstance(e, ev.AllocationExited)]
    assert [(e.exit_code, "no trial spec" in e.reason) for e in exits] == [(None, True)]
    assert not any(isinstance(e, ev.TrialStarted) for e in events)
