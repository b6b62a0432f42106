"""Lineage at submission: the config and code digests, the data version pinned, the parent checkpoint.

The gateway resolves all of it once, while it validates a submission, and records the result in
``ExperimentSubmitted`` (``lineage``, and the config with ``data.version`` filled in). Nothing resolves it
again: trials, restarts and replays read the recorded version even after the table moved on.

Faults: a table, version or checkpoint that is not there is the user's mistake, a 400 naming the field; a
checkpoint of someone else's experiment a 403; the store or the read model being down a 503 (``Unavailable``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import msgspec
import structlog
from litestar.exceptions import ClientException

from schemas import api
from schemas import context as code_context
from schemas import data as data_source
from schemas import events as ev
from schemas.config import ExperimentConfig
from schemas.trial import CHECKPOINTS

if TYPE_CHECKING:
    from services.gateway.app import GatewayDeps

log = structlog.get_logger(__name__)

# Key prefixes of the cluster's bucket that are Kiln's own (checkpoints, code contexts): never a data table, so a
# trial is never granted them through a ``data`` block.
RESERVED_PREFIXES = (CHECKPOINTS, code_context.object_key("sha256:0").split("/")[0])


class DataProblem(Exception):
    """The table or version a config names cannot be read: ``key`` is the ``data`` key at fault."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(message)


def _refused(key: str, message: str) -> ClientException:
    """A 400 naming the config field, in the shape of a config error (``extra.errors``)."""
    path = f"data.{key}"
    return ClientException(detail=f"{path}: {message}", extra=msgspec.to_builtins(
        api.ErrorDetails(errors=[api.ConfigProblem(path=path, message=message)])))


async def resolve(deps: GatewayDeps, config: ExperimentConfig, config_yaml: str, context_digest: str,
                  parent: ev.SourceCheckpoint | None) -> tuple[ExperimentConfig, ev.Lineage]:
    """The config to record (its table's version pinned) and the experiment's lineage; ``parent`` is the
    fine-tune's source checkpoint, resolved once by the gateway (``_source_checkpoint``)."""
    data: ev.DataVersion | None = None
    source = config.delta_source
    if source is not None:
        data = await _pin(deps, source)
        log.info("data.pinned", table=data.table, version=data.version, latest=data.latest)
        config = msgspec.structs.replace(config, data=data_source.pinned(config.data, data.version))
    return config, ev.Lineage(config_digest=ev.config_digest(config_yaml), code_digest=context_digest, data=data,
                              parent=parent)


# -- data -------------------------------------------------------------------------------------------------------


async def _pin(deps: GatewayDeps, source: data_source.DeltaSource) -> ev.DataVersion:
    """Check the table and version exist; the version to record (the latest when none is named)."""
    location = data_source.locate(source.table)  # validated with the config: cannot fail here
    if location.kind == "s3":
        if location.bucket == deps.bucket and location.prefix.split("/")[0] in RESERVED_PREFIXES:
            raise _refused(data_source.DELTA_TABLE, f"{source.table!r} is inside Kiln's own"
                           f" {location.prefix.split('/')[0]}/ in the cluster's bucket: put tables elsewhere")
        if not deps.s3_options:
            raise _refused(data_source.DELTA_TABLE, "this gateway has no S3 store configured for data tables")
        # The store's reachability first, through the client that maps an outage to a 503: after that, what
        # delta-rs cannot find is the config's fault (a 400).
        if not await deps.s3(_bucket_exists, location.bucket):
            raise _refused(data_source.DELTA_TABLE, f"bucket {location.bucket!r} does not exist on the stack's S3"
                           f" store (table {source.table!r})")
    try:
        if location.kind == "s3":
            # Through the store's outage mapping: the bucket answered a moment ago, so an I/O error now is the
            # store going away (503), not the config's fault.
            pinned: ev.DataVersion = await deps.s3(_open_in_store, location, source)
            return pinned
        return await asyncio.to_thread(_open, location, source, {})
    except DataProblem as exc:
        raise _refused(exc.key, exc.message) from exc
    except OSError as exc:  # a local path that cannot be read
        raise _refused(data_source.DELTA_TABLE, f"cannot read {source.table!r}: {_first_line(exc)}") from exc


def _open_in_store(deps: GatewayDeps, location: data_source.TableLocation,
                   source: data_source.DeltaSource) -> ev.DataVersion:
    return _open(location, source, deps.s3_options)


def _bucket_exists(deps: GatewayDeps, bucket: str) -> bool:
    return bool(deps.minio.bucket_exists(bucket))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _open(location: data_source.TableLocation, source: data_source.DeltaSource,
          options: dict[str, str]) -> ev.DataVersion:
    """Open the table with delta-rs (blocking): DataProblem for a missing table or version."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    try:
        table = DeltaTable(location.uri, storage_options=options or None)
    except TableNotFoundError as exc:
        raise DataProblem(data_source.DELTA_TABLE, f"no Delta table at {source.table!r} (no _delta_log there"
                          " that delta-rs can read)") from exc
    except DeltaError as exc:
        raise DataProblem(data_source.DELTA_TABLE, f"cannot open {source.table!r}: {_first_line(exc)}") from exc
    except OSError:
        raise  # the store (503) or a local path that cannot be read (400): the caller tells which
    except Exception as exc:
        raise DataProblem(data_source.DELTA_TABLE, f"cannot open {source.table!r}: {_first_line(exc)}") from exc
    latest = table.version()
    version = latest if source.version is None else source.version
    if version > latest:
        raise DataProblem(data_source.DELTA_VERSION, f"version {version} of {source.table!r} does not exist: the"
                          f" table's latest version is {latest}")
    if version != latest:
        try:
            table.load_as_version(version)
        except DeltaError as exc:
            raise DataProblem(data_source.DELTA_VERSION, f"version {version} of {source.table!r} cannot be read"
                              f" (its log may have been cleaned up): {_first_line(exc)}") from exc
    history = table.history(1)
    committed = history[0].get("timestamp") if history and history[0].get("version") == version else None
    return ev.DataVersion(table=source.table, version=version, latest=source.version is None,
                          table_id=str(table.metadata().id or ""),
                          committed_at=committed / 1000.0 if isinstance(committed, (int, float)) else None)


def _bad_field(path: str, message: str) -> ClientException:
    return ClientException(detail=f"{path}: {message}", extra=msgspec.to_builtins(
        api.ErrorDetails(errors=[api.ConfigProblem(path=path, message=message)])))

