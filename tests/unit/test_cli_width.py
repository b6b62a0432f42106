"""Tables fit the terminal: rows are cut at its width (with "…"); piped output keeps whole lines for scripts."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from kiln import cli


class LongNames:
    def list_experiments(self, limit: int = 100, archived: bool | None = False) -> list[dict[str, Any]]:
        return [{"id": 12, "state": "STOPPING_CANCELED", "num_trials": 120, "searcher_name": "adaptive_asha",
                 "name": "a-very-long-experiment-name-" * 4, "labels": ["baseline", "nightly"]}]


def test_rows_are_cut_to_the_terminal_and_columns_stay_aligned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_client", LongNames)
    monkeypatch.setattr(cli, "_terminal_width", lambda: 80)
    lines = CliRunner().invoke(cli.main, ["experiment", "list"]).output.splitlines()
    header, row = lines[0], lines[1]
    assert len(row) == 80 and row.endswith("…")
    # The longest searcher name still leaves NAME where the header says.
    assert row.index("a-very-long") == header.index("NAME")


def test_a_pipe_gets_whole_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_client", LongNames)
    row = CliRunner().invoke(cli.main, ["experiment", "list"]).output.splitlines()[1]  # CliRunner: not a tty
    assert row.endswith("[baseline, nightly]") and "…" not in row
