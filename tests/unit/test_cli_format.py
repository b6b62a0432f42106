"""The CLI's help and output formatting: -h, --version, plain help texts, JSON flags, short numbers, no
trailing spaces, and a refused connection said in words (no stack needed)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import click
import pytest
from click.testing import CliRunner

from kiln import cli


def _commands(group: click.Group = cli.main, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                         click.Command]]:
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_h_is_help_everywhere_and_help_texts_carry_no_markup() -> None:
    runner = CliRunner()
    for path, _ in _commands():
        short = runner.invoke(cli.main, [*path, "-h"])
        assert short.exit_code == 0, (path, short.output)
        assert short.output == runner.invoke(cli.main, [*path, "--help"]).output
        assert "``" not in short.output, (path, short.output)
        assert not any(line != line.rstrip() for line in short.output.splitlines()), path


def test_every_option_has_help_json_flags_included() -> None:
    for path, command in _commands():
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("help", "version"):
                assert param.help, (path, param.name)


def test_version_flag_and_command_without_a_master(monkeypatch: pytest.MonkeyPatch) -> None:
    version = metadata.version("kiln")
    assert CliRunner().invoke(cli.main, ["--version"]).output == f"kiln {version}\n"
    monkeypatch.setenv("KILN_MASTER", f"http://127.0.0.1:{_closed_port()}")
    out = CliRunner().invoke(cli.main, ["version"])
    assert out.exit_code == 0
    assert out.output.splitlines()[0] == f"client: {version}"
    assert "master: unknown (cannot reach the Kiln master" in out.output


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again on return: nothing listens there


def test_a_refused_connection_is_said_in_words(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("KILN_MASTER", url)
    monkeypatch.setenv("KILN_TOKEN", "t")
    out = CliRunner().invoke(cli.main, ["experiment", "list"])
    assert out.exit_code == 1
    assert out.output == (f"error: cannot reach the Kiln master at {url}: connection refused"
                          " (is the stack up? `kiln up`)\n")


class FakeClient:
    def list_experiments(self, limit: int = 100) -> list[dict[str, Any]]:
        return [{"id": 3, "state": "ACTIVE", "num_trials": 1, "searcher_name": "single", "name": ""}]

    def get_experiment(self, experiment_id: int) -> dict[str, Any]:
        return {"id": 3, "name": "x", "state": "ACTIVE", "searcher_name": "random", "searcher_metric": "loss",
                "progress": 0.5, "priority": 42, "weight": 1.0, "max_slots": None}

    def list_trials(self, experiment_id: int) -> list[dict[str, Any]]:
        return [{"id": 1, "state": "RUNNING", "restarts": 0, "steps_completed": 3, "best_metric": None,
                 "latest_validation": None,
                 "hparams": {"lr": 0.0012345678901234, "nested": {"m": 0.9876543210987}, "width": 16}}]


def test_hparams_have_at_most_six_significant_digits_and_rows_no_trailing_spaces(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_client", FakeClient)
    runner = CliRunner()
    described = runner.invoke(cli.main, ["experiment", "describe", "3"]).output
    assert '{"lr": 0.00123457, "nested": {"m": 0.987654}, "width": 16}' in described
    listed = runner.invoke(cli.main, ["experiment", "list"]).output
    for output in (described, listed):
        assert not any(line != line.rstrip() for line in output.splitlines()), output
    exact = runner.invoke(cli.main, ["experiment", "describe", "3", "--json"]).output
    assert "0.0012345678901234" in exact  # --json keeps them exact
