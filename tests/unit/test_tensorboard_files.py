"""A trial's TensorBoard directory (kiln.core._tensorboard): the scalars Kiln writes, what is uploaded and when.

The uploads go to an in-memory store here (a dict); tests/integration/test_trial_tensorboard.py does it through a
worker link into the real S3 store. The event files are read back with TensorBoard's own reader.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kiln.core import TrainContext
from kiln.core._tensorboard import MAX_SERIES, TensorboardFiles, scalar_series


class Store:
    """What a trial uploaded: key under its prefix -> bytes; ``fail`` makes the next uploads raise."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts: list[str] = []
        self.fail = False

    def upload(self, path: Path, rel: str, size: int) -> None:
        if self.fail:
            raise OSError("the store is away")
        self.objects[rel] = path.read_bytes()[:size]
        self.puts.append(rel)

    def scalars(self, where: Path) -> dict[str, list[tuple[int, float]]]:
        """Every scalar series in the uploaded files, read by TensorBoard's reader: tag -> [(step, value)]."""
        for rel, data in self.objects.items():
            (where / rel).parent.mkdir(parents=True, exist_ok=True)
            (where / rel).write_bytes(data)
        acc = EventAccumulator(str(where), size_guidance={"tensors": 0})
        acc.Reload()
        return {tag: [(e.step, float(np.asarray(_value(e)))) for e in acc.Tensors(tag)]
                for tag in acc.Tags()["tensors"]}


def _value(event: Any) -> Any:
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(event.tensor_proto)


class Reporter:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def publish(self, event: Any) -> None:
        self.events.append(event)

    def add_point(self, point: Any) -> None:
        self.events.append(point)

    def flush(self) -> None:
        pass


def test_a_metric_is_one_series_and_a_dict_or_list_of_numbers_one_per_item() -> None:
    assert scalar_series("loss", 0.5) == [("loss", 0.5)]
    assert scalar_series("steps", 3) == [("steps", 3.0)]
    assert scalar_series("converged", True) == [("converged", 1.0)]
    assert scalar_series("per_class", {"cat": 0.9, "dog": 0.8}) == [("per_class/cat", 0.9), ("per_class/dog", 0.8)]
    assert scalar_series("acc", [0.1, 0.2]) == [("acc/0", 0.1), ("acc/1", 0.2)]
    assert scalar_series("nested", {"a": [1, {"b": 2}]}) == [("nested/a/0", 1.0), ("nested/a/1/b", 2.0)]
    assert scalar_series("np", np.float32(0.25)) == [("np", 0.25)]
    assert scalar_series("arr", np.array([1.0, 2.0])) == [("arr/0", 1.0), ("arr/1", 2.0)]
    assert scalar_series("text", "hello") == [] and scalar_series("none", None) == []
    assert len(scalar_series("big", list(range(5 * MAX_SERIES)))) == MAX_SERIES


def test_auto_writes_reported_metrics_as_scalars_and_uploads_them_at_each_validation(tmp_path: Path) -> None:
    store = Store()
    board = TensorboardFiles(tmp_path / "tb", store.upload, auto=True, sync_s=3600)
    train = TrainContext(Reporter(), 3, 7, True, board)
    for step in (10, 20):
        train.report_training_metrics(steps_completed=step, metrics={"loss": 1.0 / step, "note": "text"})
    assert store.objects == {}  # training reports upload at most every sync_s
    train.report_validation_metrics(steps_completed=20, metrics={
        "accuracy": 0.75, "per_class_accuracy": {"0": 0.5, "1": 1.0}})
    assert store.objects, "a validation uploads before it returns"
    got = store.scalars(tmp_path / "read")
    assert got["training/loss"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05))]
    assert got["validation/accuracy"] == [(20, 0.75)]
    assert got["validation/per_class_accuracy/0"] == [(20, 0.5)]
    assert got["validation/per_class_accuracy/1"] == [(20, 1.0)]
    assert "training/note" not in got


def test_only_new_and_grown_files_are_uploaded_and_user_files_go_along(tmp_path: Path) -> None:
    store = Store()
    board = TensorboardFiles(tmp_path / "tb", store.upload, auto=True)
    board.write_metrics("training", 1, {"loss": 1.0})
    (board.path / "custom").mkdir()
    (board.path / "custom" / "notes.txt").write_text("a")
    first = board.sync()
    assert "custom/notes.txt" in first and len(first) == 2
    assert board.sync() == []  # nothing changed
    (board.path / "custom" / "notes.txt").write_text("ab")
    assert board.sync() == ["custom/notes.txt"]
    assert store.objects["custom/notes.txt"] == b"ab"


def test_kilns_event_file_is_rolled_once_big_so_an_upload_resends_little(tmp_path: Path) -> None:
    store = Store()
    board = TensorboardFiles(tmp_path / "tb", store.upload, auto=True, roll_bytes=1)
    board.write_metrics("training", 1, {"loss": 1.0})
    (first,) = board.sync()
    board.write_metrics("training", 2, {"loss": 0.5})
    (second,) = board.sync()
    assert second != first  # a new file; the first is never sent again
    assert store.puts == [first, second]
    assert store.scalars(tmp_path / "read")["training/loss"] == [(1, 1.0), (2, 0.5)]


def test_a_failed_upload_is_logged_once_and_tried_again_while_training_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    board = TensorboardFiles(tmp_path / "tb", store.upload, auto=True)
    board.write_metrics("validation", 1, {"accuracy": 0.5})
    store.fail = True
    with caplog.at_level(logging.ERROR, logger="kiln.core"):
        assert board.sync() == [] and board.sync() == []
    assert sum("not uploaded" in r.getMessage() for r in caplog.records) == 1
    store.fail = False
    assert len(board.sync()) == 1
    assert store.scalars(tmp_path / "read")["validation/accuracy"] == [(1, 0.5)]


def test_close_uploads_last_in_auto_mode_and_removes_a_directory_kiln_made(tmp_path: Path) -> None:
    store = Store()
    board = TensorboardFiles(tmp_path / "tb", store.upload, auto=True, owned=True)
    board.write_metrics("training", 5, {"loss": 0.1})
    (board.path / "late.txt").write_text("written just before the end")
    board.close()
    assert "late.txt" in store.objects
    assert store.scalars(tmp_path / "read")["training/loss"] == [(5, pytest.approx(0.1))]
    assert not (tmp_path / "tb").exists()


def test_manual_mode_writes_nothing_and_uploads_only_when_asked(tmp_path: Path) -> None:
    store = Store()
    board = TensorboardFiles(tmp_path / "tb", store.upload, auto=False, rank=0)
    train = TrainContext(Reporter(), 3, 7, True, board)
    train.report_validation_metrics(steps_completed=1, metrics={"accuracy": 0.5})
    path = train.get_tensorboard_path()
    (path / "mine.txt").write_text("x")
    (path / "skip.txt").write_text("y")
    assert store.objects == {}
    train.upload_tensorboard_files(selector=lambda p: p.name != "skip.txt",
                                   mangler=lambda p, rank: p.with_name(f"rank{rank}-{p.name}"))
    assert store.objects == {"rank0-mine.txt": b"x"}
    (path / "after.txt").write_text("z")
    board.close()
    assert "after.txt" not in store.objects  # MANUAL: nothing at close


def test_upload_tensorboard_files_is_for_manual_mode_and_only_the_chief_uploads(tmp_path: Path) -> None:
    store = Store()
    with pytest.raises(RuntimeError, match="MANUAL"):
        TrainContext(Reporter(), 3, 7, True, TensorboardFiles(tmp_path / "a", store.upload, auto=True)) \
            .upload_tensorboard_files()
    worker = TrainContext(Reporter(), 3, 7, False, TensorboardFiles(tmp_path / "b", store.upload, auto=False))
    (worker.get_tensorboard_path() / "x.txt").write_text("x")
    worker.upload_tensorboard_files()
    worker.report_validation_metrics(steps_completed=1, metrics={"accuracy": 0.5})
    assert store.objects == {}


def test_without_an_uploader_kiln_writes_no_scalars(tmp_path: Path) -> None:
    """A local run (no cluster): the directory is the script's; Kiln writes nothing into it."""
    board = TensorboardFiles(tmp_path / "tb", None, auto=True)
    board.write_metrics("training", 1, {"loss": 1.0})
    assert board.sync() == []
    assert not (tmp_path / "tb").exists()


def test_a_pytorch_trial_writes_its_own_scalars_with_a_summary_writer(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Determined's ``context.get_tensorboard_writer()``; locally the directory is ./tensorboard."""
    from kiln import pytorch
    from schemas.trial import CLUSTER_INFO_ENV

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CLUSTER_INFO_ENV, raising=False)
    with pytorch.init(hparams={"global_batch_size": 4}) as context:
        writer = context.get_tensorboard_writer()
        assert context.get_tensorboard_writer() is writer and context.get_enable_tensorboard_logging()
        writer.add_scalar("custom/x", 1.5, 3)
        path = context.get_tensorboard_path()
    assert path == tmp_path / "tensorboard"
    acc = EventAccumulator(str(path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("custom/x")] == [(3, 1.5)]  # closed, so written, at the end
    with pytorch.init(hparams={"global_batch_size": 4}, enable_tensorboard_logging=False) as context:
        assert not context.get_enable_tensorboard_logging()
        context._core.train.upload_tensorboard_files()  # MANUAL mode: allowed (locally it uploads nothing)
