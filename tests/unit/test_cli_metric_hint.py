"""A searcher metric that no validation reports is named, with what was reported, in describe and --follow."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from kiln import cli

HINT = "searcher metric 'val_loss' was never reported; validations reported: test_loss"


class FakeClient:
    """The read model of an ended experiment whose trial reported ``test_loss`` only."""

    def __init__(self, metric_name: str = "test_loss") -> None:
        self.name = metric_name
        best = 0.5 if metric_name == "val_loss" else None

        self.experiment = {"id": 1, "name": "mnist", "state": "COMPLETED", "searcher_name": "single",
                           "searcher_metric": "val_loss", "progress": 1.0, "priority": 42, "weight": 1.0,
                           "max_slots": None, "end_reason": "", "best_trial": {"id": 7, "best_metric": best}
                           if best is not None else None}
        self.trial = {"id": 7, "experiment_id": 1, "state": "COMPLETED", "restarts": 0, "steps_completed": 10,
                      "best_metric": best, "hparams": {"lr": 0.1},
                      "latest_validation": {"steps_completed": 10, "metrics": {metric_name: 0.5}},
                      "allocations": []}

    def get_experiment(self, experiment_id: int) -> dict[str, Any]:
        return self.experiment

    def list_trials(self, experiment_id: int) -> list[dict[str, Any]]:
        return [self.trial]

    def get_trial(self, trial_id: int) -> dict[str, Any]:
        return self.trial

    def trial_metrics(self, trial_id: int, kind: str | None = None) -> list[dict[str, Any]]:
        return [{"steps_completed": 10, "metrics": {self.name: 0.5}}]

    def trial_checkpoints(self, trial_id: int) -> list[dict[str, Any]]:
        return []

    def stream_experiment(self, experiment_id: int) -> Any:
        yield "end", {"state": "COMPLETED"}


@pytest.mark.parametrize("args", [["experiment", "describe", "1"], ["trial", "describe", "7"]])
def test_describe_names_the_metric_never_reported(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setattr(cli, "_client", FakeClient)
    out = CliRunner().invoke(cli.main, args)
    assert out.exit_code == 0, out.output
    assert f"warning: {HINT}" in out.output


def test_follow_ends_with_the_hint_instead_of_a_silent_no_best(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    monkeypatch.setattr(cli.click, "echo", lambda text="", err=False, **_: lines.append(str(text)))
    assert cli._follow(FakeClient(), 1) == 0  # type: ignore[arg-type]
    assert f"warning: {HINT}" in lines
    assert "trial 7: validation at step 10: test_loss=0.5" in lines


def test_no_hint_when_the_metric_was_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_client", lambda: FakeClient("val_loss"))
    out = CliRunner().invoke(cli.main, ["experiment", "describe", "1"])
    assert "never reported" not in out.output
    assert cli.metric_hint("val_loss", set()) is None  # nothing validated yet: nothing to say
