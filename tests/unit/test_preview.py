"""`kiln preview-search`: the search's shape before any GPU is spent, and its simulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln.cli import main
from schemas.config import parse_config
from services.searcher.preview import CURVES, curve, preview

ASHA = """\
entrypoint: python3 train.py
hyperparameters: {lr: {type: log, minval: -4, maxval: -1}}
searcher: {name: adaptive_asha, metric: loss, time_metric: batches, max_time: 1000, max_trials: 100,
           divisor: 10, mode: MODE}
"""


@pytest.mark.parametrize(("mode", "bracket_rungs"), [("aggressive", [3]), ("standard", [3, 2]),
                                                     ("conservative", [3, 2, 1])])
def test_brackets_follow_the_mode(mode: str, bracket_rungs: list[int]) -> None:
    """ln(1000)/ln(10) truncates to 2, so R = 3 rungs (docs/asha.md); the modes pick brackets from it."""
    shown = preview(parse_config(ASHA.replace("MODE", mode))[0])
    assert [len(b.rungs) for b in shown.brackets] == bracket_rungs
    assert sum(b.max_trials for b in shown.brackets) == 100
    assert shown.brackets[0].rungs[-1].length == 1000


def test_rung_lengths_trials_and_total_length_of_one_bracket() -> None:
    shown = preview(parse_config(ASHA.replace("MODE", "aggressive"))[0])
    (bracket,) = shown.brackets
    assert [(r.length, r.trials) for r in bracket.rungs] == [(10, 100), (100, 10), (1000, 1)]
    # 90 trials stop at 10, 9 at 100, 1 trains to 1000.
    assert bracket.total_length == 90 * 10 + 9 * 100 + 1 * 1000
    assert shown.total_length == bracket.total_length


def test_random_and_grid_train_every_trial_to_the_end() -> None:
    grid = parse_config("entrypoint: x\nhyperparameters: {a: {type: categorical, vals: [1, 2, 3]}}\n"
                        "searcher: {name: grid, metric: m, max_length: {epochs: 4}}\n")[0]
    assert (preview(grid).trials, preview(grid).total_length, preview(grid).unit) == (3, 12, "epochs")


@pytest.mark.parametrize("smaller", [True, False])
def test_improving_curves_improve_in_the_searcher_s_direction(smaller: bool) -> None:
    f = curve("improving", smaller)
    early, late = f(3, 1), f(3, 50)
    assert (late < early) if smaller else (late > early)


def test_cli_preview_and_simulation(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(ASHA.replace("MODE", "aggressive").replace("max_trials: 100", "max_trials: 20"))
    out = CliRunner().invoke(main, ["preview-search", str(cfg), "--simulate", "improving", "--period", "10",
                                    "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    sim = data["simulation"]
    assert len(sim) == 20
    assert any(r["stopped_early"] for r in sim)
    assert max(r["stop_length"] for r in sim) == 1000
    text = CliRunner().invoke(main, ["preview-search", str(cfg)])
    assert text.exit_code == 0 and "rung 0: length" in text.output


def test_cli_reports_a_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("entrypoint: x\nsearcher: {name: adaptive_asha, metric: m}\n")
    out = CliRunner().invoke(main, ["preview-search", str(cfg)])
    assert out.exit_code == 1 and "max_trials" in out.output


def test_promotion_asha_closing_hundreds_of_paused_trials_at_once_does_not_recurse(tmp_path: Path) -> None:
    """The issue's config: with stop_once false, the end of the search closes every paused trial in one decision
    list; the simulator drains those exits in a loop, not one nested call per exit."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(ASHA.replace("MODE", "aggressive").replace("max_time: 1000", "max_time: 27")
                   .replace("max_trials: 100", "max_trials: 600")
                   .replace("divisor: 10", "divisor: 3, stop_once: false"))
    out = CliRunner().invoke(main, ["preview-search", str(cfg), "--simulate", "random", "--json"])
    assert out.exit_code == 0, out.output[-2000:]
    sim = json.loads(out.output)["simulation"]
    assert len(sim) == 600
    assert sum(1 for r in sim if r["stop_length"] == 27) >= 600 // 27  # the top rung was reached by a 1/27 share


def test_worse_each_report_is_worse_than_every_earlier_report_of_any_trial() -> None:
    for smaller in (True, False):
        f = curve("worse-each-report", smaller)
        values = [f(rid, t) for rid, t in [(0, 1), (1, 1), (0, 2), (2, 1), (1, 2)]]
        worse = (lambda a, b: a > b) if smaller else (lambda a, b: a < b)
        assert all(worse(b, a) for a, b in zip(values, values[1:], strict=False)), values
    assert curve("worse-each-report", True)(5, 5) == 1.0  # a fresh curve starts again


def test_the_cli_offers_every_curve() -> None:
    option = next(p for p in main.commands["preview-search"].params if p.name == "simulate")
    assert list(option.type.choices) == list(CURVES)  # type: ignore[attr-defined]
