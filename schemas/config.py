"""The experiment config: Determined-style YAML, validated into frozen Structs.

User input, so every Struct forbids unknown fields. Validation walks the raw document
once, field by field, driven by the Struct definitions themselves (types and ``msgspec.Meta``
constraints), so that a config with five mistakes is reported with five errors, not one. Fields
Determined knows but Kiln ignores are dropped with a warning; anything else unknown is an error.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal, TypeAlias

import msgspec
import msgspec.inspect as mi
import yaml

from schemas import data as data_source

# A config document larger than this is refused before it is parsed (gateway: KILN_MAX_CONFIG_BYTES).
DEFAULT_MAX_CONFIG_BYTES = 256 * 1024
# Defaults every reader of a config shares (the scheduler for an experiment it has not seen, the tracker).
DEFAULT_EXPERIMENT_NAME = "Experiment"
DEFAULT_PRIORITY = 42  # 1..99, lower runs first
DEFAULT_MAX_RESTARTS = 5
DEFAULT_RESOURCE_POOL = "default"
# The stack's own checkpoint store, which a ``checkpoint_storage`` without ``type`` is merged into (the gateway
# passes its bucket; a local check without a gateway assumes the stack's default one).
DEFAULT_STORAGE: dict[str, Any] = {"type": "s3", "bucket": "kiln"}
_INT64 = (-(2**63), 2**63 - 1)

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]


class _Spec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every config Struct; subclasses repeat kw_only, which msgspec does not inherit."""


# ---------------------------------------------------------------------------------------------
# Hyperparameters: a tagged union on ``type``; a mapping without ``type`` is a nested group.
# ---------------------------------------------------------------------------------------------


class ConstHP(_Spec, frozen=True, kw_only=True, tag="const", tag_field="type"):
    """A fixed value; a plain (non-mapping) YAML value is shorthand for it."""

    val: Any


class IntHP(_Spec, frozen=True, kw_only=True, tag="int", tag_field="type"):
    """An integer drawn uniformly from ``[minval, maxval]``; ``count`` grid points for grid search."""

    minval: int
    maxval: int
    count: PositiveInt | None = None


class DoubleHP(_Spec, frozen=True, kw_only=True, tag="double", tag_field="type"):
    """A float drawn uniformly from ``[minval, maxval]``."""

    minval: float
    maxval: float
    count: PositiveInt | None = None


class LogHP(_Spec, frozen=True, kw_only=True, tag="log", tag_field="type"):
    """``base ** x`` with the exponent ``x`` drawn uniformly from ``[minval, maxval]``."""

    minval: float
    maxval: float
    base: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    count: PositiveInt | None = None


class CategoricalHP(_Spec, frozen=True, kw_only=True, tag="categorical", tag_field="type"):
    """One of ``vals``, chosen uniformly."""

    vals: Annotated[list[Any], msgspec.Meta(min_length=1)]


HPSpec: TypeAlias = ConstHP | IntHP | DoubleHP | LogHP | CategoricalHP
Hyperparameter: TypeAlias = HPSpec | dict[str, "Hyperparameter"]
HyperparameterSpace: TypeAlias = dict[str, Hyperparameter]


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


class Length(_Spec, frozen=True, kw_only=True, omit_defaults=True):
    """Determined's legacy length: exactly one of ``batches``, ``records`` or ``epochs``."""

    # omit_defaults: config_to_dict writes ``{batches: 1000}``, the form users write.
    batches: PositiveInt | None = None
    records: PositiveInt | None = None
    epochs: PositiveInt | None = None

    @property
    def unit(self) -> Literal["batches", "records", "epochs"]:
        """The unit that is set."""
        if self.batches is not None:
            return "batches"
        return "records" if self.records is not None else "epochs"

    @property
    def units(self) -> int:
        """The number of units."""
        value = self.batches if self.batches is not None else self.records
        value = value if value is not None else self.epochs
        assert value is not None, "validation guarantees one unit is set"
        return value


SearcherName = Literal["single", "random", "grid", "adaptive_asha", "async_halving"]
# The methods that train trials in rungs (docs/asha.md): they need a length, and may pause and promote trials.
_RUNG_METHODS = frozenset({"adaptive_asha", "async_halving"})


class TPEConfig(_Spec, frozen=True, kw_only=True):
    """``searcher.tpe``: the density-model sampler (``sampler: tpe``); BOHB's defaults (docs/search-methods.md)."""

    random_fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1 / 3  # share of trials drawn at random anyway
    top_fraction: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.15  # the "good" share of a rung's results
    candidates: PositiveInt = 64  # draws from the good density; the one with the best good/bad ratio is taken
    bandwidth_factor: Annotated[float, msgspec.Meta(gt=0)] = 3.0  # widens the good density for drawing
    min_bandwidth: Annotated[float, msgspec.Meta(gt=0)] = 1e-3
    min_points: PositiveInt | None = None  # per density; None: the number of sampled hyperparameters + 1
    # "bad": trials stopped below the modelled rung join its bad density (Kiln); "ignore": BOHB's own rule.
    lower_rungs: Literal["bad", "ignore"] = "bad"


class SearcherConfig(_Spec, frozen=True, kw_only=True):
    """``searcher``: which search method, what it optimises and how long trials train."""

    name: SearcherName
    metric: NonEmptyStr
    smaller_is_better: bool = True
    max_length: PositiveInt | Length | None = None  # legacy; prefer max_time + time_metric
    time_metric: NonEmptyStr | None = None
    max_time: PositiveInt | None = None
    max_trials: PositiveInt | None = None
    max_concurrent_trials: NonNegativeInt = 16
    mode: Literal["aggressive", "standard", "conservative"] = "standard"
    divisor: Annotated[float, msgspec.Meta(gt=1)] = 4.0
    max_rungs: PositiveInt = 5
    bracket_rungs: list[PositiveInt] = []
    num_rungs: PositiveInt | None = None
    stop_once: bool = True
    # Kiln's additions to the rung methods (docs/search-methods.md); the defaults keep Determined's behaviour.
    sampler: Literal["random", "tpe"] = "random"
    tpe: TPEConfig = msgspec.field(default_factory=TPEConfig)
    promotion: Literal["asha", "pending_aware"] = "asha"
    rung_metric: Literal["value", "extrapolated"] = "value"
    source_trial_id: int | None = None
    source_checkpoint_uuid: str | None = None


class ResourcesConfig(_Spec, frozen=True, kw_only=True):
    """``resources``: what each trial asks the scheduler for."""

    slots_per_trial: NonNegativeInt = 1
    priority: Annotated[int, msgspec.Meta(ge=1, le=99)] | None = None
    weight: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    resource_pool: str = DEFAULT_RESOURCE_POOL
    max_slots: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] | None = None  # a Postgres integer
    shm_size: int | str | None = None


class _StorageBase(_Spec, frozen=True, kw_only=True):
    """Checkpoint retention, common to every store."""

    save_experiment_best: NonNegativeInt = 0
    save_trial_best: NonNegativeInt = 1
    save_trial_latest: NonNegativeInt = 1


class S3Storage(_StorageBase, frozen=True, kw_only=True, tag="s3", tag_field="type"):
    """Checkpoints in an S3 bucket (SeaweedFS, MinIO or AWS)."""

    bucket: NonEmptyStr
    endpoint_url: str | None = None
    prefix: str = ""
    access_key: str | None = None
    secret_key: str | None = None


class SharedFSStorage(_StorageBase, frozen=True, kw_only=True, tag="shared_fs", tag_field="type"):
    """Checkpoints on a filesystem every node mounts."""

    host_path: NonEmptyStr
    storage_path: str | None = None


CheckpointStorage: TypeAlias = S3Storage | SharedFSStorage


class EnvironmentConfig(_Spec, frozen=True, kw_only=True):
    """``environment``: only the variables; images and pod specs are Determined's, not Kiln's."""

    environment_variables: dict[str, str] = {}


class ReproducibilityConfig(_Spec, frozen=True, kw_only=True):
    """``reproducibility``: the experiment seed; None means the gateway picks one at submission."""

    experiment_seed: NonNegativeInt | None = None


_CALLABLE_ENTRYPOINT = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class ExperimentConfig(_Spec, frozen=True, kw_only=True):
    """A whole experiment config."""

    name: str = DEFAULT_EXPERIMENT_NAME
    description: str = ""
    labels: list[str] = []
    project: str = ""
    workspace: str = ""
    entrypoint: NonEmptyStr | Annotated[list[NonEmptyStr], msgspec.Meta(min_length=1)]
    hyperparameters: HyperparameterSpace = {}
    searcher: SearcherConfig
    resources: ResourcesConfig = msgspec.field(default_factory=ResourcesConfig)
    max_restarts: NonNegativeInt = DEFAULT_MAX_RESTARTS
    checkpoint_storage: CheckpointStorage | None = None  # None: the cluster's default store
    checkpoint_policy: Literal["best", "all", "none"] = "best"
    environment: EnvironmentConfig = msgspec.field(default_factory=EnvironmentConfig)
    data: dict[str, Any] = {}
    min_validation_period: Length | None = None
    min_checkpoint_period: Length | None = None
    records_per_epoch: NonNegativeInt = 0
    scheduling_unit: PositiveInt = 100
    perform_initial_validation: bool = False
    reproducibility: ReproducibilityConfig = msgspec.field(default_factory=ReproducibilityConfig)

    @property
    def entrypoint_kind(self) -> Literal["callable", "command"]:
        """``callable`` for ``module:Name`` (a Trial class or function), else ``command`` (argv)."""
        if isinstance(self.entrypoint, str) and _CALLABLE_ENTRYPOINT.fullmatch(self.entrypoint):
            return "callable"
        return "command"

    @property
    def display_name(self) -> str:
        """The name people see: an empty ``name`` shows as the default."""
        return self.name or DEFAULT_EXPERIMENT_NAME

    @property
    def priority(self) -> int:
        """The priority the experiment's trials are scheduled with until a user changes it."""
        return self.resources.priority if self.resources.priority is not None else DEFAULT_PRIORITY

    @property
    def resource_pool(self) -> str:
        """The pool the experiment's trials run in; an empty ``resources.resource_pool`` means the default."""
        return self.resources.resource_pool or DEFAULT_RESOURCE_POOL

    @property
    def full_length(self) -> int | None:
        """How long each trial trains at most, in units of the searcher's time metric (``max_time`` or
        legacy ``max_length``); None: unbounded."""
        searcher = self.searcher
        if searcher.max_time is not None:
            return searcher.max_time
        match searcher.max_length:
            case Length() as length:
                return length.units
            case other:
                return other

    @property
    def pausable(self) -> bool:
        """Promotion-based search (a rung method, ``stop_once: false``): a run that trained to a rung
        shorter than ``full_length`` pauses, and may be resumed, instead of completing."""
        return self.searcher.name in _RUNG_METHODS and not self.searcher.stop_once

    @property
    def environment_variables(self) -> dict[str, str]:
        """The variables every process of a trial gets."""
        return self.environment.environment_variables

    @property
    def delta_source(self) -> data_source.DeltaSource | None:
        """The Delta table ``data`` names (``delta_table``, ``version``), or None; the rest of ``data`` is the
        user's own (schemas/data.py)."""
        return data_source.delta_source(self.data)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


class FieldError(msgspec.Struct, frozen=True):
    """One problem with one field; ``path`` is like ``searcher.metric`` or ``labels[2]``."""

    path: str
    message: str


class ConfigError(ValueError):
    """The config is invalid; ``errors`` lists every problem found, not only the first."""

    def __init__(self, errors: list[FieldError]) -> None:
        # Paths and messages quote the document (keys, values): a lone surrogate there would make the error
        # itself unencodable (a 500 instead of the 400), so it is written as its escape.
        self.errors = [FieldError(_encodable(e.path), _encodable(e.message)) for e in errors]
        super().__init__("\n".join(f"{e.path}: {e.message}" for e in self.errors))


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class YamlLimits(msgspec.Struct, frozen=True, kw_only=True):
    """How much a YAML config may ask of its reader: a hostile document is refused before it costs much.

    ``max_nodes`` counts nodes with every alias expanded (a billion-laughs document is a few hundred
    bytes and a few dozen aliases, but 10⁹ nodes once walked); ``max_depth`` bounds nesting the same way.
    """

    max_bytes: int = DEFAULT_MAX_CONFIG_BYTES
    max_aliases: int = 100
    max_nodes: int = 100_000
    max_depth: int = 64


def parse_config(source: str | bytes | dict[str, Any], limits: YamlLimits | None = None,
                 default_storage: dict[str, Any] | None = None) -> tuple[ExperimentConfig, list[str]]:
    """Validate a YAML document (or its already-loaded data) into a config and its warnings.

    ``default_storage``: the stack's checkpoint store (``{type: s3, bucket: ...}``), which a
    ``checkpoint_storage`` without ``type`` is merged into, as Determined merges it into the cluster's;
    default ``DEFAULT_STORAGE``.
    """
    if isinstance(source, (str, bytes)):
        raw = _load_yaml(source, limits or YamlLimits())
        _check_scalars(raw)
    else:
        raw = source
    if not isinstance(raw, dict):
        got = "an empty document" if raw is None else type(raw).__name__
        raise ConfigError([FieldError("<config>", f"expected a mapping at the top level, got {got}")])
    _refuse_task_config(raw)
    storage = raw.get("checkpoint_storage")
    if isinstance(storage, dict) and "type" not in storage:
        # Determined fills a type-less checkpoint_storage from the master's; the given fields win.
        raw = {**raw, "checkpoint_storage": {**(default_storage or DEFAULT_STORAGE), **storage}}
    report = _Report()
    config = _convert(raw, ExperimentConfig, "", report)
    if report.errors:
        raise ConfigError(report.errors)
    assert isinstance(config, ExperimentConfig)
    return config, report.warnings


def config_from_wire(data: dict[str, Any]) -> ExperimentConfig:
    """The typed config of an event (``ExperimentSubmitted.config``): how every service reads it.

    Lenient where ``parse_config`` is strict: the gateway validated the config when it was submitted, and a
    later version may have added fields this reader does not know, so unknown fields are skipped, not
    refused (old logs and newer writers both decode). What this version knows must still be valid:
    ConfigError otherwise (a version skew the reader reports).
    """
    if not isinstance(data, dict):
        raise ConfigError([FieldError("<config>", f"expected a mapping, got {type(data).__name__}")])
    report = _Report(lenient=True)
    config = _convert(data, ExperimentConfig, "", report)
    if report.errors:
        raise ConfigError(report.errors)
    assert isinstance(config, ExperimentConfig)
    return config


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as JSON-safe plain data; ``parse_config`` of it gives back an equal config."""
    data = msgspec.to_builtins(cfg)
    assert isinstance(data, dict)
    return data


# Fields of Determined's task configs (notebook, command, shell, TensorBoard) that no experiment config has.
_TASK_ONLY_FIELDS = ("notebook_idle_type", "idle_timeout", "work_dir", "tensorboard_args")
# Fields a task config shares with an experiment config; a document of these alone, without ``searcher`` or
# ``entrypoint``, is a notebook or shell config.
_TASK_COMMON_FIELDS = frozenset({"description", "environment", "resources", "bind_mounts", "debug", "pbs", "slurm"})
_TASK_CONFIG = "this is a task config (notebook/command/shell), not an experiment config: Kiln runs experiments"


def _refuse_task_config(raw: dict[Any, Any]) -> None:
    """A Determined notebook/command/shell config is not a broken experiment config: say what it is."""
    giveaway = next((field for field in _TASK_ONLY_FIELDS if field in raw), None)
    if giveaway is not None:
        raise ConfigError([FieldError(giveaway, f"{_TASK_CONFIG} ({giveaway!r} is a task field)")])
    if raw and "searcher" not in raw and "entrypoint" not in raw and set(raw) <= _TASK_COMMON_FIELDS:
        fields = ", ".join(sorted(str(key) for key in raw))
        message = f"{_TASK_CONFIG} (no searcher and no entrypoint; only {fields})"
        raise ConfigError([FieldError("searcher", message)])


def leaf_hyperparameters(space: HyperparameterSpace, prefix: str = "") -> Iterator[tuple[str, HPSpec]]:
    """Every non-group hyperparameter with its dotted path (``optimizer.lr``), in name order."""
    for name in sorted(space):
        hp = space[name]
        path = f"{prefix}{name}"
        if isinstance(hp, dict):
            yield from leaf_hyperparameters(hp, f"{path}.")
        else:
            yield path, hp


# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with two YAML 1.2 habits Determined users rely on (see below)."""


# PyYAML follows YAML 1.1: ``1e-4`` (no dot) is a string and ``2024-01-01`` a date. Determined
# reads configs as YAML 1.2, where the first is a float, and a date would not be JSON-safe.
_SafeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _CountingLoader(_SafeLoader):
    """``_SafeLoader`` that refuses more than ``max_aliases`` aliases or ``max_depth`` levels while composing."""

    max_aliases = 0
    max_depth = 0
    aliases = 0
    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > self.max_aliases:
                raise _yaml_error(f"more than {self.max_aliases} aliases (*name); write the values out")
        # PyYAML composes recursively: a deep document would otherwise end in a slow RecursionError.
        self.depth += 1
        if self.depth > self.max_depth:
            raise _yaml_error(f"nested more than {self.max_depth} levels deep")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _yaml_error(message: str) -> ConfigError:
    return ConfigError([FieldError("<yaml>", message)])


def _load_yaml(source: str | bytes, limits: YamlLimits) -> Any:
    # Size first (cheap), then compose the node graph (aliases counted), then count what the graph
    # expands to; only a document within every limit is constructed and walked.
    size = len(source) if isinstance(source, bytes) or len(source) > limits.max_bytes \
        else len(source.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise _yaml_error(f"the config is {size} bytes, over the {limits.max_bytes}-byte limit")
    loader: _CountingLoader | None = None
    try:
        loader = _CountingLoader(source)  # reads (and checks the characters of) the whole document
        loader.max_aliases, loader.max_depth = limits.max_aliases, limits.max_depth
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, limits)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise _yaml_error(f"{where}{exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise _yaml_error(str(exc)) from exc
    except RecursionError as exc:  # PyYAML composes recursively
        raise _yaml_error(f"nested more than {limits.max_depth} levels deep") from exc
    finally:
        if loader is not None:
            loader.dispose()


def _check_expansion(root: yaml.Node, limits: YamlLimits) -> None:
    """Refuse a node graph that is recursive, or too big or deep once its aliases are expanded.

    Iterative, memoised by node: a shared (aliased) node is sized once, so the check costs the
    size of the document, not of its expansion.
    """
    sized: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, depth)
    on_path: set[int] = set()
    todo: list[tuple[yaml.Node, bool]] = [(root, False)]
    while todo:
        node, children_done = todo.pop()
        children = _child_nodes(node)
        if children_done:
            on_path.discard(id(node))
            nodes = 1 + sum(sized[id(c)][0] for c in children)
            depth = 1 + max((sized[id(c)][1] for c in children), default=0)
            if nodes > limits.max_nodes:
                raise _yaml_error(f"the config holds more than {limits.max_nodes} values once its aliases"
                                  " are expanded")
            if depth > limits.max_depth:
                raise _yaml_error(f"nested more than {limits.max_depth} levels deep")
            sized[id(node)] = (nodes, depth)
            continue
        if id(node) in sized:
            continue
        on_path.add(id(node))
        todo.append((node, True))
        for child in children:
            if id(child) in on_path:
                mark = child.start_mark
                raise _yaml_error(f"line {mark.line + 1}, column {mark.column + 1}: an alias refers to a node"
                                  " that contains it (a recursive document)")
            if id(child) not in sized:
                todo.append((child, False))


def _child_nodes(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_scalars(raw: Any) -> None:
    """Refuse strings with NUL bytes or lone surrogates and integers beyond 64 bits, naming each path.

    They validate as ``str`` / ``int`` but cannot be stored or sent on (Postgres text, JSON, argv).
    ``raw`` is bounded by ``_check_expansion``; walked iteratively.
    """
    errors: list[FieldError] = []
    todo: list[tuple[str, Any]] = [("", raw)]
    while todo and len(errors) < 20:
        path, value = todo.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                sub = _join(path, key)
                if isinstance(key, str) and (problem := text_problem(key)):
                    errors.append(FieldError(sub, f"key {problem}"))
                todo.append((sub, item))
        elif isinstance(value, list):
            todo.extend((_index(path, i), item) for i, item in enumerate(value))
        elif isinstance(value, str) and (problem := text_problem(value)):
            errors.append(FieldError(path or "<config>", problem))
        elif isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
            errors.append(FieldError(path or "<config>", f"integer {value} does not fit in 64 bits"))
    if errors:
        raise ConfigError(sorted(errors, key=lambda e: e.path))


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored or sent on, or None."""
    if "\x00" in text:
        return "contains a NUL byte"
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        return "is not valid Unicode (a lone surrogate)"
    return None


# ---------------------------------------------------------------------------------------------
# The validating walk
# ---------------------------------------------------------------------------------------------


class _Invalid:
    """Marker for a value that failed validation (its errors are already reported)."""


_INVALID = _Invalid()

_IGNORED_MESSAGE = "Determined field not supported by Kiln; ignored"

# Determined fields Kiln accepts and ignores, with a warning, per section.
_IGNORED_FIELDS: dict[type[msgspec.Struct], frozenset[str]] = {
    ExperimentConfig: frozenset(
        {
            "bind_mounts",
            "debug",
            "integrations",
            "internal",
            "log_policies",
            "optimizations",
            "pbs",
            "profiling",
            "retention_policy",
            "slurm",
            "tensorboard_storage",
        }
    ),
    EnvironmentConfig: frozenset(
        {
            "image",
            "pod_spec",
            "force_pull_image",
            "registry_auth",
            "add_capabilities",
            "drop_capabilities",
            "ports",
            "proxy_ports",
        }
    ),
    ResourcesConfig: frozenset({"devices", "agent_label", "native_parallel", "is_single_node"}),
}

# Values Determined accepts that Kiln does not implement yet, so the error says so.
_NOT_SUPPORTED_YET: dict[str, frozenset[str]] = {
    "searcher.name": frozenset(
        {"custom", "pbt", "sync_halving", "adaptive", "adaptive_simple", "adaptive_asha_v2", "manual"}
    ),
    "checkpoint_storage.type": frozenset({"gcs", "azure", "hdfs", "directory"}),
}


class _Report:
    """Errors and warnings collected during one walk; ``lenient`` skips unknown fields (wire data)."""

    def __init__(self, lenient: bool = False) -> None:
        self.lenient = lenient
        self.errors: list[FieldError] = []
        self.warnings: list[str] = []

    def error(self, path: str, message: str) -> _Invalid:
        self.errors.append(FieldError(path, message))
        return _INVALID

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")


def _join(path: str, key: object) -> str:
    if key == "":
        return path
    return f"{path}.{key}" if path else str(key)


def _index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounds(info: mi.IntType | mi.FloatType) -> str:
    parts = [
        f"{op} {bound}"
        for op, bound in ((">=", info.ge), (">", info.gt), ("<=", info.le), ("<", info.lt))
        if bound is not None
    ]
    return " " + " and ".join(parts) if parts else ""


def _describe(info: mi.Type) -> str:
    """What a value of this type looks like, for 'expected ...' messages."""
    match info:
        case mi.IntType():
            return "int" + _bounds(info)
        case mi.FloatType():
            return "float" + _bounds(info)
        case mi.StrType(min_length=1):
            return "non-empty str"
        case mi.StrType():
            return "str"
        case mi.BoolType():
            return "bool"
        case mi.NoneType():
            return "null"
        case mi.AnyType():
            return "any value"
        case mi.LiteralType(values=values):
            return "one of " + ", ".join(repr(v) for v in values)
        case mi.ListType(item_type=item, min_length=1):
            return f"non-empty list of {_describe(item)}"
        case mi.ListType(item_type=item):
            return f"list of {_describe(item)}"
        case mi.DictType(value_type=value):
            return f"mapping of str to {_describe(value)}"
        case mi.StructType():
            return "mapping"
        case mi.UnionType(types=types):
            return " or ".join(_describe(t) for t in types)
        case _:
            return str(info)


def _mismatch(value: Any, expected: str, path: str, report: _Report) -> _Invalid:
    if isinstance(value, str) and value in _NOT_SUPPORTED_YET.get(path, ()):
        return report.error(path, f"{value!r} is not supported yet by Kiln; expected {expected}")
    return report.error(path, f"expected {expected}, got {_show(value)}")


def _struct_for(
    tp: Any, raw: dict[Any, Any], path: str, report: _Report
) -> type[msgspec.Struct] | _Invalid | None:
    """The Struct a mapping should become under ``tp``: picked by tag in a tagged union."""
    if isinstance(tp, type) and issubclass(tp, _Spec) and tp.__struct_config__.tag_field is None:
        return tp  # also spares type_info the hyperparameter union, which msgspec cannot decode
    info = mi.type_info(tp)
    members = info.types if isinstance(info, mi.UnionType) else (info,)
    structs = [t for t in members if isinstance(t, mi.StructType)]
    if not structs:
        return None
    if len(structs) == 1 and structs[0].tag_field is None:
        return structs[0].cls
    tag_field = structs[0].tag_field
    assert tag_field is not None, "a union of several Structs is always tagged"
    by_tag = {t.tag: t.cls for t in structs}
    expected = "one of " + ", ".join(sorted(repr(tag) for tag in by_tag))
    tag_path = _join(path, tag_field)
    if tag_field not in raw:
        return report.error(tag_path, f"required field missing; expected {expected}")
    tag = raw[tag_field]
    chosen = by_tag.get(tag) if isinstance(tag, str) else None
    return chosen if chosen is not None else _mismatch(tag, expected, tag_path, report)


def _strip_annotated(tp: Any) -> Any:
    while getattr(tp, "__metadata__", None) is not None:
        tp = tp.__origin__
    return tp


def _convert(value: Any, tp: Any, path: str, report: _Report) -> Any:
    """``value`` as type ``tp``, or _INVALID after reporting every problem found in it."""
    if isinstance(value, dict):
        struct = _struct_for(tp, value, path, report)
        if struct is not None:
            return struct if isinstance(struct, _Invalid) else _convert_struct(value, struct, path, report)
    base = _strip_annotated(tp)
    origin = getattr(base, "__origin__", None)
    # Walk into containers so that a bad item is reported at its own path (labels[2]).
    if origin is list and isinstance(value, list):
        (item_tp,) = base.__args__
        items = [_convert(item, item_tp, _index(path, i), report) for i, item in enumerate(value)]
        if any(isinstance(item, _Invalid) for item in items):
            return _INVALID
        value = items
    elif origin is dict and isinstance(value, dict):
        _, value_tp = base.__args__
        entries = {key: _convert(item, value_tp, _join(path, key), report) for key, item in value.items()}
        bad_keys = [key for key in value if not isinstance(key, str)]
        for key in bad_keys:
            report.error(_join(path, key), f"keys must be str, got {_show(key)}")
        if bad_keys or any(isinstance(item, _Invalid) for item in entries.values()):
            return _INVALID
        value = entries
    try:
        return msgspec.convert(value, tp)
    except msgspec.ValidationError:
        return _mismatch(value, _describe(mi.type_info(tp)), path, report)


def _convert_struct(raw: dict[Any, Any], cls: type[msgspec.Struct], path: str, report: _Report) -> Any:
    """``raw`` as a ``cls``: unknown, missing and bad fields all reported, then cross-field checks."""
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    tag_field = cls.__struct_config__.tag_field
    ignored = _IGNORED_FIELDS.get(cls, frozenset())
    kwargs: dict[str, Any] = {}
    valid = True
    for key, value in raw.items():
        field_path = _join(path, key)
        if key == tag_field:
            continue
        if key in ignored:
            report.warn(field_path, _IGNORED_MESSAGE)
            continue
        field = fields.get(key)
        if field is None and report.lenient:
            report.warn(field_path, "unknown field; skipped")
            continue
        if field is None:
            report.error(field_path, "unknown field" + _suggestion(str(key), [*fields, *ignored]))
            valid = False
            continue
        custom = _CUSTOM_FIELDS.get((cls, field.name))
        if custom is not None:
            converted = custom(value, field_path, report)
        else:
            converted = _convert(value, field.type, field_path, report)
        if isinstance(converted, _Invalid):
            valid = False
        else:
            kwargs[field.name] = converted
    for name, field in fields.items():
        if field.required and name not in raw:
            expected = _describe(mi.type_info(field.type))
            report.error(_join(path, name), f"required field missing; expected {expected}")
            valid = False
    if not valid:
        return _INVALID
    struct = cls(**kwargs)
    check = _CHECKS.get(cls)
    problems = check(struct) if check else []
    for field_name, message in problems:
        report.error(_join(path, field_name), message)
    return _INVALID if problems else struct


def _suggestion(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# ---------------------------------------------------------------------------------------------
# Fields that do not follow the generic rules
# ---------------------------------------------------------------------------------------------


def _hyperparameters(raw: Any, path: str, report: _Report) -> HyperparameterSpace | _Invalid:
    """A mapping with ``type`` is one hyperparameter, without it a nested group; else a const."""
    if not isinstance(raw, dict):
        return report.error(path, f"expected mapping of name to hyperparameter, got {_show(raw)}")
    space: HyperparameterSpace = {}
    valid = True
    for name, value in raw.items():
        hp_path = _join(path, name)
        hp: Any
        if not isinstance(name, str):
            hp = report.error(hp_path, f"hyperparameter names must be str, got {_show(name)}")
        elif isinstance(value, dict) and "type" in value:
            hp = _convert(value, HPSpec, hp_path, report)
        elif isinstance(value, dict):
            hp = _hyperparameters(value, hp_path, report)
        else:
            hp = ConstHP(val=value)
        if isinstance(hp, _Invalid):
            valid = False
        else:
            space[name] = hp
    return space if valid else _INVALID


def _environment_variables(raw: Any, path: str, report: _Report) -> dict[str, str] | _Invalid:
    """``["K=V", ...]``, ``{K: V}`` or Determined's per-device ``{cpu: [...], cuda: [...]}``."""
    if _is_per_device(raw):
        if raw.get("rocm"):
            report.warn(_join(path, "rocm"), "ROCm is not supported by Kiln; ignored")
        # Kiln has one set for CPU and NVIDIA trials alike: cuda's entries win over cpu's.
        parts = [
            _environment_variables(raw.get(device, []), _join(path, device), report)
            for device in ("cpu", "cuda")
        ]
        if any(isinstance(part, _Invalid) for part in parts):
            return _INVALID
        return {key: val for part in parts if isinstance(part, dict) for key, val in part.items()}
    if isinstance(raw, list):
        pairs = [_env_item(item, _index(path, i), report) for i, item in enumerate(raw)]
    elif isinstance(raw, dict):
        pairs = [_env_entry(key, val, _join(path, key), report) for key, val in raw.items()]
    else:
        expected = "list of 'KEY=VALUE' str or mapping of str to str"
        return report.error(path, f"expected {expected}, got {_show(raw)}")
    if any(isinstance(pair, _Invalid) for pair in pairs):
        return _INVALID
    return dict(pair for pair in pairs if isinstance(pair, tuple))


def _is_per_device(raw: Any) -> bool:
    return (
        isinstance(raw, dict)
        and bool(raw)
        and set(raw) <= {"cpu", "cuda", "rocm"}
        and all(isinstance(v, list) for v in raw.values())
    )


def _env_item(item: Any, path: str, report: _Report) -> tuple[str, str] | _Invalid:
    key, sep, val = item.partition("=") if isinstance(item, str) else ("", "", "")
    if not (key and sep):
        return report.error(path, f"expected 'KEY=VALUE', got {_show(item)}")
    return key, val


def _env_entry(key: Any, val: Any, path: str, report: _Report) -> tuple[str, str] | _Invalid:
    if not isinstance(key, str) or not key:
        return report.error(path, f"variable names must be non-empty str, got {_show(key)}")
    if isinstance(val, bool) or not isinstance(val, (str, int, float)):
        return report.error(path, f"expected str or number, got {_show(val)}")
    return key, str(val)


def _period(raw: Any, path: str, report: _Report) -> Length | None | _Invalid:
    """``min_validation_period`` / ``min_checkpoint_period``: a length, where 0 units means never (Determined's
    examples write ``{batches: 0}``), which is what no period means."""
    if isinstance(raw, dict) and len(raw) == 1:
        ((unit, units),) = raw.items()
        if unit in ("batches", "records", "epochs") and units == 0 and not isinstance(units, bool):
            return None
    period: Length | None | _Invalid = _convert(raw, Length | None, path, report)
    return period


def _data(raw: Any, path: str, report: _Report) -> dict[str, Any] | _Invalid:
    """``data``: any mapping (Determined hands it to the trial as is), but a Delta table it names
    (``delta_table``, ``version``) must be one Kiln can read (schemas/data.py)."""
    data: dict[str, Any] | _Invalid = _convert(raw, dict[str, Any], path, report)
    if isinstance(data, _Invalid):
        return data
    problems = data_source.data_problems(data)
    for key, message in problems:
        report.error(_join(path, key), message)
    return _INVALID if problems else data


_CUSTOM_FIELDS: dict[tuple[type[msgspec.Struct], str], Callable[[Any, str, _Report], Any]] = {
    (ExperimentConfig, "data"): _data,
    (ExperimentConfig, "hyperparameters"): _hyperparameters,
    (ExperimentConfig, "min_validation_period"): _period,
    (ExperimentConfig, "min_checkpoint_period"): _period,
    (EnvironmentConfig, "environment_variables"): _environment_variables,
}


# ---------------------------------------------------------------------------------------------
# Cross-field checks: run on a Struct once its own fields are valid; (field, message) per problem.
# ---------------------------------------------------------------------------------------------


def _check_range(hp: IntHP | DoubleHP | LogHP) -> list[tuple[str, str]]:
    if hp.minval > hp.maxval:
        return [("minval", f"must be <= maxval ({hp.maxval!r}), got {hp.minval!r}")]
    return []


def _check_length(length: Length) -> list[tuple[str, str]]:
    set_units = [u for u in (length.batches, length.records, length.epochs) if u is not None]
    if len(set_units) != 1:
        return [("", "expected exactly one of batches, records, epochs")]
    return []


_NEEDS_MAX_TRIALS = frozenset({"random", *_RUNG_METHODS})
_NEEDS_LENGTH = _RUNG_METHODS


def _check_searcher(s: SearcherConfig) -> list[tuple[str, str]]:
    """The rules that depend on the search method."""
    problems: list[tuple[str, str]] = []
    if s.name in _NEEDS_MAX_TRIALS and s.max_trials is None:
        problems.append(("max_trials", f"required for searcher {s.name!r}; expected int >= 1"))
    if s.max_time is not None and s.time_metric is None:
        problems.append(("time_metric", "required when max_time is set"))
    if s.time_metric is not None and s.max_time is None:
        problems.append(("max_time", "required when time_metric is set"))
    if s.max_time is not None and s.max_length is not None:
        message = "give either max_time with time_metric or the legacy max_length, not both"
        problems.append(("max_length", message))
    if s.name in _NEEDS_LENGTH and s.max_time is None and s.time_metric is None and s.max_length is None:
        message = f"searcher {s.name!r} needs max_time with time_metric (or legacy max_length)"
        problems.append(("max_time", message))
    if s.name not in _RUNG_METHODS:
        for field, value, default in (("sampler", s.sampler, "random"), ("promotion", s.promotion, "asha"),
                                      ("rung_metric", s.rung_metric, "value")):
            if value != default:
                problems.append((field, f"{value!r} needs searcher adaptive_asha or async_halving, not {s.name!r}"))
    if s.promotion != "asha" and s.stop_once:
        problems.append(("promotion", f"{s.promotion!r} is a promotion rule: it needs stop_once: false"))
    return problems


def _check_experiment(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Grid search needs a number of grid points for every range hyperparameter."""
    if cfg.searcher.name != "grid":
        return []
    return [
        (f"hyperparameters.{path}.count", "required for grid search")
        for path, hp in leaf_hyperparameters(cfg.hyperparameters)
        if isinstance(hp, (IntHP, DoubleHP, LogHP)) and hp.count is None
    ]


_CHECKS: dict[type[msgspec.Struct], Callable[[Any], list[tuple[str, str]]]] = {
    IntHP: _check_range,
    DoubleHP: _check_range,
    LogHP: _check_range,
    Length: _check_length,
    SearcherConfig: _check_searcher,
    ExperimentConfig: _check_experiment,
}


# ---------------------------------------------------------------------------------------------
# Overrides: continue and fork (Determined's ``det experiment continue|fork --config-file``)
# ---------------------------------------------------------------------------------------------

# Mappings that are one choice among several shapes (``{batches: N}`` or ``{epochs: N}``): an override of one
# replaces it whole, since merging two choices would give a value with both.
_REPLACED_WHOLE = frozenset({"max_length", "min_validation_period", "min_checkpoint_period"})


def load_overrides(source: str | bytes, limits: YamlLimits | None = None) -> dict[str, Any]:
    """An override document (a YAML mapping, under the same limits as a config); an empty one is ``{}``.
    ConfigError (path ``<overrides>``) for anything else."""
    raw = _load_yaml(source, limits or YamlLimits()) if (source.strip() if isinstance(source, str) else source) \
        else None
    if raw is None:
        return {}
    _check_scalars(raw)
    if not isinstance(raw, dict):
        raise ConfigError([FieldError("<overrides>", f"expected a mapping of config fields, got {_show(raw)}")])
    return raw


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` merged into ``base`` (both plain config documents), the overrides winning, as Determined
    merges a continue's or a fork's config into the experiment's: mappings are merged key by key; anything else
    (a value, a list) replaces what was there. A mapping whose ``type`` changes (a hyperparameter, a storage)
    and a length (``max_length: {epochs: 2}`` over ``{batches: 100}``) replace the old one whole."""
    out = dict(base)
    for key, value in overrides.items():
        old = out.get(key)
        if (isinstance(old, dict) and isinstance(value, dict) and key not in _REPLACED_WHOLE
                and ("type" not in value or value.get("type") == old.get("type"))):
            out[key] = merge_overrides(old, value)
        else:
            out[key] = value
    return out


def dump_config(document: dict[str, Any]) -> str:
    """A config document as the YAML an experiment records (keys in their order)."""
    return str(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))


def load_config_document(source: str, limits: YamlLimits | None = None) -> dict[str, Any]:
    """A submitted config's YAML as its plain document (what overrides merge into)."""
    raw = _load_yaml(source, limits or YamlLimits())
    if not isinstance(raw, dict):
        raise ConfigError([FieldError("<config>", "expected a mapping at the top level")])
    return raw
