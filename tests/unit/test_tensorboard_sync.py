"""``kiln tensorboard start``'s sync (kiln.tbsync): what to fetch, and the local copy it keeps.

``plan`` is pure. The Syncer is run against an in-memory gateway with the answers of the two TensorBoard routes
(the real routes and TensorBoard itself: tests/e2e/test_tensorboard.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiln.client import APIError
from kiln.tbsync import Fetch, Syncer, local_sizes, plan, run_dir


def test_new_files_are_fetched_whole_grown_ones_from_where_the_copy_ends() -> None:
    fetches, refused = plan({"a": 10, "b": 5, "c": 7}, [("a", 10), ("b", 9), ("c", 3), ("d", 4)])
    assert fetches == [Fetch("b", 5, 9, replace=False), Fetch("c", 0, 3, replace=True), Fetch("d", 0, 4, replace=True)]
    assert refused == []


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "", "a\\b", "a\nb"])
def test_a_path_that_would_leave_the_run_directory_is_refused(path: str) -> None:
    fetches, refused = plan({}, [(path, 3), ("ok/events", 1)])
    assert fetches == [Fetch("ok/events", 0, 1, replace=True)]
    assert len(refused) == 1 and repr(path) in refused[0]


def test_each_trial_is_a_run_named_experiment_slash_trial(tmp_path: Path) -> None:
    assert run_dir(tmp_path, 4, 17) == tmp_path / "4" / "17"


class Gateway:
    """The answers the Syncer reads: experiments, their trials, and each trial's TensorBoard files."""

    CHUNK = 4  # bytes per file answer: a file takes several reads

    def __init__(self) -> None:
        self.experiments: dict[int, str] = {}
        self.trials: dict[int, dict[str, Any]] = {}
        self.files: dict[int, dict[str, bytes]] = {}
        self.forbidden: set[int] = set()
        self.listed: list[int] = []

    def add(self, experiment_id: int, trial_id: int, state: str = "RUNNING") -> None:
        self.experiments.setdefault(experiment_id, "ACTIVE")
        self.trials[trial_id] = {"id": trial_id, "experiment_id": experiment_id, "state": state}
        self.files.setdefault(trial_id, {})

    def get_experiment(self, experiment_id: int) -> dict[str, Any]:
        return {"id": experiment_id, "state": self.experiments[experiment_id]}

    def list_trials(self, experiment_id: int) -> list[dict[str, Any]]:
        return [t for t in self.trials.values() if t["experiment_id"] == experiment_id]

    def get_trial(self, trial_id: int) -> dict[str, Any]:
        return self.trials[trial_id]

    def tensorboard_files(self, trial_id: int) -> dict[str, Any]:
        if trial_id in self.forbidden:
            raise APIError(403, "not yours")
        self.listed.append(trial_id)
        return {"experiment_id": self.trials[trial_id]["experiment_id"], "trial_id": trial_id, "truncated": False,
                "files": [{"path": p, "size": len(b)} for p, b in self.files[trial_id].items()]}

    def tensorboard_chunk(self, trial_id: int, path: str, offset: int = 0) -> tuple[bytes, int]:
        data = self.files[trial_id][path]
        return data[offset:offset + self.CHUNK], len(data)


def test_files_are_copied_grown_files_appended_and_new_trials_joined(tmp_path: Path) -> None:
    gw = Gateway()
    gw.add(1, 10)
    gw.files[10] = {"events.1": b"0123456789", "sub/events.2": b"ab"}
    syncer = Syncer(gw, tmp_path, [1], [])  # type: ignore[arg-type]
    assert syncer.sync(strict=True) == 12
    assert local_sizes(run_dir(tmp_path, 1, 10)) == {"events.1": 10, "sub/events.2": 2}

    gw.files[10]["events.1"] += b"ABCDEF"  # the trial wrote on
    gw.add(1, 11)  # and the searcher made another trial
    gw.files[11] = {"events.9": b"xyz"}
    assert syncer.sync() == 6 + 3
    assert (run_dir(tmp_path, 1, 10) / "events.1").read_bytes() == b"0123456789ABCDEF"
    assert (run_dir(tmp_path, 1, 11) / "events.9").read_bytes() == b"xyz"
    assert syncer.sync() == 0
    assert sorted(syncer.trials) == [10, 11]


def test_a_trial_that_had_ended_is_synced_once_more_then_left_alone(tmp_path: Path) -> None:
    gw = Gateway()
    gw.add(1, 10, state="COMPLETED")
    gw.add(2, 20)
    gw.experiments[1] = "COMPLETED"
    gw.files[10] = {"events": b"final"}
    syncer = Syncer(gw, tmp_path, [1], [20])  # type: ignore[arg-type]
    syncer.sync(strict=True)
    syncer.sync()
    assert gw.listed.count(10) == 1 and gw.listed.count(20) == 2
    assert (run_dir(tmp_path, 1, 10) / "events").read_bytes() == b"final"


def test_a_trial_one_may_not_read_stops_the_first_sync_and_is_reported_once_later(tmp_path: Path) -> None:
    gw = Gateway()
    gw.add(1, 10)
    gw.forbidden.add(10)
    with pytest.raises(APIError, match="not yours"):
        Syncer(gw, tmp_path, [1], []).sync(strict=True)  # type: ignore[arg-type]
    said: list[str] = []
    syncer = Syncer(gw, tmp_path, [1], [], warn=said.append)  # type: ignore[arg-type]
    syncer.sync()
    syncer.sync()
    assert said == ["trial 10: not yours (HTTP 403)"]
