"""The experiment config schema: Determined YAML in, frozen Structs or every error out."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.config import (
    DEFAULT_MAX_RESTARTS,
    DEFAULT_PRIORITY,
    CategoricalHP,
    ConfigError,
    ConstHP,
    DoubleHP,
    ExperimentConfig,
    FieldError,
    IntHP,
    Length,
    LogHP,
    S3Storage,
    SharedFSStorage,
    config_from_wire,
    config_to_dict,
    parse_config,
)

# Determined's examples/tutorials/mnist_pytorch/const.yaml.
MNIST_CONST = """\
description: mnist_pytorch_const
data:
  url: https://s3-us-west-2.amazonaws.com/determined-ai-test-data/pytorch_mnist.tar.gz
hyperparameters:
  learning_rate: 1.0
  global_batch_size: 64
  n_filters1: 32
  n_filters2: 64
  dropout1: 0.25
  dropout2: 0.5
searcher:
  name: single
  metric: validation_loss
  max_length:
      batches: 937000 #60,000 training images with batch size 64
  smaller_is_better: true
entrypoint: model_def:MNistTrial
"""

# Determined's examples/tutorials/mnist_pytorch/adaptive.yaml, plus a few more sections.
MNIST_ADAPTIVE = """\
name: mnist-adaptive
description: mnist_pytorch_adaptive_search
labels: [mnist, asha]
data:
  url: https://s3-us-west-2.amazonaws.com/determined-ai-test-data/pytorch_mnist.tar.gz
hyperparameters:
  global_batch_size: 64
  learning_rate:
    type: log
    minval: -4
    maxval: 0
  n_filters1: {type: int, minval: 8, maxval: 64}
  dropout1: {type: double, minval: .2, maxval: .8}
  optimizer:
    name: {type: categorical, vals: [sgd, adam]}
    momentum: 0.9
searcher:
  name: adaptive_asha
  metric: validation_loss
  smaller_is_better: true
  max_trials: 16
  time_metric: batches
  max_time: 937
resources:
  slots_per_trial: 2
  priority: 10
checkpoint_storage:
  type: s3
  bucket: kiln-checkpoints
  endpoint_url: http://localhost:8333
  save_trial_best: 2
max_restarts: 0
min_validation_period: {batches: 100}
reproducibility: {experiment_seed: 42}
environment:
  environment_variables:
    - NCCL_DEBUG=INFO
entrypoint: python3 train.py --epochs 1
"""


def minimal(**overrides: Any) -> dict[str, Any]:
    """The smallest valid config as data, with top-level keys replaced."""
    base: dict[str, Any] = {
        "entrypoint": "model_def:Trial",
        "searcher": {"name": "single", "metric": "validation_loss"},
    }
    return base | overrides


def errors_of(source: str | dict[str, Any]) -> list[FieldError]:
    with pytest.raises(ConfigError) as info:
        parse_config(source)
    return info.value.errors


def paths_of(source: str | dict[str, Any]) -> list[str]:
    return [e.path for e in errors_of(source)]


# --- valid configs ---------------------------------------------------------------------------


def test_mnist_const_parses_with_determined_defaults() -> None:
    cfg, warnings = parse_config(MNIST_CONST)

    assert warnings == []
    assert cfg.name == "Experiment"
    assert cfg.description == "mnist_pytorch_const"
    assert cfg.entrypoint == "model_def:MNistTrial"
    assert cfg.entrypoint_kind == "callable"
    assert cfg.hyperparameters["learning_rate"] == ConstHP(val=1.0)
    assert cfg.hyperparameters["global_batch_size"] == ConstHP(val=64)
    assert cfg.searcher.name == "single"
    assert cfg.searcher.metric == "validation_loss"
    assert cfg.searcher.smaller_is_better is True
    assert cfg.searcher.max_length == Length(batches=937000)
    assert cfg.full_length == 937000
    assert cfg.data["url"].endswith("pytorch_mnist.tar.gz")
    assert cfg.resources.slots_per_trial == 1
    assert cfg.resources.resource_pool == "default"
    assert cfg.max_restarts == 5
    assert cfg.checkpoint_storage is None
    assert cfg.checkpoint_policy == "best"
    assert cfg.scheduling_unit == 100
    assert cfg.searcher.max_concurrent_trials == 16
    assert cfg.searcher.divisor == 4.0


def test_adaptive_example_parses_every_section() -> None:
    cfg, warnings = parse_config(MNIST_ADAPTIVE)

    assert warnings == []
    assert cfg.labels == ["mnist", "asha"]
    assert cfg.entrypoint_kind == "command"
    assert cfg.hyperparameters["learning_rate"] == LogHP(minval=-4.0, maxval=0.0)
    assert cfg.hyperparameters["n_filters1"] == IntHP(minval=8, maxval=64)
    assert cfg.hyperparameters["dropout1"] == DoubleHP(minval=0.2, maxval=0.8)
    assert cfg.hyperparameters["optimizer"] == {
        "name": CategoricalHP(vals=["sgd", "adam"]),
        "momentum": ConstHP(val=0.9),
    }
    assert cfg.searcher.max_trials == 16
    assert cfg.full_length == 937
    assert cfg.resources.slots_per_trial == 2
    assert cfg.resources.priority == 10
    assert cfg.checkpoint_storage == S3Storage(
        bucket="kiln-checkpoints", endpoint_url="http://localhost:8333", save_trial_best=2
    )
    assert cfg.min_validation_period == Length(batches=100)
    assert cfg.reproducibility.experiment_seed == 42
    assert cfg.environment.environment_variables == {"NCCL_DEBUG": "INFO"}


@pytest.mark.parametrize(
    ("entrypoint", "kind"),
    [
        ("model_def:MNistTrial", "callable"),
        ("pkg.sub.module:train_fn", "callable"),
        ("python3 train.py --lr 0.1", "command"),
        ("python3 -m pkg.module:x", "command"),
        (["python3", "train.py"], "command"),
    ],
)
def test_entrypoint_kind(entrypoint: str | list[str], kind: str) -> None:
    cfg, _ = parse_config(minimal(entrypoint=entrypoint))
    assert cfg.entrypoint == entrypoint
    assert cfg.entrypoint_kind == kind


def test_bytes_and_dict_sources_parse_alike() -> None:
    from_str, _ = parse_config(MNIST_CONST)
    from_bytes, _ = parse_config(MNIST_CONST.encode())
    assert from_bytes == from_str


def test_yaml_1_2_floats_and_dates_stay_json_safe() -> None:
    source = """\
entrypoint: model_def:Trial
searcher: {name: single, metric: loss}
hyperparameters:
  lr: 1e-4
data:
  day: 2024-01-01
"""
    cfg, _ = parse_config(source)
    assert cfg.hyperparameters["lr"] == ConstHP(val=1e-4)
    assert cfg.data == {"day": "2024-01-01"}


def test_nested_hyperparameter_groups() -> None:
    cfg, _ = parse_config(
        minimal(
            hyperparameters={
                "model": {
                    "layers": {"type": "int", "minval": 1, "maxval": 4, "count": 2},
                    "head": {"dropout": 0.1, "kind": {"type": "const", "val": {"a": 1}}},
                },
                "lrs": [0.1, 0.01],
                "nothing": None,
            }
        )
    )
    assert cfg.hyperparameters == {
        "model": {
            "layers": IntHP(minval=1, maxval=4, count=2),
            "head": {"dropout": ConstHP(val=0.1), "kind": ConstHP(val={"a": 1})},
        },
        "lrs": ConstHP(val=[0.1, 0.01]),
        "nothing": ConstHP(val=None),
    }


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        (["A=1", "B=x=y", "EMPTY="], {"A": "1", "B": "x=y", "EMPTY": ""}),
        ({"A": "1", "THREADS": 4, "RATE": 0.5}, {"A": "1", "THREADS": "4", "RATE": "0.5"}),
        ({"cpu": ["A=cpu", "ONLY_CPU=1"], "cuda": ["A=cuda"]}, {"A": "cuda", "ONLY_CPU": "1"}),
        ([], {}),
    ],
)
def test_environment_variable_forms(variables: Any, expected: dict[str, str]) -> None:
    cfg, _ = parse_config(minimal(environment={"environment_variables": variables}))
    assert cfg.environment.environment_variables == expected


def test_shared_fs_storage() -> None:
    cfg, _ = parse_config(minimal(checkpoint_storage={"type": "shared_fs", "host_path": "/mnt/ckpt"}))
    assert cfg.checkpoint_storage == SharedFSStorage(host_path="/mnt/ckpt")


@pytest.mark.parametrize(
    ("searcher", "expected"),
    [
        ({"name": "single"}, None),
        ({"name": "single", "max_length": 500}, 500),
        ({"name": "grid", "max_length": {"epochs": 3}}, 3),
        ({"name": "random", "max_trials": 4, "max_time": 9, "time_metric": "batches"}, 9),
        ({"name": "async_halving", "max_trials": 4, "max_length": {"records": 7}, "num_rungs": 3}, 7),
    ],
)
def test_full_length(searcher: dict[str, Any], expected: int | None) -> None:
    cfg, _ = parse_config(minimal(searcher={"metric": "m"} | searcher))
    assert cfg.full_length == expected


# --- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [MNIST_CONST, MNIST_ADAPTIVE])
def test_config_to_dict_round_trips(source: str) -> None:
    cfg, _ = parse_config(source)
    data = config_to_dict(cfg)

    again, warnings = parse_config(data)

    assert again == cfg
    assert warnings == []
    assert data["searcher"]["max_length"] in (None, {"batches": 937000})


def test_config_to_dict_is_json_safe() -> None:
    import json

    cfg, _ = parse_config(MNIST_ADAPTIVE)
    assert parse_config(json.loads(json.dumps(config_to_dict(cfg))))[0] == cfg


def test_config_is_frozen() -> None:
    cfg, _ = parse_config(MNIST_CONST)
    with pytest.raises(AttributeError):
        cfg.name = "other"  # type: ignore[misc]


# --- warnings --------------------------------------------------------------------------------


def test_unsupported_determined_fields_warn_and_are_dropped() -> None:
    cfg, warnings = parse_config(
        minimal(
            profiling={"enabled": True},
            optimizations={"aggregation_frequency": 2},
            bind_mounts=[{"host_path": "/data", "container_path": "/data"}],
            environment={"image": "determinedai/pytorch:latest", "pod_spec": {}, "environment_variables": []},
            resources={"devices": [], "slots_per_trial": 1},
        )
    )
    assert warnings == [
        "profiling: Determined field not supported by Kiln; ignored",
        "optimizations: Determined field not supported by Kiln; ignored",
        "bind_mounts: Determined field not supported by Kiln; ignored",
        "environment.image: Determined field not supported by Kiln; ignored",
        "environment.pod_spec: Determined field not supported by Kiln; ignored",
        "resources.devices: Determined field not supported by Kiln; ignored",
    ]
    assert "profiling" not in config_to_dict(cfg)


def test_rocm_variables_warn() -> None:
    variables = {"rocm": ["A=1"], "cpu": ["B=2"]}
    cfg, warnings = parse_config(minimal(environment={"environment_variables": variables}))
    assert cfg.environment.environment_variables == {"B": "2"}
    assert warnings == ["environment.environment_variables.rocm: ROCm is not supported by Kiln; ignored"]


# --- errors ----------------------------------------------------------------------------------


def test_typo_names_path_and_suggests() -> None:
    errors = errors_of(minimal(searcher={"name": "single", "metric": "m", "smaller_is_beter": False}))
    assert errors == [
        FieldError("searcher.smaller_is_beter", "unknown field; did you mean 'smaller_is_better'?")
    ]


def test_unknown_field_without_close_match() -> None:
    assert errors_of(minimal(zzz=1)) == [FieldError("zzz", "unknown field")]


@pytest.mark.parametrize(
    ("overrides", "path", "message"),
    [
        (
            {"resources": {"slots_per_trial": "two"}},
            "resources.slots_per_trial",
            "expected int >= 0, got 'two'",
        ),
        ({"resources": {"slots_per_trial": -1}}, "resources.slots_per_trial", "expected int >= 0, got -1"),
        ({"resources": {"weight": 0}}, "resources.weight", "expected float > 0, got 0"),
        ({"max_restarts": True}, "max_restarts", "expected int >= 0, got True"),
        ({"labels": ["ok", 2]}, "labels[1]", "expected str, got 2"),
        ({"labels": "one"}, "labels", "expected list of str, got 'one'"),
        (
            {"checkpoint_policy": "some"},
            "checkpoint_policy",
            "expected one of 'all', 'best', 'none', got 'some'",
        ),
        ({"data": [1]}, "data", "expected mapping of str to any value, got [1]"),
        ({"hyperparameters": [1]}, "hyperparameters", "expected mapping of name to hyperparameter, got [1]"),
        (
            {"entrypoint": ""},
            "entrypoint",
            "expected non-empty str or non-empty list of non-empty str, got ''",
        ),
        (
            {"min_validation_period": {"batches": 1, "epochs": 1}},
            "min_validation_period",
            "expected exactly one of batches, records, epochs",
        ),
        ({"min_validation_period": 100}, "min_validation_period", "expected mapping or null, got 100"),
        (
            {"checkpoint_storage": {"type": "gcs", "bucket": "b"}},
            "checkpoint_storage.type",
            "'gcs' is not supported yet by Kiln; expected one of 's3', 'shared_fs'",
        ),
        (  # without type it is merged into the stack's default store (an S3 one): its fields must fit that
            {"checkpoint_storage": {"host_path": "/x"}},
            "checkpoint_storage.host_path",
            "unknown field",
        ),
        (
            {"checkpoint_storage": {"type": "s3"}},
            "checkpoint_storage.bucket",
            "required field missing; expected non-empty str",
        ),
        (
            {"environment": {"environment_variables": ["NOEQUALS"]}},
            "environment.environment_variables[0]",
            "expected 'KEY=VALUE', got 'NOEQUALS'",
        ),
        (
            {"environment": {"environment_variables": {"A": [1]}}},
            "environment.environment_variables.A",
            "expected str or number, got [1]",
        ),
        (
            {"environment": {"environment_variables": "A=1"}},
            "environment.environment_variables",
            "expected list of 'KEY=VALUE' str or mapping of str to str, got 'A=1'",
        ),
    ],
)
def test_bad_field_message(overrides: dict[str, Any], path: str, message: str) -> None:
    assert errors_of(minimal(**overrides)) == [FieldError(path, message)]


@pytest.mark.parametrize(
    ("hp", "field", "message"),
    [
        (
            {"type": "float", "minval": 0, "maxval": 1},
            "type",
            "expected one of 'categorical', 'const', 'double', 'int', 'log', got 'float'",
        ),
        ({"type": "int", "minval": 5, "maxval": 1}, "minval", "must be <= maxval (1), got 5"),
        ({"type": "double", "minval": 0.5, "maxval": 0.1}, "minval", "must be <= maxval (0.1), got 0.5"),
        ({"type": "int", "minval": 1.5, "maxval": 3}, "minval", "expected int, got 1.5"),
        ({"type": "int", "minval": 1}, "maxval", "required field missing; expected int"),
        ({"type": "int", "minval": 1, "maxval": 2, "count": 0}, "count", "expected int >= 1 or null, got 0"),
        ({"type": "log", "minval": 1, "maxval": 2, "base": 0}, "base", "expected float > 0, got 0"),
        ({"type": "categorical", "vals": []}, "vals", "expected non-empty list of any value, got []"),
        ({"type": "const"}, "val", "required field missing; expected any value"),
        ({"type": "const", "val": 1, "vals": 2}, "vals", "unknown field; did you mean 'val'?"),
    ],
)
def test_bad_hyperparameter(hp: dict[str, Any], field: str, message: str) -> None:
    errors = errors_of(minimal(hyperparameters={"x": hp}))
    assert errors == [FieldError(f"hyperparameters.x.{field}", message)]


def test_nested_hyperparameter_error_path() -> None:
    source = minimal(hyperparameters={"opt": {"inner": {"lr": {"type": "double", "minval": 1}}}})
    assert paths_of(source) == ["hyperparameters.opt.inner.lr.maxval"]


@pytest.mark.parametrize(
    ("searcher", "field", "message"),
    [
        (
            {"name": "pbt"},
            "name",
            "'pbt' is not supported yet by Kiln; "
            "expected one of 'adaptive_asha', 'async_halving', 'grid', 'random', 'single'",
        ),
        (
            {"name": "nope"},
            "name",
            "expected one of 'adaptive_asha', 'async_halving', 'grid', 'random', 'single', got 'nope'",
        ),
        ({"name": "single", "metric": None}, "metric", "expected non-empty str, got None"),
        ({"name": "random"}, "max_trials", "required for searcher 'random'; expected int >= 1"),
        (
            {"name": "adaptive_asha", "max_trials": 2},
            "max_time",
            "searcher 'adaptive_asha' needs max_time with time_metric (or legacy max_length)",
        ),
        ({"name": "single", "max_time": 5}, "time_metric", "required when max_time is set"),
        ({"name": "single", "time_metric": "b"}, "max_time", "required when time_metric is set"),
        (
            {"name": "single", "max_time": 5, "time_metric": "b", "max_length": 5},
            "max_length",
            "give either max_time with time_metric or the legacy max_length, not both",
        ),
        ({"name": "single", "max_length": {"steps": 5}}, "max_length.steps", "unknown field"),
        (
            {"name": "single", "max_length": "5"},
            "max_length",
            "expected int >= 1 or mapping or null, got '5'",
        ),
        ({"name": "single", "divisor": 1}, "divisor", "expected float > 1, got 1"),
        (
            {"name": "single", "mode": "wild"},
            "mode",
            "expected one of 'aggressive', 'conservative', 'standard', got 'wild'",
        ),
    ],
)
def test_bad_searcher(searcher: dict[str, Any], field: str, message: str) -> None:
    errors = errors_of(minimal(searcher={"metric": "m"} | searcher))
    assert errors == [FieldError(f"searcher.{field}", message)]


def test_searcher_metric_is_required() -> None:
    assert errors_of(minimal(searcher={"name": "single"})) == [
        FieldError("searcher.metric", "required field missing; expected non-empty str")
    ]


def test_grid_search_needs_counts() -> None:
    source = minimal(
        searcher={"name": "grid", "metric": "m"},
        hyperparameters={
            "a": {"type": "int", "minval": 1, "maxval": 3},
            "b": {"type": "categorical", "vals": [1, 2]},
            "g": {"c": {"type": "log", "minval": -3, "maxval": -1}},
        },
    )
    assert paths_of(source) == ["hyperparameters.a.count", "hyperparameters.g.c.count"]


def test_missing_required_top_level_fields() -> None:
    assert paths_of({"name": "x"}) == ["entrypoint", "searcher"]


def test_every_bad_field_is_listed() -> None:
    source = """\
nme: typo
labels: [a, 2]
hyperparameters:
  a: {type: float}
  b: {type: int, minval: 5, maxval: 1}
searcher: {name: single, metric: 3}
resources: {slots_per_trial: two, priority: 100}
checkpoint_storage: {type: s3}
entrypoint: model_def:Trial
"""
    with pytest.raises(ConfigError) as info:
        parse_config(source)

    expected_paths = [
        "nme",
        "labels[1]",
        "hyperparameters.a.type",
        "hyperparameters.b.minval",
        "searcher.metric",
        "resources.slots_per_trial",
        "resources.priority",
        "checkpoint_storage.bucket",
    ]
    assert [e.path for e in info.value.errors] == expected_paths
    # str(error) lists each one on its own line, "path: message".
    lines = str(info.value).splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == expected_paths
    assert "resources.slots_per_trial: expected int >= 0, got 'two'" in lines


@pytest.mark.parametrize(
    ("source", "message_start"),
    [
        ("searcher: [1,\nname: 2\n", "line "),
        ("a: b: c\n", "line 1, column 5"),
    ],
)
def test_yaml_syntax_error(source: str, message_start: str) -> None:
    errors = errors_of(source)
    assert len(errors) == 1
    assert errors[0].path == "<yaml>"
    assert errors[0].message.startswith(message_start)


@pytest.mark.parametrize("source", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(source: str) -> None:
    assert paths_of(source) == ["<config>"]


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
    assert isinstance(parse_config(MNIST_CONST)[0], ExperimentConfig)


# --- the typed config as every service reads it ------------------------------------------------


def test_defaults_every_reader_shares_come_from_the_schema() -> None:
    cfg, _ = parse_config(minimal())
    assert (cfg.priority, cfg.max_restarts) == (DEFAULT_PRIORITY, DEFAULT_MAX_RESTARTS) == (42, 5)
    assert cfg.resources.priority is None  # unset: the default applies, not a value the user wrote
    assert (cfg.display_name, cfg.environment_variables, cfg.full_length, cfg.pausable) == \
        ("Experiment", {}, None, False)
    assert parse_config(minimal(name=""))[0].display_name == "Experiment"
    assert parse_config(minimal(resources={"priority": 7}))[0].priority == 7
    assert (cfg.resource_pool, parse_config(minimal(resources={"resource_pool": ""}))[0].resource_pool) == \
        ("default", "default")


@pytest.mark.parametrize(
    ("searcher", "pausable"),
    [
        ({"name": "single"}, False),
        ({"name": "async_halving", "max_trials": 4, "max_time": 9, "time_metric": "b", "stop_once": False}, True),
        ({"name": "async_halving", "max_trials": 4, "max_time": 9, "time_metric": "b"}, False),
        ({"name": "adaptive_asha", "max_trials": 4, "max_length": {"batches": 9}, "stop_once": False}, True),
        ({"name": "random", "max_trials": 4, "stop_once": False}, False),
    ],
)
def test_pausable_means_a_rung_method_that_promotes(searcher: dict[str, Any], pausable: bool) -> None:
    cfg, _ = parse_config(minimal(searcher={"metric": "m"} | searcher))
    assert cfg.pausable is pausable


@pytest.mark.parametrize("source", [MNIST_CONST, MNIST_ADAPTIVE])
def test_wire_data_decodes_to_the_config_that_was_submitted(source: str) -> None:
    cfg, _ = parse_config(source)
    assert config_from_wire(config_to_dict(cfg)) == cfg


def test_wire_decode_skips_fields_a_later_version_added() -> None:
    """An event written by a newer gateway (or read back from an old log) still decodes."""
    data = minimal(resources={"slots_per_trial": 2, "gpu_kind": "h200"}, checkpoint_storage={
        "type": "shared_fs", "host_path": "/mnt", "compression": "zstd"}, tracing={"enabled": True})
    with pytest.raises(ConfigError):
        parse_config(data)  # user input stays strict

    cfg = config_from_wire(data)

    assert cfg.resources.slots_per_trial == 2
    assert cfg.checkpoint_storage == SharedFSStorage(host_path="/mnt")
    assert cfg == parse_config(minimal(resources={"slots_per_trial": 2},
                                       checkpoint_storage={"type": "shared_fs", "host_path": "/mnt"}))[0]


def test_wire_decode_still_refuses_what_it_knows_to_be_invalid() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_wire(minimal(searcher={"name": "pbt", "metric": "m"}, max_restarts=-1))
    assert [e.path for e in info.value.errors] == ["searcher.name", "max_restarts"]
    with pytest.raises(ConfigError):
        config_from_wire([])  # type: ignore[arg-type]
