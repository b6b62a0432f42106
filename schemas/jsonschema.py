"""JSON Schema of every public event, generated from the msgspec definitions in ``schemas.events``.

One file per public stream union, checked in under ``schemas/json/`` for outside systems (README "Bus").
The files are generated, never edited: ``python -m schemas.jsonschema --write`` regenerates them and
``--check`` exits 1 when the checked-in files differ from the code (``tests/unit/test_jsonschema.py``
runs the same comparison, so drift fails the test suite). No I/O at import.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from schemas import events as ev

SCHEMA_DIR = Path(__file__).resolve().parent / "json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"

# file stem -> (stream union, what it carries). Dead letters and heartbeats are internal: not exported.
PUBLIC_UNIONS: dict[str, tuple[Any, str]] = {
    "events": (ev.DomainEvent,
               "KILN_EVENTS, subjects kiln.events.>: the domain events (kept forever);"
               " the last token names the publisher"),
    "metrics": (ev.MetricEvent,
                "KILN_METRICS, subjects kiln.metrics.<experiment>.<trial>.<publisher>: training metric batches"),
    "logs": (ev.LogEvent, "KILN_LOGS, subjects kiln.logs.<experiment>.<trial>.<publisher>: log line batches"),
}


def file_name(stem: str) -> str:
    """The checked-in file name of one stream's schema."""
    return f"{stem}.schema.json"


def public_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema (draft 2020-12) of one public stream union, definitions inlined."""
    out: dict[str, dict[str, Any]] = {}
    for stem, (union, description) in PUBLIC_UNIONS.items():
        (root,), components = msgspec.json.schema_components([union], ref_template="#/$defs/{name}")
        schema: dict[str, Any] = {
            "$schema": DIALECT,
            "title": f"Kiln {stem} stream",
            "description": description,
            **root,
            "$defs": components,
        }
        out[file_name(stem)] = schema
    return out


def render(schema: dict[str, Any]) -> str:
    """The checked-in text of one schema: pretty, sorted keys, trailing newline (stable diffs)."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def drift(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of the files under ``directory`` that are missing, differ from the code, or are stale."""
    expected = {name: render(schema) for name, schema in public_schemas().items()}
    differing = []
    for name, text in sorted(expected.items()):
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            differing.append(name)
    # A schema file no union generates any more would mislead outside readers.
    if directory.is_dir():
        differing += sorted(p.name for p in directory.glob("*.schema.json") if p.name not in expected)
    return differing


def write(directory: Path = SCHEMA_DIR) -> list[str]:
    """Regenerate every schema file under ``directory`` (and drop stale ones); return what changed."""
    changed = drift(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected = public_schemas()
    for name in changed:
        path = directory / name
        if name in expected:
            path.write_text(render(expected[name]), encoding="utf-8")
        else:
            path.unlink()
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """``--write`` regenerates schemas/json; ``--check`` exits 1 listing the files that drifted."""
    parser = argparse.ArgumentParser(prog="python -m schemas.jsonschema", description=main.__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the checked-in schema files")
    mode.add_argument("--check", action="store_true", help="exit 1 if the checked-in files differ from the code")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="schema directory (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.write:
        for name in write(args.dir):
            print(f"{'wrote' if (args.dir / name).exists() else 'removed'} {args.dir / name}")
        return 0
    differing = drift(args.dir)
    for name in differing:
        print(f"{args.dir / name} differs from schemas/events.py", file=sys.stderr)
    if differing:
        print("run: python -m schemas.jsonschema --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
