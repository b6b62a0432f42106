"""The `det` verbs and --json output of the CLI against a fake SDK client (no stack): wait's exit codes,
list-trials, config, set name/description, labels, create --config/--paused, trial logs -f/--rank/--since, the
limits of trial describe."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kiln import cli


class FakeClient:
    """Answers as the gateway would, from lists the test fills; records what was sent."""

    def __init__(self) -> None:
        self.states = ["ACTIVE", "COMPLETED"]
        self.sent: list[tuple[str, Any]] = []
        self.log_batches: list[list[dict[str, Any]]] = [[]]
        self.trial_state = ["RUNNING"]
        self.validations: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []

    # experiments
    def get_experiment(self, experiment_id: int) -> dict[str, Any]:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"id": experiment_id, "state": state, "end_reason": "", "best_trial": {"id": 7, "best_metric": 0.1},
                "config": {"name": "x"}, "config_yaml": "name: x\n# as submitted\n", "searcher_metric": "loss"}

    def wait_experiment(self, experiment_id: int, poll_s: float = 1.0, timeout_s: float | None = None) -> Any:
        while (exp := self.get_experiment(experiment_id))["state"] not in cli.TERMINAL_STATES:
            pass
        return exp

    def list_trials(self, experiment_id: int) -> list[dict[str, Any]]:
        return [{"id": 7, "state": "COMPLETED", "restarts": 0, "steps_completed": 10, "best_metric": 0.1,
                 "hparams": {"lr": 0.1}, "allocations": []}]

    def create_experiment(self, config_yaml: str, context: Path, paused: bool = False) -> dict[str, Any]:
        self.sent.append(("create", (config_yaml, paused)))
        return {"id": 3, "warnings": [], "context_digest": "d"}

    def kill_experiment(self, experiment_id: int) -> dict[str, Any]:
        return {"id": experiment_id, "state": "STOPPING_CANCELED"}

    def set_experiment_metadata(self, experiment_id: int, **change: Any) -> dict[str, Any]:
        self.sent.append(("metadata", change))
        removed = change.get("remove_labels") or []
        labels = [la for la in ["a", *(change.get("add_labels") or [])] if la not in removed]
        return {"id": experiment_id, "name": change.get("name") or "x", "description": change.get("description") or "",
                "labels": labels, "archived": bool(change.get("archived"))}

    # trials
    def get_trial(self, trial_id: int) -> dict[str, Any]:
        state = self.trial_state.pop(0) if len(self.trial_state) > 1 else self.trial_state[0]
        return {"id": trial_id, "experiment_id": 1, "state": state, "restarts": 0, "steps_completed": 5,
                "hparams": {}, "allocations": [{"id": "7.1", "worker_id": "w0", "nodes": [], "exit_code": None,
                                                "end_reason": ""}]}

    def trial_logs(self, trial_id: int, limit: int = 10000, offset: int = 0, tail: bool = False,
                   since: str | None = None) -> list[dict[str, Any]]:
        self.sent.append(("logs", since))
        seen = [line for batch in self.log_batches[:1] for line in batch]
        if len(self.log_batches) > 1:
            self.log_batches[:2] = [self.log_batches[0] + self.log_batches[1]]
        if since is not None:
            seen = [line for line in seen if line["ts"] >= since]
        return seen[-limit:] if tail else seen[offset:offset + limit]

    def trial_metrics(self, trial_id: int, kind: str | None = None) -> list[dict[str, Any]]:
        return self.validations

    def trial_checkpoints(self, trial_id: int) -> list[dict[str, Any]]:
        return self.checkpoints


def line(n: int, text: str, second: int = 0) -> dict[str, Any]:
    return {"allocation_id": "7.1", "line_no": n, "stream": "stdout", "ts": f"2026-12-03T10:00:{second:02d}.5Z",
            "text": text}


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()
    monkeypatch.setattr(cli, "_client", lambda: client)
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    return client


def run(*args: str) -> Any:
    return CliRunner().invoke(cli.main, list(args))


def test_wait_prints_the_final_state_and_exits_0_only_on_completed(fake: FakeClient) -> None:
    out = run("experiment", "wait", "4")
    assert (out.exit_code, out.output) == (0, "experiment 4: COMPLETED\n")
    fake.states = ["ACTIVE", "ERROR"]
    out = run("experiment", "wait", "4", "--json")
    assert out.exit_code == 1
    assert json.loads(out.output)["state"] == "ERROR"


def test_list_trials_and_config(fake: FakeClient) -> None:
    assert json.loads(run("experiment", "list-trials", "1", "--json").output)[0]["id"] == 7
    assert "0.1" in run("experiment", "list-trials", "1").output
    assert run("experiment", "config", "1").output == "name: x\n# as submitted\n"
    assert json.loads(run("experiment", "config", "1", "--json").output) == {"name": "x"}


def test_set_name_description_and_labels(fake: FakeClient) -> None:
    assert json.loads(run("experiment", "set", "name", "1", "new name", "--json").output)["name"] == "new name"
    assert "description = 'why'" in run("experiment", "set", "description", "1", "why").output
    out = run("experiment", "label", "add", "1", "b", "c", "--json")
    assert json.loads(out.output)["labels"] == ["a", "b", "c"]
    assert run("experiment", "label", "remove", "1", "a").output == "experiment 1: labels = (none)\n"
    assert fake.sent[-1] == ("metadata", {"remove_labels": ["a"]})


def test_state_changes_print_json(fake: FakeClient) -> None:
    assert json.loads(run("experiment", "kill", "2", "--json").output) == {"id": 2, "state": "STOPPING_CANCELED"}


def test_create_applies_config_overrides_and_paused(fake: FakeClient, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nsearcher:\n  name: single\n  max_length:\n    batches: 10\nlabels: [a, b]\n")
    out = run("experiment", "create", str(cfg), str(tmp_path), "--config", "searcher.max_length.batches=200",
              "--config", "hyperparameters.lr=0.01", "--config", "labels.1=c", "--paused", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"id": 3, "warnings": [], "context_digest": "d", "paused": True}
    sent_yaml, paused = fake.sent[0][1]
    assert paused is True
    assert yaml.safe_load(sent_yaml) == {"name": "x", "searcher": {"name": "single", "max_length": {"batches": 200}},
                                         "labels": ["a", "c"], "hyperparameters": {"lr": 0.01}}


def test_overrides_keep_the_text_without_any_and_name_bad_ones() -> None:
    text = "name: x  # comment\n"
    assert cli.apply_overrides(text, []) == text
    assert yaml.safe_load(cli.apply_overrides(text, ["debug=true", "n=3"])) == {"name": "x", "debug": True, "n": 3}
    for bad in ("novalue", "=3", "name.deeper=1", "a..b=1"):
        with pytest.raises(ValueError, match="--config"):
            cli.apply_overrides(text, [bad])


def test_since_takes_durations_and_times() -> None:
    now = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
    assert cli.parse_since("10m", now) == now - dt.timedelta(minutes=10)
    assert cli.parse_since("1.5h", now) == now - dt.timedelta(minutes=90)
    assert cli.parse_since("2026-12-03T11:00:00") == dt.datetime(2026, 12, 3, 11, 0, tzinfo=dt.UTC)
    with pytest.raises(Exception, match="neither a duration"):
        cli.parse_since("yesterday")


def test_log_lines_show_time_rank_and_worker(fake: FakeClient) -> None:
    fake.log_batches = [[line(1, "[rank=1] hello"), line(2, "plain")]]
    out = run("trial", "logs", "7")
    assert out.output.splitlines() == ["2026-12-03 10:00:00.5 [rank=1] w0  hello", "2026-12-03 10:00:00.5 w0  plain"]
    rows = json.loads(run("trial", "logs", "7", "--json").output)
    assert [(r["rank"], r["worker"], r["message"]) for r in rows] == [(1, "w0", "hello"), (None, "w0", "plain")]
    assert [r["message"] for r in json.loads(run("trial", "logs", "7", "--json", "--rank", "1").output)] == ["hello"]


def test_follow_prints_every_line_once_until_the_trial_ends(fake: FakeClient) -> None:
    fake.log_batches = [[line(1, "one", 1)], [line(2, "two", 2)], [line(3, "trial process exited with code 0", 3)]]
    fake.trial_state = ["RUNNING", "RUNNING", "COMPLETED"]
    out = run("trial", "logs", "7", "-f", "--json")
    assert out.exit_code == 0, out.output
    texts = [json.loads(x)["message"] for x in out.output.splitlines()]
    assert texts == ["one", "two", "trial process exited with code 0"]
    # It asks again from shortly before the newest line it saw, not from the start.
    assert any(since is not None and since.startswith("2026-12-03T09:59") for kind, since in fake.sent)


def test_trial_describe_shows_the_last_ten_unless_all(fake: FakeClient) -> None:
    fake.validations = [{"steps_completed": i, "metrics": {"loss": 1.0 / (i + 1)}} for i in range(25)]
    out = run("trial", "describe", "7")
    assert "(15 earlier validations not shown: --all shows every one)" in out.output
    assert out.output.count("validation at step") == 10 and "step 24:" in out.output
    assert run("trial", "describe", "7", "--all").output.count("validation at step") == 25


def test_every_command_that_prints_data_has_json() -> None:
    import click

    def walk(group: click.Group, path: tuple[str, ...] = ()) -> Any:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from walk(command, (*path, name))
            else:
                yield " ".join((*path, name)), command

    # Sign-in prompts and the replay tool's progress report are interactive, not data; `worker` becomes the agent.
    without = {name for name, command in walk(cli.main) if not any(p.name == "as_json" for p in command.params)}
    assert without == {"user login", "user logout", "events replay", "completion", "worker"}


def test_completion_scripts_complete_subcommands() -> None:
    assert "_KILN_COMPLETE=bash_complete" in run("completion", "bash").output
    env = {"_KILN_COMPLETE": "bash_complete", "COMP_WORDS": "kiln experiment li", "COMP_CWORD": "2"}
    out = CliRunner().invoke(cli.main, [], prog_name="kiln", env=env)
    assert "plain,list" in out.output and "plain,list-trials" in out.output


def test_wait_waits_out_an_experiment_not_yet_in_the_read_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.client import APIError, Client

    answers: list[Any] = [APIError(404, "experiment 9 not found"), {"id": 9, "state": "ACTIVE"},
                          {"id": 9, "state": "COMPLETED"}]

    def get_experiment(self: Client, experiment_id: int) -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    monkeypatch.setattr(Client, "get_experiment", get_experiment)
    client = Client("http://127.0.0.1:1", token="")
    assert client.wait_experiment(9, poll_s=0.0)["state"] == "COMPLETED"
    answers[:] = [APIError(404, "experiment 9 not found")]
    with pytest.raises(APIError):
        client.wait_experiment(9, poll_s=0.0, not_found_s=0.0)
    assert run("experiment", "create", __file__, ".", "--paused", "--follow").exit_code == 1
