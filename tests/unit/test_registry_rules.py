"""The model registry's input rules (names, metadata, version selectors) and the collector keeping registered
checkpoints: pure, or over in-memory fakes of the bus and the store."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from schemas import events as ev
from schemas import registry
from services.gateway import collector


@pytest.mark.parametrize(("name", "ok"), [
    ("digits", True), ("digits-cnn_v2.1", True), ("A", True), ("7up", True), ("a" * 128, True),
    ("", False), ("a" * 129, False), ("123", False), ("-x", False), (".x", False), ("a b", False), ("a/b", False),
    ("näme", False), ("x\n", False), ("x\x00", False), ("latest?", False),
])
def test_model_names(name: str, ok: bool) -> None:
    problem = registry.check_model_name(name)
    assert (problem is None) is ok
    if not ok:
        assert problem == registry.NAME_RULE


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize(("metadata", "problem"), [
    ({}, None),
    ({"framework": "torch", "acc": 0.97, "n": 3, "ok": True, "none": None, "tags": ["a", {"b": 1}]}, None),
    ([], "metadata must be a JSON object"),
    ({"a": "x\x00y"}, "metadata.a contains a NUL byte"),
    ({"a": ["ok", "\ud800"]}, "metadata.a[1] is not valid Unicode (a lone surrogate)"),
    ({"bad\x00key": 1}, "metadata has a key that contains a NUL byte"),
    ({"big": 2**63}, "metadata.big is an integer beyond 64 bits"),
    ({"small": -(2**63)}, None),
    ({"blob": "x" * (64 * 1024)}, "metadata is over 64 KiB as JSON"),
    (_nested(32), None),
    (_nested(40), "nests deeper than 32 levels"),
])
def test_metadata_problems_name_where_they_are(metadata: Any, problem: str | None) -> None:
    found = registry.metadata_problem(metadata)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize(("text", "parsed"), [
    (None, "latest"), ("latest", "latest"), (-1, "latest"), (3, 3), ("12", 12),
    ("0", ValueError), (0, ValueError), ("v1", ValueError), ("-2", ValueError), ("", ValueError), (True, ValueError),
    ("١", ValueError),  # an Arabic-Indic one: a digit to str.isdigit, not a version
])
def test_version_selectors(text: Any, parsed: Any) -> None:
    if parsed is ValueError:
        with pytest.raises(ValueError, match="a model version is a number from 1"):
            registry.parse_version(text)
    else:
        assert registry.parse_version(text) == parsed


class _Store:
    """The object store, in memory, with the two calls the collector makes."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = set(keys)

    def list_objects(self, bucket: str, prefix: str, recursive: bool) -> list[Any]:
        return [type("Obj", (), {"object_name": k}) for k in sorted(self.keys) if k.startswith(prefix)]

    def remove_objects(self, bucket: str, objects: list[Any]) -> list[Any]:
        for o in objects:
            self.keys.discard(o.name)
        return []


class _Bus:
    def __init__(self) -> None:
        self.published: list[Any] = []

    async def publish(self, event: Any) -> int:
        self.published.append(event)
        return len(self.published)


def test_the_collector_keeps_a_checkpoint_registered_after_the_searcher_decided() -> None:
    store = _Store([f"checkpoints/1/{u}/{f}" for u in ("a", "b", "c") for f in ("model.pt", "meta.json")])
    bus = _Bus()
    refs = [ev.CheckpointRef(uuid=u, trial_id=1, storage="s3://kiln/checkpoints/1") for u in ("a", "b", "c")]
    request = ev.CheckpointGCRequested(experiment_id=1, checkpoints=refs, reason="gc policy changed")
    asked: list[list[str]] = []

    async def registered(uuids: list[str]) -> set[str]:
        asked.append(uuids)
        return {"b"}

    done = asyncio.run(collector.collect(bus, store, "kiln", request, registered))  # type: ignore[arg-type]
    assert asked == [["a", "b", "c"]]
    assert store.keys == {"checkpoints/1/b/model.pt", "checkpoints/1/b/meta.json"}
    assert done is not None and done.uuids == ["a", "c"] and done.objects_removed == 4
    assert bus.published == [done]

    # Every one registered: nothing deleted, nothing published (the searcher already let go of them).
    only_b = ev.CheckpointGCRequested(experiment_id=1, checkpoints=[refs[1]], reason="again")
    assert asyncio.run(collector.collect(bus, store, "kiln", only_b, registered)) is None  # type: ignore[arg-type]
    assert len(store.keys) == 2 and bus.published == [done]
