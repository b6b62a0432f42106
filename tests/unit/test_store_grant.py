"""The key-prefix rule a worker applies before presigning for a trial (services.worker.link.store_refusal)."""

from __future__ import annotations

import pytest

from schemas import events as ev
from schemas.trial import (
    ListRequest,
    PresignRequest,
    checkpoint_prefix,
    decode_frame,
    encode_frame,
    tensorboard_prefix,
)
from services.worker.link import Identity, StoreGrant, key_refusal, refusal, store_refusal

GRANT = StoreGrant.of(7)
UUID = "0b7c1f9e-2a4d-4c8e-9f10-3d5e6a7b8c9d"


def test_an_experiments_checkpoints_live_under_its_own_prefix() -> None:
    assert checkpoint_prefix(7) == "checkpoints/7"
    assert GRANT.write == ("checkpoints/7/",) and GRANT.read == ("checkpoints/7/",)
    assert StoreGrant.of(7, ("checkpoints/3/" + UUID,)).read == ("checkpoints/7/", f"checkpoints/3/{UUID}/")


@pytest.mark.parametrize(("method", "key"), [
    ("PUT", f"checkpoints/7/{UUID}/model.pt"),
    ("PUT", f"checkpoints/7/{UUID}/sub/dir/metadata.json"),
    ("GET", f"checkpoints/7/{UUID}/model.pt"),  # its own, or the one it resumes from (same experiment)
    ("LIST", f"checkpoints/7/{UUID}/"),
    ("LIST", "checkpoints/7/"),
])
def test_a_trial_may_read_and_write_its_own_experiments_checkpoints(method: str, key: str) -> None:
    assert store_refusal(GRANT, method, key) == ""


@pytest.mark.parametrize(("method", "key", "why"), [
    ("GET", f"checkpoints/8/{UUID}/model.pt", "outside"),  # another experiment's
    ("PUT", f"checkpoints/8/{UUID}/model.pt", "outside"),
    ("PUT", f"checkpoints/70/{UUID}/x", "outside"),  # a prefix of the id is not the experiment
    ("GET", "contexts/abc.tar.gz", "outside"),  # code contexts are the worker's
    ("LIST", "", "empty"),  # the whole bucket
    ("LIST", "checkpoints/", "outside"),
    ("LIST", "checkpoints/8/", "outside"),
    ("LIST", "checkpoints/7", "end in '/'"),
    ("PUT", "checkpoints/7/", "outside"),  # the prefix itself is no object
    ("GET", "checkpoints/7/../8/x/model.pt", "'..'"),  # the filer maps keys to paths
    ("PUT", "checkpoints/7/./x", "'.'"),
    ("GET", "checkpoints/7//x", "empty"),
    ("GET", "/checkpoints/7/x", "empty"),
    ("GET", "checkpoints/7/x\\..\\y", "backslash"),
    ("GET", "checkpoints/7/x\n", "control"),
    ("DELETE", f"checkpoints/7/{UUID}/model.pt", "may GET, PUT or LIST"),
    ("PUT", "checkpoints/7/" + "x" * 1100, "longer"),
])
def test_anything_else_is_refused(method: str, key: str, why: str) -> None:
    assert why in store_refusal(GRANT, method, key)


def test_a_source_checkpoint_is_readable_not_writable() -> None:
    grant = StoreGrant.of(7, (f"checkpoints/3/{UUID}",))
    assert store_refusal(grant, "GET", f"checkpoints/3/{UUID}/model.pt") == ""
    assert store_refusal(grant, "LIST", f"checkpoints/3/{UUID}/") == ""
    assert "outside" in store_refusal(grant, "PUT", f"checkpoints/3/{UUID}/model.pt")
    assert "outside" in store_refusal(grant, "GET", "checkpoints/3/another/model.pt")


def test_a_trial_may_write_its_own_trials_tensorboard_files_and_no_other_trials() -> None:
    grant = StoreGrant.of(7, trial_id=3)
    assert tensorboard_prefix(7, 3) == "tensorboard/7/3"
    assert store_refusal(grant, "PUT", "tensorboard/7/3/events.out.tfevents.1.host.1.0") == ""
    assert store_refusal(grant, "PUT", "tensorboard/7/3/custom/plugins/profile/trace.json") == ""
    for key in ("tensorboard/7/4/events", "tensorboard/7/30/events", "tensorboard/8/3/events", "tensorboard/7/events",
                "tensorboard/7/3/"):
        assert "outside" in store_refusal(grant, "PUT", key), key
    assert "'..'" in store_refusal(grant, "PUT", "tensorboard/7/3/../4/events")
    assert "outside" in store_refusal(grant, "GET", "tensorboard/7/3/events")  # written, never read back
    assert "outside" in store_refusal(grant, "LIST", "tensorboard/7/3/")
    assert "outside" in store_refusal(GRANT, "PUT", "tensorboard/7/3/events")  # a grant without a trial has none


def test_plain_keys() -> None:
    assert key_refusal("a/b/c") == "" and key_refusal("a/b/") == ""
    assert key_refusal("a/../b") and key_refusal("") and key_refusal("a//b")


def test_a_checkpoint_record_must_name_one_key_segment_in_its_own_prefix() -> None:
    who = Identity(experiment_id=7, trial_id=1, allocation_id="1.1")

    def stored(uuid: str, storage: str) -> ev.CheckpointStored:
        return ev.CheckpointStored(experiment_id=7, trial_id=1, uuid=uuid, steps_completed=1, storage=storage)

    assert refusal(who, stored(UUID, "s3://kiln/checkpoints/7")) == ""
    assert refusal(who, stored(UUID, "file:///mnt/ckpt")) == ""  # the user's own storage
    assert refusal(who, stored(UUID, "s3://their-bucket/models")) == ""
    assert "not one plain key segment" in refusal(who, stored(f"../8/{UUID}", "s3://kiln/checkpoints/7"))
    assert "not one plain key segment" in refusal(who, stored("..", "s3://kiln/checkpoints/7"))
    assert "not this experiment's" in refusal(who, stored(UUID, "s3://kiln/checkpoints/8"))
    assert "not this experiment's" in refusal(who, stored(UUID, "s3://kiln/checkpoints"))


def test_the_store_frames_round_trip() -> None:
    for frame in (PresignRequest(id=1, method="PUT", key="k"), ListRequest(id=2, prefix="p/")):
        assert decode_frame(encode_frame(frame)[4:]) == frame


@pytest.mark.parametrize("method", ["CREATE_MULTIPART", "UPLOAD_PART", "COMPLETE_MULTIPART", "ABORT_MULTIPART"])
def test_each_step_of_a_multipart_upload_is_a_write_checked_like_a_put(method: str) -> None:
    sourced = StoreGrant.of(7, (f"checkpoints/3/{UUID}",))
    assert store_refusal(sourced, method, f"checkpoints/7/{UUID}/model.pt") == ""
    assert "outside what this trial may write" in store_refusal(sourced, method, f"checkpoints/3/{UUID}/model.pt")
    assert "outside what this trial may write" in store_refusal(sourced, method, f"checkpoints/8/{UUID}/model.pt")
    assert "may only read other buckets" in store_refusal(sourced, method, f"t/{UUID}/x", bucket="data")
    frame = PresignRequest(id=1, method=method, key="k", upload_id="u", part_number=2)  # type: ignore[arg-type]
    assert decode_frame(encode_frame(frame)[4:]) == frame
