"""The tracker's fold of the model registry's events: pure, no database (the SQL side: tests/integration)."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas import events as ev
from services.tracker.projection import Fold, Item


def fold(*events: Any, models: dict[int, dict[str, Any]] | None = None) -> Fold:
    f = Fold(models=models)
    for i, e in enumerate(events, 1):
        f.apply(Item(seq=i, ts=1000.0 + i, event=e))
    f.finish()
    return f


def created(model: int, name: str, **fields: Any) -> ev.ModelCreated:
    return ev.ModelCreated(model_id=model, name=name, created_by="ann", created_at=500.0, **fields)


def registered(model: int, version: int, uuid: str = "ck") -> ev.ModelVersionRegistered:
    return ev.ModelVersionRegistered(model_id=model, version=version, checkpoint_uuid=uuid, experiment_id=3,
                                     trial_id=4, registered_by="ann", registered_at=600.0, comment="first")


def test_a_created_model_and_its_versions_become_rows() -> None:
    f = fold(created(1, "digits", description="cnn", labels=["a"], metadata={"k": 1}), registered(1, 1, "ck1"),
             registered(1, 2, "ck2"))
    m = f.models[1]
    assert (m["name"], m["description"], m["owner"], m["last_version"], m["created_at"].timestamp()) == \
        ("digits", "cnn", "ann", 2, 500.0)
    assert msgspec.json.decode(m["labels"]) == ["a"] and msgspec.json.decode(m["metadata"]) == {"k": 1}
    assert m["updated_at"].timestamp() == 1003.0  # the stream time of the last change
    assert sorted(f.model_versions) == [(1, 1), (1, 2)]
    v = f.model_versions[(1, 2)]
    assert (v["checkpoint_uuid"], v["experiment_id"], v["trial_id"], v["comment"], v["registered_by"]) == \
        ("ck2", 3, 4, "first", "ann")
    assert f.protection_changed == {"ck1", "ck2"}


def test_a_name_belongs_to_one_live_model_and_a_delete_frees_it() -> None:
    f = fold(created(1, "digits"), created(2, "digits"))
    assert set(f.models) == {1}  # the second create of the name is void
    f = fold(created(1, "digits"), ev.ModelDeleted(model_id=1), created(2, "digits"))
    assert set(f.models) == {2} and f.models_deleted == {1}
    # A live model loaded from the read model holds its name against a create in this batch.
    loaded = {7: {"id": 7, "name": "digits", "labels": "[]", "metadata": "{}", "last_version": 0}}
    assert set(fold(created(8, "digits"), models=loaded).models) == {7}


def test_versions_only_for_a_live_model_and_with_fresh_numbers() -> None:
    f = fold(registered(9, 1))  # no such model
    assert not f.model_versions and not f.changed["models"]
    f = fold(created(1, "m"), registered(1, 1, "a"), registered(1, 1, "b"), registered(1, 2, "c"))
    assert {k: v["checkpoint_uuid"] for k, v in f.model_versions.items()} == {(1, 1): "a", (1, 2): "c"}
    f = fold(created(1, "m"), registered(1, 1, "a"), ev.ModelVersionDeleted(model_id=1, version=1),
             registered(1, 1, "b"))
    assert f.model_versions == {} and f.versions_deleted == {(1, 1)}  # a number is never taken twice


def test_metadata_changes_follow_the_one_rules() -> None:
    f = fold(created(1, "m", labels=["a", "b"], metadata={"x": 1, "y": 2}),
             ev.ModelMetadataChanged(model_id=1, description="new", labels_added=["c", "a"], labels_removed=["b"],
                                     metadata_set={"y": 3, "z": [1]}, metadata_removed=["x"], change_id="1"))
    m = f.models[1]
    assert m["description"] == "new"
    assert msgspec.json.decode(m["labels"]) == ev.relabelled(["a", "b"], ["c", "a"], ["b"]) == ["a", "c"]
    assert msgspec.json.decode(m["metadata"]) == {"y": 3, "z": [1]}


def test_a_deleted_model_takes_its_versions_and_later_events_change_nothing() -> None:
    f = fold(created(1, "m"), registered(1, 1, "a"), ev.ModelDeleted(model_id=1),
             ev.ModelMetadataChanged(model_id=1, description="late", change_id="1"), registered(1, 2, "b"))
    assert f.models == {} and f.model_versions == {} and not f.changed["models"]
    assert f.models_deleted == {1} and f.protection_changed == {"a"}
