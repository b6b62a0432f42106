"""Determined example configs Kiln used to refuse: zero periods, a type-less checkpoint_storage, task configs."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.config import (
    DEFAULT_STORAGE,
    ConfigError,
    Length,
    S3Storage,
    SharedFSStorage,
    config_from_wire,
    config_to_dict,
    parse_config,
)

BASE = """\
name: mnist
entrypoint: python3 train.py
searcher:
  name: single
  metric: validation_loss
  max_length:
    batches: 100
"""

TASK_MESSAGE = "this is a task config (notebook/command/shell), not an experiment config: Kiln runs experiments"


def errors_of(source: str | dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(source)
    return [(e.path, e.message) for e in info.value.errors]


@pytest.mark.parametrize("unit", ["batches", "records", "epochs"])
def test_zero_validation_period_means_none(unit: str) -> None:
    cfg, warnings = parse_config(BASE + f"min_validation_period:\n  {unit}: 0\n")
    assert cfg.min_validation_period is None
    assert warnings == []


def test_zero_checkpoint_period_means_never() -> None:
    cfg, _ = parse_config(BASE + "min_checkpoint_period: {batches: 0}\nmin_validation_period: {batches: 50}\n")
    assert cfg.min_checkpoint_period is None
    assert cfg.min_validation_period == Length(batches=50)


def test_zero_period_round_trips_through_the_wire() -> None:
    cfg, _ = parse_config(BASE + "min_validation_period: {batches: 0}\n")
    assert config_from_wire(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("period", "path"),
    [
        ("{batches: -1}", "min_validation_period.batches"),
        ("{batches: 0, epochs: 2}", "min_validation_period.batches"),
        ("{batches: zero}", "min_validation_period.batches"),
        ("{batches: false}", "min_validation_period.batches"),
    ],
)
def test_bad_periods_are_still_refused(period: str, path: str) -> None:
    assert [p for p, _ in errors_of(BASE + f"min_validation_period: {period}\n")] == [path]


def test_typeless_storage_merges_into_the_stack_default() -> None:
    cfg, _ = parse_config(BASE + "checkpoint_storage:\n  save_trial_best: 3\n  save_experiment_best: 1\n")
    assert cfg.checkpoint_storage == S3Storage(bucket=DEFAULT_STORAGE["bucket"], save_trial_best=3,
                                               save_experiment_best=1)


def test_typeless_storage_takes_the_gateway_default_and_keeps_given_fields() -> None:
    source = BASE + "checkpoint_storage:\n  prefix: runs\n  save_trial_latest: 2\n"
    cfg, _ = parse_config(source, default_storage={"type": "s3", "bucket": "team", "prefix": "default"})
    assert cfg.checkpoint_storage == S3Storage(bucket="team", prefix="runs", save_trial_latest=2)
    fs, _ = parse_config(BASE + "checkpoint_storage: {save_trial_best: 2}\n",
                         default_storage={"type": "shared_fs", "host_path": "/mnt/ckpt"})
    assert fs.checkpoint_storage == SharedFSStorage(host_path="/mnt/ckpt", save_trial_best=2)


def test_typeless_storage_round_trips_with_its_type() -> None:
    cfg, _ = parse_config(BASE + "checkpoint_storage: {save_trial_best: 2}\n")
    wire = config_to_dict(cfg)
    assert wire["checkpoint_storage"]["type"] == "s3"
    assert config_from_wire(wire) == cfg


def test_typeless_storage_field_errors_keep_their_paths() -> None:
    assert errors_of(BASE + "checkpoint_storage: {save_trial_best: -1, host_pth: /x}\n") == [
        ("checkpoint_storage.save_trial_best", "expected int >= 0, got -1"),
        ("checkpoint_storage.host_pth", "unknown field"),
    ]


# Determined's notebook config (examples' notebook.yaml shape), a command and a bare shell config.
NOTEBOOK = """\
description: my notebook
notebook_idle_type: kernels_or_terminals
idle_timeout: 30m
environment:
  image: determinedai/pytorch-ngc:0.38.1
resources:
  slots: 1
"""


@pytest.mark.parametrize(
    ("source", "field"),
    [
        (NOTEBOOK, "notebook_idle_type"),
        ("entrypoint: jupyter lab\nidle_timeout: 1h\n", "idle_timeout"),
        ("entrypoint: [python3, serve.py]\nwork_dir: /run/determined/workdir\n", "work_dir"),
    ],
)
def test_task_config_names_its_giveaway_field(source: str, field: str) -> None:
    ((path, message),) = errors_of(source)
    assert path == field
    assert message.startswith(TASK_MESSAGE)
    assert repr(field) in message


def test_environment_and_resources_only_is_a_task_config() -> None:
    ((path, message),) = errors_of({"environment": {"image": "x"}, "resources": {"slots": 1}})
    assert path == "searcher"
    assert message.startswith(TASK_MESSAGE)
    assert "no searcher and no entrypoint" in message


def test_an_experiment_missing_its_searcher_is_not_called_a_task() -> None:
    errors = errors_of({"name": "x", "resources": {"slots_per_trial": 1}})
    assert [p for p, _ in errors] == ["entrypoint", "searcher"]
    assert all(TASK_MESSAGE not in m for _, m in errors)
