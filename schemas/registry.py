"""The model registry's rules for user input, shared by the gateway (which refuses bad input with a 400) and the
clients (which can check before sending). Pure, no I/O.

A model name is part of URLs (``/api/v1/models/{name}``) and what ``kiln.models.load(name)`` takes, so it is kept
to characters that need no quoting; a name of digits only would read as a model id (Determined's
``get_model(identifier)`` takes either), so it is refused. Metadata is any JSON object a user attaches, bounded so
that Postgres can hold it (no NUL bytes, no lone surrogates, integers within 64 bits) and a request cannot make
the read model grow without end.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from schemas.config import text_problem

MAX_NAME = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_RULE = (f"a model name is 1-{MAX_NAME} letters, digits and _.- (starting with a letter or digit), and not only"
             " digits (that reads as a model id)")
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 32
LATEST: Literal["latest"] = "latest"


def check_model_name(name: str) -> str | None:
    """Why ``name`` cannot name a model, or None."""
    if len(name) > MAX_NAME or not _NAME.fullmatch(name) or name.isdigit():
        return NAME_RULE
    return None


def metadata_problem(metadata: Any, what: str = "metadata") -> str | None:
    """Why ``metadata`` (a JSON object a user sent) cannot be stored, or None; the problem names where it is."""
    if not isinstance(metadata, dict):
        return f"{what} must be a JSON object"
    try:  # the size first: the walk below then never goes over more than that
        size = len(msgspec.json.encode(metadata))
    except (UnicodeEncodeError, RecursionError):
        size = 0  # the walk says where
    if size > MAX_METADATA_BYTES:
        return f"{what} is over {MAX_METADATA_BYTES // 1024} KiB as JSON"
    stack: list[tuple[str, Any, int]] = [(what, metadata, 0)]
    while stack:  # iterative: a deeply nested value must not exhaust the interpreter's stack
        path, value, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            return f"{path} nests deeper than {MAX_METADATA_DEPTH} levels"
        if isinstance(value, str):
            if problem := text_problem(value):
                return f"{path} {problem}"
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            continue
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                return f"{path} is an integer beyond 64 bits"
        elif isinstance(value, dict):
            for key, item in value.items():
                if problem := text_problem(str(key)):
                    return f"{path} has a key that {problem}"
                stack.append((f"{path}.{key}", item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value))
        else:
            return f"{path} is not a JSON value"
    return None


def parse_version(text: str | int | None) -> int | Literal["latest"]:
    """A version selector as users write it: a number, or ``latest`` (also None, as Determined's
    ``get_version()`` without an argument, and -1, its old spelling of it). ValueError for anything else."""
    if text is None or text == LATEST or text == -1:
        return LATEST
    if isinstance(text, int) and not isinstance(text, bool) and text >= 1:
        return text
    if isinstance(text, str) and text.isascii() and text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"a model version is a number from 1, or {LATEST!r}; got {text!r}")
