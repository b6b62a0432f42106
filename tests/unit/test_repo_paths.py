"""The repository is self-contained: no file names a directory of a development machine.

Documents the code refers to live in the repository (e.g. ``docs/asha.md``); a path into the development
machines' shared folder means nothing to anyone who clones it.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Not part of the repository: environments, caches, build output, local stack state.
SKIP_DIRS = {".git", ".venv", ".kiln", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "build"}
# The development machines' layout (checkouts and shared documents under one root); built from pieces so
# that this file does not match itself.
OUTSIDE = re.compile(r"(?<![\w.-])(" + "/wo" + r"rk/|(\.\./)+sha" + r"red/)")


def _text_files() -> list[Path]:
    found = []
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        if any(p in SKIP_DIRS or p.endswith(".egg-info") or p.startswith(".venv") for p in parts):
            continue
        if path.is_file() and path.suffix not in {".png", ".npz", ".pyc"}:
            found.append(path)
    return found


def test_no_file_names_a_path_outside_the_repository() -> None:
    offenders = []
    for path in _text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not offenders, "\n".join(offenders)
