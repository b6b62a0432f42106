"""A hostile YAML config is refused quickly and with little memory, naming what was wrong: alias bombs,
recursive or deep documents, big documents, text Postgres and JSON cannot hold. The CLI parses with the same limits."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln.cli import main as cli
from schemas.config import ConfigError, YamlLimits, parse_config
from tests.unit.test_gateway_input import CONFIG, billion_laughs


def _errors(doc: str, limits: YamlLimits | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, limits)
    return [(e.path, e.message) for e in info.value.errors]


def test_a_billion_laughs_is_refused_with_little_memory() -> None:
    """Refused from the node graph, before anything is expanded (no test asserts a timing)."""
    doc = billion_laughs()
    assert len(doc) < 700  # the 670-byte bomb of the finding: 9**9 strings once expanded
    tracemalloc.start()
    try:
        errors = _errors(doc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert errors == [("<yaml>", "the config holds more than 100000 values once its aliases are expanded")]
    assert peak < 8 * 1024 * 1024


def test_alias_count_nesting_and_size_are_limits_of_their_own() -> None:
    many = CONFIG + "x: &a 1\ny: [" + ", ".join(["*a"] * 101) + "]\n"
    assert _errors(many) == [("<yaml>", "more than 100 aliases (*name); write the values out")]
    assert _errors("x: &a [*a]\n")[0][1].endswith("an alias refers to a node that contains it (a recursive document)")
    assert _errors("x: " + "{a: " * 65 + "1" + "}" * 65) == [("<yaml>", "nested more than 64 levels deep")]
    assert _errors(CONFIG, YamlLimits(max_bytes=50)) == [
        ("<yaml>", f"the config is {len(CONFIG)} bytes, over the 50-byte limit")]
    # Within every limit, anchors and aliases work as before.
    cfg, _ = parse_config(CONFIG + "labels: [&l x, *l]\n")
    assert cfg.labels == ["x", "x"]


def test_text_and_numbers_that_cannot_be_stored_are_refused_with_their_paths() -> None:
    doc = CONFIG + 'labels: ["ok", "a\\0b"]\ndescription: "\\ud800"\nmax_restarts: 18446744073709551616\n'
    assert _errors(doc) == [
        ("description", "is not valid Unicode (a lone surrogate)"),
        ("labels[1]", "contains a NUL byte"),
        ("max_restarts", "integer 18446744073709551616 does not fit in 64 bits"),
    ]
    assert _errors(CONFIG + 'environment: {environment_variables: {"A\\0": x}}\n') == [
        ("environment.environment_variables.A\x00", "key contains a NUL byte")]


def test_preview_search_parses_with_the_same_limits(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    result = CliRunner().invoke(cli, ["preview-search", str(bomb)])
    assert result.exit_code != 0
    assert "more than 100000 values once its aliases are expanded" in result.output
