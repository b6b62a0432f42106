"""The checked-in JSON Schema files match the events (the CI drift check) and cover every public event."""

from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path

import pytest

from schemas import events as ev
from schemas import jsonschema as js

# Internal streams whose events are deliberately not exported to outside systems.
INTERNAL = {ev.MessageDeadLettered}


def _members(union: object) -> set[type]:
    args = typing.get_args(union)
    return set(args) if args else {typing.cast(type, union)}


def test_checked_in_schema_files_equal_what_the_code_generates() -> None:
    """Drift check: regenerate with `python -m schemas.jsonschema --write` when this fails."""
    assert js.drift() == [], "schemas/json is stale: run `python -m schemas.jsonschema --write`"
    for name, schema in js.public_schemas().items():
        assert json.loads((js.SCHEMA_DIR / name).read_text(encoding="utf-8")) == schema


def test_one_file_per_public_stream_union() -> None:
    assert sorted(js.public_schemas()) == ["events.schema.json", "logs.schema.json", "metrics.schema.json"]


def test_every_event_class_appears_in_the_schemas() -> None:
    """Each Event subclass is in a public union's schema (or is internal), tagged by its class name."""
    events = {
        obj
        for _, obj in inspect.getmembers(ev, inspect.isclass)
        if issubclass(obj, ev.Event) and obj is not ev.Event and obj not in INTERNAL
    }
    schemas = js.public_schemas()
    defined: set[str] = set()
    for stem, (union, _) in js.PUBLIC_UNIONS.items():
        schema = schemas[js.file_name(stem)]
        for cls in _members(union):
            definition = schema["$defs"][cls.__name__]
            assert definition["properties"]["type"] == {"enum": [cls.__name__]}
            assert "type" in definition["required"]
        defined |= set(schema["$defs"])
    missing = {cls.__name__ for cls in events} - defined
    assert not missing, f"events in no public union/schema: {sorted(missing)}"
    # The domain union's discriminator names every domain event.
    mapping = schemas["events.schema.json"]["discriminator"]["mapping"]
    assert set(mapping) == {cls.__name__ for cls in _members(ev.DomainEvent)}


def test_schema_files_are_pretty_sorted_and_end_with_a_newline() -> None:
    for name in js.public_schemas():
        text = (js.SCHEMA_DIR / name).read_text(encoding="utf-8")
        assert text.endswith("}\n")
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_check_exits_1_listing_the_drifted_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert js.main(["--check", "--dir", str(tmp_path)]) == 1
    assert "metrics.schema.json" in capsys.readouterr().err
    assert js.main(["--write", "--dir", str(tmp_path)]) == 0
    assert js.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "logs.schema.json").write_text("{}\n")
    (tmp_path / "old.schema.json").write_text("{}\n")
    capsys.readouterr()
    assert js.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "logs.schema.json" in err and "old.schema.json" in err and "events.schema.json" not in err
    assert js.main(["--write", "--dir", str(tmp_path)]) == 0
    assert not (tmp_path / "old.schema.json").exists()
    assert js.drift(tmp_path) == []
