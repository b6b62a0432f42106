"""``kiln.core`` finds a fine-tune's source checkpoint where it lives: another experiment's prefix of the cluster's
store (through the worker), whatever storage the trial's own checkpoints use."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.core._checkpoint import LinkedS3Storage, SharedFSStorage, WithSources


class _Keys:
    """The worker link's answer to a listing: the prefixes asked for, and no keys."""

    def __init__(self) -> None:
        self.listed: list[str] = []

    def presign(self, method: str, key: str, bucket: str = "", upload_id: str = "", part_number: int = 0) -> str:
        raise AssertionError("nothing to fetch")

    def list_keys(self, prefix: str) -> list[str]:
        self.listed.append(prefix)
        return []


def test_a_source_checkpoint_is_looked_up_under_its_own_experiment_and_others_under_the_trials(tmp_path: Path) -> None:
    link = _Keys()
    storage = LinkedS3Storage(lambda: link, "kiln", "checkpoints/8", {"src": "checkpoints/3/src"})
    for uuid in ("src", "mine"):
        with pytest.raises(FileNotFoundError):
            storage.download(uuid, tmp_path / uuid)
    assert link.listed == ["checkpoints/3/src/", "checkpoints/8/mine/"]


def test_a_trial_with_storage_of_its_own_still_reads_its_source_from_the_cluster(tmp_path: Path) -> None:
    link = _Keys()
    own = SharedFSStorage(tmp_path / "shared")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "w.bin").write_bytes(b"mine")
    storage = WithSources(own, LinkedS3Storage(lambda: link, "kiln", "checkpoints/8", {"src": "checkpoints/3/src"}))
    assert storage.upload(tmp_path / "ckpt", "mine")["w.bin"].size == 4  # its own go to its own storage
    assert storage.location() == own.location()
    storage.download("mine", tmp_path / "back")
    assert (tmp_path / "back" / "w.bin").read_bytes() == b"mine"
    with pytest.raises(FileNotFoundError):
        storage.download("src", tmp_path / "src")
    assert link.listed == ["checkpoints/3/src/"]  # the source: from the cluster's store, through the worker
