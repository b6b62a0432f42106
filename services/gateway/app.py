"""The Litestar HTTP API: validates submissions into events, serves the read model.

Controllers decode, call a query or the submission service, and encode. Every route has an
``operation_id`` and a one-line docstring; the OpenAPI schema is served at ``/schema``.

Degraded, not broken: a part that is down (Postgres, NATS, the object store) makes a request answer 503
with ``Retry-After`` and the part named, never 500. Routes reach Postgres through ``GatewayDeps.db()``, the
bus through ``GatewayDeps.publish()``; those attribute a failure to its part, and ``outage()`` with one
exception handler (``_error_response``) turn every outage into the 503. Every 5xx is logged with its request
id (``X-Request-Id``, taken from the request or made up).

Typed answers: every route returns a ``schemas.api`` Struct and documents the errors it can answer with
(``_errors``), all in one shape, ``schemas.api.ErrorBody`` (``_http_error``, ``_error_response``), so the OpenAPI
schema describes every response. A missing experiment, trial, checkpoint or token is a 404 from ``found``.

Every route but ``/health``, login and the schema pages needs ``Authorization: Bearer <token>``
(``auth.require_user``, one app-wide guard); changing an experiment needs its owner or an admin (``_may_change``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import secrets
import tarfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, TypeVar, assert_never

import asyncpg
import msgspec
import structlog
import urllib3.exceptions
from litestar import Litestar, Request, Response, delete, get, post
from litestar.datastructures import State, UploadFile
from litestar.enums import RequestEncodingType, ScopeType
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
)
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, OpenAPIType, Schema, SecurityScheme
from litestar.params import Body, Parameter
from litestar.response import ServerSentEvent, Stream
from litestar.response.sse import ServerSentEventMessage
from litestar.status_codes import HTTP_201_CREATED, HTTP_202_ACCEPTED, HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from minio import Minio
from minio.error import S3Error, ServerError

from schemas import api, readmodel, registry, subjects
from schemas import context as code_context
from schemas import events as ev
from schemas.checkpoint import MANIFEST_FILE, CheckpointManifest, CorruptCheckpoint, mismatch
from schemas.cluster import CLUSTER_BUCKET, CLUSTER_KEY, AgentView, ClusterView, JobView
from schemas.config import (
    ConfigError,
    ExperimentConfig,
    YamlLimits,
    config_to_dict,
    dump_config,
    load_config_document,
    load_overrides,
    merge_overrides,
    parse_config,
    text_problem,
)
from schemas.trial import TENSORBOARD, key_refusal, tensorboard_prefix
from services.gateway import auth, collector, continuation, queries, ui
from services.gateway import lineage as data_lineage
from services.gateway.auth import Principal
from services.runtime import NATS_CLOSED, NATS_TIMEOUT, NATS_UNAVAILABLE, Bus, postgres_unavailable

log = structlog.get_logger(__name__)

_DOMAIN_DECODER = msgspec.json.Decoder(ev.DomainEvent)
_STREAM_DECODER = msgspec.json.Decoder(ev.DomainEvent | ev.TrainingMetricsReported)
T = TypeVar("T")


# -- outages -----------------------------------------------------------------------------------------------

RETRY_AFTER_S = 5
# The parts a request may need, as /health and 503 answers name them.
_PART_NAMES = {"postgres": "the read model (PostgreSQL)", "nats": "the event bus (NATS)",
               "s3": "the object store (S3)"}


class Unavailable(Exception):
    """Parts a request needs are down: answered 503 with ``Retry-After``, never 500."""

    def __init__(self, down: list[str], detail: str | None = None, *, experiment_id: int | None = None) -> None:
        self.down = down
        self.detail = detail or (" and ".join(_PART_NAMES[d] for d in down)
                                 + (" is" if len(down) == 1 else " are") + " unavailable; retry shortly")
        self.extra = api.ErrorDetails(experiment_id=experiment_id) if experiment_id is not None else None
        super().__init__(self.detail)


def outage(exc: BaseException) -> Unavailable | None:
    """The one mapping from an exception to the parts that are down; None when it is not an outage.

    A bare OSError (TimeoutError included) says nothing about which part failed, so it counts only when
    ``GatewayDeps.db()`` or ``.s3()`` already attributed it (as ``Unavailable``); the asyncpg and nats
    exception types name their part themselves.
    """
    if isinstance(exc, Unavailable):
        return exc
    if isinstance(exc, (*NATS_UNAVAILABLE, NATS_CLOSED)):  # closed: the gateway is cut off
        return Unavailable(["nats"])
    if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)) \
            and postgres_unavailable(exc):
        return Unavailable(["postgres"])
    return None


@dataclass
class GatewayDeps:
    """What the routes need, opened by the composition root and kept on ``app.state``."""

    pool: asyncpg.Pool
    bus: Bus
    minio: Minio
    bucket: str
    max_context_bytes: int
    # How long a request waits for a pooled connection (all busy, or Postgres not answering) before a 503.
    acquire_timeout_s: float = 5.0
    # Hostile input: a bigger config is refused unparsed; a context unpacking to more is refused while streamed.
    max_config_bytes: int = YamlLimits().max_bytes
    max_context_unpacked_bytes: int = code_context.DEFAULT_MAX_UNPACKED_BYTES
    max_context_files: int = code_context.DEFAULT_MAX_FILES
    # Set once the read model is migrated (at start, or when a Postgres that was down at start came back).
    migrated: asyncio.Event | None = None
    # delta-rs options for data tables in the stack's S3 store (schemas.data.s3_storage_options); none: refused.
    s3_options: dict[str, str] = dataclasses.field(default_factory=dict)
    # The model registry answers with what the read model shows once the tracker folded its event: at most this long.
    projection_wait_s: float = 10.0

    @contextlib.asynccontextmanager
    async def db(self) -> AsyncIterator[Any]:
        """A read-model connection from the pool; Postgres being unreachable becomes ``Unavailable``."""
        if self.migrated is not None and not self.migrated.is_set():
            raise Unavailable(["postgres"])
        try:
            async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
                yield conn
        except Exception as exc:
            if not postgres_unavailable(exc):
                raise
            # Idle connections the outage broke (or that never heard of it, behind a dead network) must
            # not be handed out once Postgres is back: replace every one on its next acquire.
            await self.pool.expire_connections()
            raise Unavailable(["postgres"]) from exc

    def require_bus(self) -> None:
        """Fail fast while NATS is disconnected: nats-py would buffer a publish and send it after an
        answer of 503, recording what the caller was told was not recorded."""
        if not self.bus.is_connected:
            raise Unavailable(["nats"])

    async def publish(self, event: Any) -> int:
        """Publish an event on the bus (see ``Bus.publish``); NATS being unreachable becomes ``Unavailable``."""
        self.require_bus()
        try:
            return await self.bus.publish(event)
        except NATS_UNAVAILABLE as exc:
            raise Unavailable(["nats"]) from exc

    async def publish_new(self, event: Any) -> int:
        """``publish`` a fact that must be new: JetStream answering "duplicate" (its ``Nats-Msg-Id`` was stored
        already, by someone else) is a 409, never a success."""
        self.require_bus()
        try:
            ack = await self.bus.publish_ack(event)
        except NATS_UNAVAILABLE as exc:
            raise Unavailable(["nats"]) from exc
        if ack.duplicate:
            log.error("publish.duplicate", type=type(event).__name__, seq=ack.seq)
            raise ClientException(status_code=409, detail=f"the event bus already holds a {type(event).__name__} with"
                                  f" this id (stream seq {ack.seq}) that this request did not write: nothing was"
                                  " recorded; submit again")
        return int(ack.seq)

    async def s3(self, fn: Any, *args: Any) -> Any:
        """Run a blocking object-store call in a thread; the store being unreachable becomes ``Unavailable``."""
        try:
            return await asyncio.to_thread(fn, self, *args)
        except (urllib3.exceptions.HTTPError, OSError, ServerError) as exc:  # ServerError: a 5xx answer
            raise Unavailable(["s3"]) from exc


@dataclass
class Submission:
    """Multipart form of ``POST /api/v1/experiments``."""

    config: str
    context: UploadFile
    paused: bool = False  # created paused: nothing starts until it is activated
    # No ``submitted_by``: the owner is the authenticated user, never what a client claims.


def _deps(state: State) -> GatewayDeps:
    deps: GatewayDeps = state.deps
    return deps


def _bad_request(detail: str, errors: list[api.ConfigProblem] | None = None) -> ClientException:
    return ClientException(detail=detail,
                           extra=msgspec.to_builtins(api.ErrorDetails(errors=errors)) if errors else None)


def found(value: T | None, what: str, key: object) -> T:
    """The one not-found path: a missing experiment, trial, checkpoint or token is a 404 naming it."""
    if value is None:
        raise NotFoundException(f"{what} {key} not found")
    return value


async def _experiment(deps: GatewayDeps, experiment_id: int) -> api.Experiment:
    """An experiment of the read model, or a 404 (saying so when it was deleted)."""
    async with deps.db() as conn:
        experiment = await queries.get_experiment(conn, experiment_id)
        if experiment is None and (gone := await queries.deleted_experiment(conn, experiment_id)) is not None:
            raise NotFoundException(f"experiment {experiment_id} was deleted by {gone[1]} at {gone[0]:%Y-%m-%d %H:%M}"
                                    " UTC (its events stay in the log)")
        return found(experiment, "experiment", experiment_id)


# -- what each route documents about its errors (all in the one shape, ``api.ErrorBody``) ---------------------

_ERROR_TEXT = {
    400: "Invalid parameters or body: ``extra`` names them (a list), or the config's fields (``extra.errors``)",
    401: "Not signed in, or the token is unknown, expired or revoked",
    403: "Signed in, but not allowed: only an experiment's owner or an admin may change it",
    404: "No such thing (an experiment, trial, checkpoint or token)",
    409: "Conflicts with the thing's state (already ended, already exists, stored elsewhere)",
    410: "Recorded, but its files are gone from the store",
    413: "The request body is over the gateway's limit",
    500: "Internal server error: report its ``request_id``",
    503: "A part is down (``down`` names it): retry after ``Retry-After`` seconds",
}


def _errors(*codes: int, public: bool = False) -> dict[int, ResponseSpec]:
    """The error answers a route documents: 400, 500 and 503 always, 401 unless it is public, and ``codes``."""
    every = {400, 500, 503, *codes} | (set() if public else {401})
    return {code: ResponseSpec(data_container=api.ErrorBody, description=_ERROR_TEXT[code],
                               generate_examples=False) for code in sorted(every)}


# -- parameters: what the read model and the bus can hold, refused with a 400 naming the parameter ---------------
# Ids and offsets are Postgres bigints: beyond int64 (or negative) they are refused here, not by the driver as 500s.

INT64_MAX = 2**63 - 1
Id = Annotated[int, Parameter(ge=0, le=INT64_MAX)]
Offset = Annotated[int, Parameter(ge=0, le=INT64_MAX)]
# A string of a JSON body that reaches Postgres: no NUL byte (JSON cannot carry a lone surrogate to here).
NO_NUL = r"^[^\x00]*$"


def _refuse_bad_text(request: Request[Any, Any, Any]) -> None:
    """Before every handler: a path or query parameter holding a NUL byte or a lone surrogate is a 400 naming
    it (Postgres text and JSON cannot hold them). One place for every route, ``list[str]`` params included."""
    for source, items in (("path", list(request.path_params.items())),
                          ("query", list(request.query_params.multi_items()))):
        for key, value in items:
            for text in (key, value):
                if isinstance(text, str) and (problem := text_problem(text)):
                    raise ClientException(detail=f"{source} parameter {key!r} {problem}",
                                          extra=[api.ParamProblem(key=key, source=source, message=problem)])


@get("/health", operation_id="health", opt={auth.PUBLIC: True}, security=[{}], responses=_errors(public=True))
async def health(state: State) -> api.Health:
    """Readiness: 200 when Postgres answers and the bus is connected, else 503 naming what is down."""
    deps = _deps(state)
    down, cause = [], None
    try:
        async with deps.db() as conn:
            await conn.fetchval("SELECT 1", timeout=deps.acquire_timeout_s)
    except Unavailable as exc:
        down, cause = ["postgres"], exc.__cause__
    if not deps.bus.is_connected:
        down.append("nats")
    if down:
        raise Unavailable(down) from cause
    return api.Health()


@get("/api/v1/info", operation_id="getMasterInfo", opt={auth.PUBLIC: True}, security=[{}],
     responses=_errors(public=True))
async def master_info() -> api.MasterInfo:
    """The master's version (public, as Determined's ``/info``: clients check it before signing in)."""
    return api.MasterInfo(version=_version())


@functools.cache
def _version() -> str:
    """The installed ``kiln`` distribution's version (read once, on the first ask: no I/O at import)."""
    try:
        return importlib.metadata.version("kiln")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@post("/api/v1/experiments", operation_id="createExperiment", status_code=HTTP_201_CREATED,
      responses=_errors(403, 409, 413))
async def create_experiment(
    state: State, request: Request[Principal, int, Any],
    data: Annotated[Submission, Body(media_type=RequestEncodingType.MULTI_PART)],
) -> api.Submitted:
    """Submit an experiment: a Determined-style YAML config and a tar.gz code context."""
    deps = _deps(state)
    config, warnings = await _parsed_config(deps, data.config)
    source = await _source_checkpoint(deps, request.user, config)
    blob = await data.context.read(deps.max_context_bytes + 1)
    try:
        await asyncio.to_thread(code_context.check, blob, deps.max_context_bytes, deps.max_context_unpacked_bytes,
                                deps.max_context_files)
    except code_context.ContextError as exc:
        raise _bad_request(f"invalid code context: {exc}") from exc
    digest = code_context.digest(blob)
    # Lineage: the data version pinned (the config records it) and the parent checkpoint, resolved once, here.
    config, lineage = await data_lineage.resolve(deps, config, data.config, digest, source)
    # Order: every part is needed, and the one step that records anything (the publish) comes last. The
    # bus is checked first, the id taken next (nothing stored when Postgres is down), then the context.
    deps.require_bus()
    async with deps.db() as conn:
        experiment_id = await queries.next_experiment_id(conn)
    await deps.s3(_store_context, digest, blob)
    await _publish_submission(deps, _submission_event(
        experiment_id, config, data.config, digest, len(blob), request.user, paused=data.paused, source=source,
        lineage=lineage))
    log.info("experiment.submitted", experiment_id=experiment_id, digest=digest, warnings=warnings)
    return api.Submitted(id=experiment_id, warnings=warnings, context_digest=digest)


async def _parsed_config(deps: GatewayDeps, config_yaml: str) -> tuple[ExperimentConfig, list[str]]:
    """A submitted config validated (a 400 naming every bad field), off the event loop: a big (if allowed)
    document must not hold up other requests while it parses. A checkpoint_storage without type is merged into
    the stack's own store, as Determined merges it."""
    try:
        return await asyncio.to_thread(parse_config, config_yaml, YamlLimits(max_bytes=deps.max_config_bytes),
                                       {"type": "s3", "bucket": deps.bucket})
    except ConfigError as exc:
        raise _bad_request("invalid experiment config",
                           errors=[api.ConfigProblem(path=e.path, message=e.message) for e in exc.errors]) from exc


def _submission_event(experiment_id: int, config: ExperimentConfig, config_yaml: str, digest: str, size: int,
                      principal: Principal, *, paused: bool = False, source: ev.SourceCheckpoint | None = None,
                      forked_from: int | None = None, lineage: ev.Lineage | None = None) -> ev.ExperimentSubmitted:
    seed = config.reproducibility.experiment_seed if config.reproducibility else None
    return ev.ExperimentSubmitted(
        experiment_id=experiment_id,
        config=config_to_dict(config),
        config_yaml=config_yaml,
        context_digest=digest,
        context_size=size,
        seed=seed if seed is not None else secrets.randbelow(2**31),
        submitted_by=principal.username,
        submitted_at=time.time(),
        paused=paused,
        source_checkpoint=source,
        forked_from=forked_from,
        lineage=lineage,
    )


async def _publish_submission(deps: GatewayDeps, event: ev.ExperimentSubmitted) -> None:
    """Record a submission: never reported as done for an id JetStream dropped as a duplicate."""
    try:
        await deps.publish_new(event)
    except Unavailable as exc:
        if not isinstance(exc.__cause__, NATS_TIMEOUT):
            raise  # never sent: nothing recorded
        # Sent but not acknowledged: JetStream may still have stored it. Say which id to look for.
        raise Unavailable(["nats"], f"the event bus (NATS) did not confirm the submission in time; it may still"
                          f" appear as experiment {event.experiment_id}: check before submitting again",
                          experiment_id=event.experiment_id) from exc


async def _source_checkpoint(deps: GatewayDeps, principal: Principal,
                             config: ExperimentConfig) -> ev.SourceCheckpoint | None:
    """A fine-tune's source checkpoint, resolved now and recorded in the submission (a replay never resolves it
    again): ``searcher.source_checkpoint_uuid``, or the latest checkpoint of ``searcher.source_trial_id``. It must
    exist with its files, be in the cluster's store, and be the user's to see (its experiment's owner or an
    admin): else a 400 naming the field, or a 403."""
    searcher = config.searcher
    uuid, trial_id = searcher.source_checkpoint_uuid, searcher.source_trial_id
    if uuid is None and trial_id is None:
        return None
    path = "searcher.source_checkpoint_uuid" if uuid is not None else "searcher.source_trial_id"

    def refused(message: str) -> ClientException:
        return _bad_request(f"cannot fine-tune: {message}", errors=[api.ConfigProblem(path=path, message=message)])

    if uuid is not None and trial_id is not None:
        raise refused("give searcher.source_checkpoint_uuid or searcher.source_trial_id, not both")
    async with deps.db() as conn:
        if uuid is not None:
            if not uuid or text_problem(uuid):
                raise refused(f"{uuid!r} is not a checkpoint uuid")
            row = await queries.get_checkpoint(conn, uuid)
            if row is None:
                raise refused(f"no checkpoint {uuid!r}")
        else:
            assert trial_id is not None
            if not 0 <= trial_id <= INT64_MAX or await queries.get_trial(conn, trial_id) is None:
                raise refused(f"no trial {trial_id}")
            row = await queries.latest_trial_checkpoint(conn, trial_id)
            if row is None:
                raise refused(f"trial {trial_id} has no checkpoint whose files are still there")
    checkpoint, owner = row
    if not auth.may_change(principal, owner):
        raise PermissionDeniedException(
            f"cannot fine-tune from checkpoint {checkpoint.uuid}: it belongs to experiment {checkpoint.experiment_id}"
            f" of {owner!r}, and only its owner or an admin may use its checkpoints (you are {principal.username!r})")
    if problem := continuation.source_problem(checkpoint, deps.bucket):
        raise refused(problem)
    return ev.SourceCheckpoint(uuid=checkpoint.uuid, experiment_id=checkpoint.experiment_id,
                               trial_id=checkpoint.trial_id, steps_completed=checkpoint.steps_completed,
                               storage=checkpoint.storage,
                               named_by="source_checkpoint_uuid" if uuid is not None else "source_trial_id")


def _store_context(deps: GatewayDeps, digest: str, blob: bytes) -> None:
    """Store a context once under its digest (identical contexts share one object)."""
    key = code_context.object_key(digest)
    with contextlib.suppress(S3Error):  # not there yet; an unreachable store raises on (503, not stored)
        deps.minio.stat_object(deps.bucket, key)
        return
    deps.minio.put_object(deps.bucket, key, io.BytesIO(blob), len(blob), content_type="application/gzip")


@get("/api/v1/experiments", operation_id="listExperiments", responses=_errors())
async def list_experiments(
    state: State,
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    offset: Offset = 0,
    experiment_state: Annotated[str | None, Parameter(query="state")] = None,
    archived: bool | None = None,
) -> list[api.ExperimentSummary]:
    """Experiments, newest first (``archived=false``: without the archived ones, as ``kiln experiment list``)."""
    async with _deps(state).db() as conn:
        return await queries.list_experiments(conn, limit, offset, experiment_state, archived)


@get("/api/v1/experiments/{experiment_id:int}", operation_id="getExperiment", responses=_errors(404))
async def get_experiment(state: State, experiment_id: Id) -> api.Experiment:
    """One experiment with its config, trial states and best trial."""
    return await _experiment(_deps(state), experiment_id)


@get("/api/v1/experiments/{experiment_id:int}/lineage", operation_id="getExperimentLineage", responses=_errors(404))
async def experiment_lineage(state: State, experiment_id: Id) -> api.ExperimentLineage:
    """What an experiment was trained from: config and code digests, the data version read, the parent checkpoint."""
    lineage = (await _experiment(_deps(state), experiment_id)).lineage
    assert lineage is not None  # the read model always answers one
    return lineage


@get("/api/v1/experiments/{experiment_id:int}/trials", operation_id="listExperimentTrials",
     responses=_errors(404))
async def list_trials(
    state: State,
    experiment_id: Id,
    limit: Annotated[int, Parameter(ge=1, le=10000)] = 1000,
    offset: Offset = 0,
    sort: Annotated[str, Parameter(pattern="^(id|best_metric|steps_completed|state|restarts)$")] = "id",
    order: Annotated[str, Parameter(pattern="^(asc|desc)$")] = "asc",
) -> list[api.Trial]:
    """An experiment's trials with hparams and best metric, sortable and paged."""
    async with _deps(state).db() as conn:
        found(await queries.get_experiment(conn, experiment_id), "experiment", experiment_id)
        return await queries.list_trials(conn, experiment_id, limit, offset, sort, order == "desc")


@post("/api/v1/experiments/{experiment_id:int}/kill", operation_id="killExperiment", status_code=HTTP_202_ACCEPTED,
      responses=_errors(403, 404))
async def kill_experiment(state: State, request: Request[Principal, int, Any], experiment_id: Id) -> api.StateAnswer:
    """Ask for an experiment and all its trials to be killed."""
    deps = _deps(state)
    experiment = await _experiment(deps, experiment_id)
    _may_change(request.user, experiment)
    if experiment.ended_at is not None:
        return api.StateAnswer(id=experiment_id, state=experiment.state)
    await deps.publish(ev.ExperimentKillRequested(experiment_id=experiment_id, requested_by=request.user.username,
                                                  request_id=uuid.uuid4().hex))
    return api.StateAnswer(id=experiment_id, state="STOPPING_CANCELED")


@get("/api/v1/experiments/{experiment_id:int}/events", operation_id="getExperimentEvents", responses=_errors(404))
async def experiment_events(
    state: State,
    experiment_id: Id,
    after_seq: Annotated[int, Parameter(ge=0, le=INT64_MAX - 1)] = 0,
    limit: Annotated[int, Parameter(ge=1, le=10000)] = 1000,
) -> list[api.AuditEvent]:
    """The audit trail: every event about the experiment, in stream order, with sequence numbers."""
    deps = _deps(state)
    deps.require_bus()
    out: list[api.AuditEvent] = []
    trail = deps.bus.read(subjects.EVENTS, subjects.experiment_filter(experiment_id), _DOMAIN_DECODER,
                          start_seq=after_seq + 1)
    async with contextlib.aclosing(trail) as events:
        async for d in events:
            out.append(api.AuditEvent(seq=d.seq, subject=d.subject, type=type(d.event).__name__,
                                      time=datetime.fromtimestamp(d.timestamp, UTC), event=d.event))
            if len(out) >= limit:
                break
    if not out and after_seq == 0:
        await _experiment(deps, experiment_id)
    return out


_SSE_TEXT = ("Server-Sent Events: ``training`` and ``validation`` (data: ``LiveMetrics`` as JSON, one per point),"
             " ``trial`` (data: ``LiveTrial``) when a trial changes state, ``progress`` (data: ``LiveProgress``),"
             " ``end`` (data: ``LiveEnd``) once the experiment ended, and keep-alive comments")


@get("/api/v1/experiments/{experiment_id:int}/metrics/stream", operation_id="streamExperimentMetrics",
     responses={200: ResponseSpec(data_container=str, media_type="text/event-stream", description=_SSE_TEXT,
                                  generate_examples=False),
                **_errors(404)})
async def stream_metrics(state: State, experiment_id: Id) -> ServerSentEvent:
    """Live metrics of an experiment as Server-Sent Events (``training`` and ``validation``), until it ends."""
    deps = _deps(state)
    experiment = await _experiment(deps, experiment_id)
    if experiment.ended_at is None:
        deps.require_bus()  # before the stream starts: afterwards no status can be sent
    return ServerSentEvent(_metric_events(deps, experiment_id, ended=experiment.ended_at is not None))


async def _metric_events(deps: GatewayDeps, experiment_id: int, ended: bool) -> AsyncIterator[ServerSentEventMessage]:
    """Relay the experiment's live metric messages; one SSE message per point."""
    encoder = msgspec.json.Encoder()
    if ended:
        yield ServerSentEventMessage(event="end", data=encoder.encode(api.LiveEnd()).decode())
        return
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)

    async def relay(subject: str, data: bytes) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a slow client loses points, never the gateway
            queue.put_nowait(data)

    subs = [await deps.bus.subscribe(subjects.metrics_filter(experiment_id), relay),
            await deps.bus.subscribe(subjects.trial_filter(experiment_id), relay),
            await deps.bus.subscribe(subjects.experiment_facts_filter(experiment_id), relay)]
    try:
        while True:
            try:
                data = await asyncio.wait_for(queue.get(), timeout=15.0)
            except TimeoutError:
                yield ServerSentEventMessage(comment="keep-alive")
                continue
            try:
                event = _STREAM_DECODER.decode(data)
            except msgspec.DecodeError:
                continue
            match event:
                case ev.TrainingMetricsReported():
                    for p in event.points:
                        yield ServerSentEventMessage(event="training", data=encoder.encode(api.LiveMetrics(
                            trial_id=event.trial_id, steps_completed=p.steps_completed, metrics=p.metrics)).decode())
                case ev.ValidationReported():
                    yield ServerSentEventMessage(event="validation", data=encoder.encode(api.LiveMetrics(
                        trial_id=event.trial_id, steps_completed=event.steps_completed,
                        metrics=event.metrics)).decode())
                case ev.TrialProgressReported():
                    yield ServerSentEventMessage(event="progress", data=encoder.encode(api.LiveProgress(
                        trial_id=event.trial_id, progress=event.progress)).decode())
                case ev.TrialCreated() | ev.TrialStarted() | ev.TrialRestarting() | ev.TrialPaused() \
                        | ev.TrialExited():
                    yield ServerSentEventMessage(event="trial", data=encoder.encode(_live_trial(event)).decode())
                case ev.ExperimentEnded():
                    end = encoder.encode(api.LiveEnd(state=event.state)).decode()
                    yield ServerSentEventMessage(event="end", data=end)
                    return
                case _:
                    pass
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _live_trial(event: ev.TrialCreated | ev.TrialStarted | ev.TrialRestarting | ev.TrialPaused | ev.TrialExited,
                ) -> api.LiveTrial:
    """The state a trial fact puts the trial in, as the read model names it."""
    match event:
        case ev.TrialCreated():
            return api.LiveTrial(trial_id=event.trial_id, state="QUEUED")
        case ev.TrialStarted():
            return api.LiveTrial(trial_id=event.trial_id, state="RUNNING")
        case ev.TrialRestarting():
            return api.LiveTrial(trial_id=event.trial_id, state="QUEUED", reason=f"restart {event.restarts}")
        case ev.TrialPaused():
            return api.LiveTrial(trial_id=event.trial_id, state="PAUSED")
        case ev.TrialExited():
            return api.LiveTrial(trial_id=event.trial_id, state=event.state, reason=event.reason)
        case _:
            assert_never(event)


def _may_change(principal: Principal, experiment: api.Experiment) -> None:
    """403 unless the principal may change this experiment (``auth.may_change``): checked before anything is
    published."""
    if not auth.may_change(principal, experiment.submitted_by):
        raise PermissionDeniedException(
            f"experiment {experiment.id} belongs to {experiment.submitted_by!r}: only its owner or an admin"
            f" may change it (you are {principal.username!r})")


async def _active_experiment(deps: GatewayDeps, principal: Principal, experiment_id: int) -> api.Experiment:
    experiment = await _experiment(deps, experiment_id)
    _may_change(principal, experiment)
    if experiment.ended_at is not None:
        raise ClientException(status_code=409, detail=f"experiment {experiment_id} already ended ({experiment.state})")
    return experiment


@post("/api/v1/experiments/{experiment_id:int}/pause", operation_id="pauseExperiment",
      status_code=HTTP_202_ACCEPTED, responses=_errors(403, 404, 409))
async def pause_experiment(state: State, request: Request[Principal, int, Any], experiment_id: Id) -> api.StateAnswer:
    """Pause: trials checkpoint and give back their slots; nothing new starts until activated."""
    deps = _deps(state)
    await _active_experiment(deps, request.user, experiment_id)
    await deps.publish(ev.ExperimentPauseRequested(experiment_id=experiment_id, request_id=uuid.uuid4().hex))
    return api.StateAnswer(id=experiment_id, state="PAUSED")


@post("/api/v1/experiments/{experiment_id:int}/activate", operation_id="activateExperiment",
      status_code=HTTP_202_ACCEPTED, responses=_errors(403, 404, 409))
async def activate_experiment(state: State, request: Request[Principal, int, Any],
                              experiment_id: Id) -> api.StateAnswer:
    """Activate a paused experiment: its trials queue again and resume from their checkpoints."""
    deps = _deps(state)
    await _active_experiment(deps, request.user, experiment_id)
    await deps.publish(ev.ExperimentActivateRequested(experiment_id=experiment_id, request_id=uuid.uuid4().hex))
    return api.StateAnswer(id=experiment_id, state="ACTIVE")


class ResourcesPatch(msgspec.Struct, forbid_unknown_fields=True):
    """Scheduling knobs to change; absent ones stay as they are."""

    priority: Annotated[int, msgspec.Meta(ge=1, le=99)] | None = None
    weight: Annotated[float, msgspec.Meta(gt=0)] | None = None
    max_slots: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None  # 0 removes the cap


@post("/api/v1/experiments/{experiment_id:int}/resources", operation_id="setExperimentResources",
      status_code=HTTP_202_ACCEPTED, responses=_errors(403, 404, 409))
async def set_resources(state: State, request: Request[Principal, int, Any], experiment_id: Id,
                        data: ResourcesPatch) -> api.ResourcesAnswer:
    """Change priority, weight or max_slots of a running experiment."""
    deps = _deps(state)
    await _active_experiment(deps, request.user, experiment_id)
    if data.priority is None and data.weight is None and data.max_slots is None:
        raise _bad_request("nothing to change: give priority, weight or max_slots")
    await deps.publish(ev.ExperimentResourcesChanged(
        experiment_id=experiment_id, priority=data.priority, weight=data.weight, max_slots=data.max_slots,
        change_id=uuid.uuid4().hex))
    return api.ResourcesAnswer(id=experiment_id, priority=data.priority, weight=data.weight, max_slots=data.max_slots)


Label = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=NO_NUL)]


class MetadataPatch(msgspec.Struct, forbid_unknown_fields=True):
    """Name, description and labels to change (Determined's ``set name|description``, ``label add|remove``)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=NO_NUL)] | None = None
    description: Annotated[str, msgspec.Meta(max_length=10_000, pattern=NO_NUL)] | None = None
    add_labels: Annotated[list[Label], msgspec.Meta(max_length=100)] = []
    remove_labels: Annotated[list[Label], msgspec.Meta(max_length=100)] = []
    archived: bool | None = None  # archive (only an ended experiment) or unarchive


@post("/api/v1/experiments/{experiment_id:int}/metadata", operation_id="setExperimentMetadata",
      status_code=HTTP_202_ACCEPTED, responses=_errors(403, 404, 409))
async def set_metadata(state: State, request: Request[Principal, int, Any], experiment_id: Id,
                       data: MetadataPatch) -> api.ExperimentMetadata:
    """Rename, redescribe, relabel, archive or unarchive an experiment (owner or admin; also after it ended)."""
    deps = _deps(state)
    experiment = await _experiment(deps, experiment_id)
    _may_change(request.user, experiment)
    if (data.name is None and data.description is None and not data.add_labels and not data.remove_labels
            and data.archived is None):
        raise _bad_request("nothing to change: give name, description, add_labels, remove_labels or archived")
    if data.archived and experiment.ended_at is None:  # as Determined: only what has ended leaves the list
        raise ClientException(status_code=409, detail=f"experiment {experiment_id} is {experiment.state}: only an"
                              " ended experiment can be archived (kill it first)")
    await deps.publish(ev.ExperimentMetadataChanged(
        experiment_id=experiment_id, name=data.name, description=data.description, labels_added=data.add_labels,
        labels_removed=data.remove_labels, archived=data.archived, requested_by=request.user.username,
        change_id=uuid.uuid4().hex))
    # What the tracker will show once it folds the event (the one rule, ``ev.relabelled``).
    return api.ExperimentMetadata(
        id=experiment_id, name=experiment.name if data.name is None else data.name,
        description=experiment.description if data.description is None else data.description,
        labels=ev.relabelled(experiment.labels, data.add_labels, data.remove_labels),
        archived=experiment.archived if data.archived is None else data.archived)


@post("/api/v1/trials/{trial_id:int}/kill", operation_id="killTrial", status_code=HTTP_202_ACCEPTED,
      responses=_errors(403, 404))
async def kill_trial(state: State, request: Request[Principal, int, Any], trial_id: Id) -> api.StateAnswer:
    """Kill one trial; the experiment's other trials go on."""
    deps = _deps(state)
    async with deps.db() as conn:
        trial = found(await queries.get_trial(conn, trial_id), "trial", trial_id)
        experiment = found(await queries.get_experiment(conn, trial.experiment_id), "trial", trial_id)
    _may_change(request.user, experiment)
    if trial.ended_at is None:
        await deps.publish(ev.TrialKillRequested(experiment_id=trial.experiment_id, trial_id=trial_id,
                                                 requested_by=request.user.username, request_id=uuid.uuid4().hex))
    return api.StateAnswer(id=trial_id, state=trial.state if trial.ended_at else "STOPPING_CANCELED")


async def _cluster_view(deps: GatewayDeps) -> ClusterView:
    deps.require_bus()
    value = await deps.bus.kv_get(CLUSTER_BUCKET, CLUSTER_KEY)
    if value is None:  # no scheduler has published yet
        return ClusterView(as_of=0.0, agents=[], jobs=[])
    return msgspec.json.decode(value, type=ClusterView)


@get("/api/v1/agents", operation_id="listAgents", responses=_errors())
async def list_agents(state: State) -> list[AgentView]:
    """Worker agents with their slots and what runs on each (as the scheduler last published)."""
    return (await _cluster_view(_deps(state))).agents


@get("/api/v1/jobs", operation_id="listJobs", responses=_errors())
async def list_jobs(state: State) -> list[JobView]:
    """Trials holding or waiting for slots, with queue positions, priorities and weights."""
    return (await _cluster_view(_deps(state))).jobs


@get("/api/v1/trials/{trial_id:int}", operation_id="getTrial", responses=_errors(404))
async def get_trial(state: State, trial_id: Id) -> api.TrialDetail:
    """One trial with its allocations."""
    async with _deps(state).db() as conn:
        return found(await queries.get_trial(conn, trial_id), "trial", trial_id)


@get("/api/v1/trials/{trial_id:int}/metrics", operation_id="getTrialMetrics", responses=_errors())
async def trial_metrics(
    state: State,
    trial_id: Id,
    kind: Annotated[str | None, Parameter(pattern="^(training|validation)$")] = None,
    limit: Annotated[int, Parameter(ge=1, le=100000)] = 10000,
    offset: Offset = 0,
) -> list[api.MetricsAtStep]:
    """A trial's metric points, by kind and step."""
    async with _deps(state).db() as conn:
        return await queries.trial_metrics(conn, trial_id, kind, limit, offset)


@get("/api/v1/trials/{trial_id:int}/series", operation_id="getTrialSeries", responses=_errors())
async def trial_series(
    state: State,
    trial_id: Id,
    name: Annotated[list[str] | None, Parameter(query="name")] = None,
    kind: Annotated[str, Parameter(pattern="^(training|validation)$")] = "training",
    max_points: Annotated[int, Parameter(ge=2, le=100000)] = 1000,
) -> api.Series:
    """Series of one or more metrics, downsampled server-side to at most ~max_points keeping extremes."""
    async with _deps(state).db() as conn:
        names = name or sorted({m.name for m in await queries.metric_names(conn, trial_id) if m.kind == kind})
        return api.Series(trial_id=trial_id, kind=kind, max_points=max_points,  # type: ignore[arg-type]
                          series={n: await queries.series(conn, trial_id, kind, n, max_points) for n in names})


@get("/api/v1/trials/{trial_id:int}/metric-names", operation_id="getTrialMetricNames", responses=_errors())
async def trial_metric_names(state: State, trial_id: Id) -> list[api.MetricName]:
    """The metrics a trial reported, with their last, min and max values."""
    async with _deps(state).db() as conn:
        return await queries.metric_names(conn, trial_id)


@get("/api/v1/trials/{trial_id:int}/logs", operation_id="getTrialLogs", responses=_errors())
async def trial_logs(
    state: State,
    trial_id: Id,
    limit: Annotated[int, Parameter(ge=1, le=100000)] = 10000,
    offset: Offset = 0,
    tail: bool = False,
    since: datetime | None = None,
) -> list[api.LogLine]:
    """A trial's log lines in time order; ``tail=true`` gives the last ``limit`` lines; ``since``: written at or
    after that time."""
    async with _deps(state).db() as conn:
        return await queries.trial_logs(conn, trial_id, limit, offset, tail, since)


# -- checkpoints: readable and deletable by the experiment's owner or an admin ----------------------------------


def _may_touch_checkpoints(principal: Principal, experiment_id: int, owner: str) -> None:
    """403 unless the principal owns the experiment or is an admin: checkpoints (model weights) and the code
    are the owner's, to list, read, download and delete."""
    if not auth.may_change(principal, owner):
        raise PermissionDeniedException(
            f"the checkpoints and code of experiment {experiment_id} belong to {owner!r}: only"
            f" its owner or an admin may see or delete them (you are {principal.username!r})")


async def _owned_experiment(deps: GatewayDeps, principal: Principal, experiment_id: int) -> api.Experiment:
    experiment = await _experiment(deps, experiment_id)
    _may_touch_checkpoints(principal, experiment_id, experiment.submitted_by)
    return experiment


@get("/api/v1/trials/{trial_id:int}/checkpoints", operation_id="listTrialCheckpoints", responses=_errors(403, 404))
async def trial_checkpoints(state: State, request: Request[Principal, int, Any], trial_id: Id) -> list[api.Checkpoint]:
    """A trial's checkpoints in step order, with their state and searcher metric (owner or admin)."""
    deps = _deps(state)
    async with deps.db() as conn:
        trial = found(await queries.get_trial(conn, trial_id), "trial", trial_id)
        experiment = found(await queries.get_experiment(conn, trial.experiment_id), "trial", trial_id)
        _may_touch_checkpoints(request.user, experiment.id, experiment.submitted_by)
        return await queries.trial_checkpoints(conn, trial_id)


@get("/api/v1/experiments/{experiment_id:int}/checkpoints", operation_id="listExperimentCheckpoints",
     responses=_errors(403, 404))
async def experiment_checkpoints(
    state: State,
    request: Request[Principal, int, Any],
    experiment_id: Id,
    sort_by: Annotated[str, Parameter(pattern="^(trial|steps_completed|reported_at|metric)$")] = "trial",
    checkpoint_state: Annotated[str | None, Parameter(query="state", pattern="^(COMPLETED|DELETED)$")] = None,
    limit: Annotated[int, Parameter(ge=1, le=10000)] = 1000,
    offset: Offset = 0,
) -> list[api.Checkpoint]:
    """An experiment's checkpoints (owner or admin); ``sort_by=metric&state=COMPLETED&limit=K``: the best K."""
    deps = _deps(state)
    await _owned_experiment(deps, request.user, experiment_id)
    async with deps.db() as conn:
        return await queries.experiment_checkpoints(conn, experiment_id, sort_by, checkpoint_state, limit, offset)


async def _checkpoint(deps: GatewayDeps, principal: Principal, uuid: str) -> api.Checkpoint:
    """A checkpoint's record, or a 404; a 403 unless the principal may see it."""
    async with deps.db() as conn:
        checkpoint, owner = found(await queries.get_checkpoint(conn, uuid), "checkpoint", uuid)
    _may_touch_checkpoints(principal, checkpoint.experiment_id, owner)
    return checkpoint


@get("/api/v1/checkpoints/{uuid:str}", operation_id="getCheckpoint", responses=_errors(403, 404))
async def get_checkpoint(state: State, request: Request[Principal, int, Any], uuid: str) -> api.Checkpoint:
    """One checkpoint's record: trial, steps, state, files, metadata and searcher metric (owner or admin)."""
    return await _checkpoint(_deps(state), request.user, uuid)


def _gone(checkpoint: api.Checkpoint) -> ClientException:
    return ClientException(status_code=410, detail=f"checkpoint {checkpoint.uuid} was deleted"
                           f" ({checkpoint.delete_reason or 'its files left the store'})")


@get("/api/v1/checkpoints/{uuid:str}/download", operation_id="downloadCheckpoint",
     responses={200: ResponseSpec(data_container=bytes, media_type="application/x-tar",
                                  description="A tar archive of the checkpoint's files (with their modification"
                                              " times)", generate_examples=False), **_errors(403, 404, 409, 410)})
async def download_checkpoint(state: State, request: Request[Principal, int, Any], uuid: str) -> Stream:
    """The checkpoint's files as a tar stream (checkpoints in the cluster's store; owner or admin)."""
    deps = _deps(state)
    checkpoint = await _checkpoint(deps, request.user, uuid)
    if checkpoint.state == "DELETED":
        raise _gone(checkpoint)
    prefix = collector.object_prefix(checkpoint.storage, deps.bucket, uuid)
    if prefix is None:
        raise ClientException(status_code=409, detail=f"checkpoint {uuid} is stored in {checkpoint.storage},"
                              " outside the cluster's store; read it from there")
    files = list(checkpoint.resources)
    try:
        blob = await deps.s3(_tar_checkpoint, prefix, files)
    except S3Error as exc:
        if exc.code not in ("NoSuchKey", "NoSuchBucket"):
            raise
        raise ClientException(status_code=410, detail=f"checkpoint {uuid} is recorded but its files are gone from"
                              f" the store ({exc.code}: {exc.resource or prefix})") from exc
    except CorruptCheckpoint as exc:
        raise ClientException(status_code=410, detail=f"checkpoint {uuid} is recorded but its files in the store"
                              f" are not what was uploaded: {exc}") from exc
    return Stream(iter([blob]), media_type="application/x-tar",
                  headers={"Content-Disposition": f'attachment; filename="{uuid}.tar"'})


def _mtime(headers: Any) -> float:
    """A stored file's modification time: the one its uploader recorded (``x-amz-meta-mtime``), else when the
    object was written (never 1970)."""
    recorded = headers.get("x-amz-meta-mtime")
    if recorded:
        with contextlib.suppress(ValueError):
            return float(recorded)
    modified = headers.get("last-modified")
    if modified:
        with contextlib.suppress(TypeError, ValueError):
            return parsedate_to_datetime(modified).timestamp()
    return time.time()


def _stored_manifest(deps: GatewayDeps, prefix: str) -> CheckpointManifest | None:
    """The manifest the uploader stored with a checkpoint (schemas.checkpoint); None for one stored without."""
    try:
        resp = deps.minio.get_object(deps.bucket, prefix + MANIFEST_FILE)
    except S3Error as exc:
        if exc.code == "NoSuchKey":
            return None
        raise
    try:
        return msgspec.json.decode(resp.read(), type=CheckpointManifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptCheckpoint(f"its {MANIFEST_FILE} is unreadable: {exc}") from exc
    finally:
        resp.close()
        resp.release_conn()


def _tar_checkpoint(deps: GatewayDeps, prefix: str, files: list[str]) -> bytes:
    """The files as a tar, each checked against the stored manifest (size, sha256) and given its recorded mtime."""
    manifest = _stored_manifest(deps, prefix)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in sorted(files):
            resp = deps.minio.get_object(deps.bucket, prefix + rel)
            try:
                data = resp.read()
                mtime = _mtime(resp.headers)
            finally:
                resp.close()
                resp.release_conn()
            want = manifest.files.get(rel) if manifest is not None else None
            if want is not None:
                why = mismatch(rel, want, len(data), hashlib.sha256(data).hexdigest())
                if why:
                    raise CorruptCheckpoint(why)
                mtime = want.mtime
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mtime = int(mtime)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@get("/api/v1/checkpoints/{uuid:str}/files", operation_id="getCheckpointFiles", responses=_errors(403, 404, 409, 410))
async def checkpoint_files(state: State, request: Request[Principal, int, Any], uuid: str) -> api.CheckpointFiles:
    """What the uploader recorded of a checkpoint's files: steps, framework, each file's size, sha256 and
    modification time (owner or admin). A checkpoint stored before Kiln recorded hashes lists sizes only."""
    deps = _deps(state)
    checkpoint = await _checkpoint(deps, request.user, uuid)
    if checkpoint.state == "DELETED":
        raise _gone(checkpoint)
    prefix = collector.object_prefix(checkpoint.storage, deps.bucket, uuid)
    if prefix is None:
        raise ClientException(status_code=409, detail=f"checkpoint {uuid} is stored in {checkpoint.storage},"
                              " outside the cluster's store; its manifest is there, as " + MANIFEST_FILE)
    try:
        manifest = await deps.s3(_stored_manifest, prefix)
    except CorruptCheckpoint as exc:
        raise ClientException(status_code=410, detail=f"checkpoint {uuid}: {exc}") from exc
    if manifest is None:
        return api.CheckpointFiles(uuid=uuid, steps_completed=checkpoint.steps_completed, framework="",
                                   hashed=False, files={rel: api.CheckpointFileInfo(size=size)
                                                        for rel, size in checkpoint.resources.items()})
    return api.CheckpointFiles(uuid=uuid, steps_completed=manifest.steps_completed, framework=manifest.framework,
                               hashed=True, files={rel: api.CheckpointFileInfo(size=f.size, sha256=f.sha256,
                                                                               mtime=f.mtime)
                                                   for rel, f in sorted(manifest.files.items())})


@delete("/api/v1/checkpoints/{uuid:str}", operation_id="deleteCheckpoint", status_code=200,
        responses=_errors(403, 404, 409))
async def delete_checkpoint(state: State, request: Request[Principal, int, Any], uuid: str) -> api.CheckpointDeleted:
    """Delete a checkpoint's files from the store (owner or admin); it stays listed as DELETED."""
    deps = _deps(state)
    checkpoint = await _checkpoint(deps, request.user, uuid)
    if checkpoint.protected:
        raise ClientException(status_code=409, detail=f"checkpoint {uuid} is registered as a model version:"
                              " delete the version first")
    if checkpoint.state == "DELETED":
        return api.CheckpointDeleted(uuid=uuid, state="DELETED", objects_removed=0)
    deps.require_bus()  # before deleting: the deletion must be recorded
    ref = ev.CheckpointRef(uuid=uuid, trial_id=checkpoint.trial_id, storage=checkpoint.storage)
    removed, elsewhere = await deps.s3(lambda d, r: collector.delete_checkpoints(d.minio, d.bucket, r), [ref])
    await deps.publish(ev.CheckpointsDeleted(experiment_id=checkpoint.experiment_id, uuids=[uuid], reason="deleted",
                                             deleted_by=request.user.username, objects_removed=removed,
                                             not_in_store=elsewhere))
    log.info("checkpoint.deleted", uuid=uuid, objects=removed, by=request.user.username)
    return api.CheckpointDeleted(uuid=uuid, state="DELETED", objects_removed=removed)


@delete("/api/v1/experiments/{experiment_id:int}", operation_id="deleteExperiment", status_code=200,
        responses=_errors(403, 404, 409))
async def delete_experiment(state: State, request: Request[Principal, int, Any],
                            experiment_id: Id) -> api.ExperimentDeletion:
    """Delete an ended experiment (owner or admin): its checkpoints' files leave the store, then the experiment,
    its trials, metrics and logs leave the read model. Its events stay in the log (the audit trail)."""
    deps = _deps(state)
    experiment = await _experiment(deps, experiment_id)
    _may_change(request.user, experiment)
    if experiment.ended_at is None:
        raise ClientException(status_code=409, detail=f"experiment {experiment_id} is {experiment.state}: only an"
                              " ended experiment can be deleted (kill it first)")
    async with deps.db() as conn:
        checkpoints = await queries.experiment_checkpoints(conn, experiment_id, "trial", None, 2**31 - 1, 0)
    if registered := [c.uuid for c in checkpoints if c.protected]:
        raise ClientException(status_code=409, detail=f"experiment {experiment_id} has checkpoints registered as"
                              f" model versions ({', '.join(registered)}): delete those versions first")
    deps.require_bus()  # before deleting: the deletion must be recorded
    refs = [ev.CheckpointRef(uuid=c.uuid, trial_id=c.trial_id, storage=c.storage)
            for c in checkpoints if c.state != "DELETED"]
    removed = 0
    if refs:  # the files first: a failure here leaves the experiment listed, and a retry deletes the rest
        removed, elsewhere = await deps.s3(lambda d, r: collector.delete_checkpoints(d.minio, d.bucket, r), refs)
        await deps.publish(ev.CheckpointsDeleted(
            experiment_id=experiment_id, uuids=[r.uuid for r in refs], reason="experiment deleted",
            deleted_by=request.user.username, objects_removed=removed, not_in_store=elsewhere))
    # Its trials' TensorBoard files go too (nothing records them one by one: the prefix is the experiment's).
    removed += await deps.s3(lambda d, p: collector.delete_objects(d.minio, d.bucket, p),
                             f"{TENSORBOARD}/{experiment_id}/")
    await deps.publish(ev.ExperimentDeleted(experiment_id=experiment_id, deleted_by=request.user.username))
    log.info("experiment.deleted", experiment_id=experiment_id, checkpoints=len(refs), objects=removed,
             by=request.user.username)
    return api.ExperimentDeletion(id=experiment_id, checkpoints_deleted=len(refs), objects_removed=removed)


class GCPolicyPatch(msgspec.Struct, forbid_unknown_fields=True):
    """Checkpoint retention to change (Determined's ``set gc-policy``); absent values stay as they are."""

    save_experiment_best: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    save_trial_best: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    save_trial_latest: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None


@post("/api/v1/experiments/{experiment_id:int}/gc-policy", operation_id="setExperimentGCPolicy",
      status_code=HTTP_202_ACCEPTED, responses=_errors(403, 404))
async def set_gc_policy(state: State, request: Request[Principal, int, Any], experiment_id: Id,
                        data: GCPolicyPatch) -> api.GCPolicy:
    """Change an experiment's checkpoint retention; finished trials' checkpoints are collected by it at once."""
    deps = _deps(state)
    experiment = await _experiment(deps, experiment_id)
    _may_change(request.user, experiment)  # also after it ended: that is when retention matters most
    if data.save_experiment_best is None and data.save_trial_best is None and data.save_trial_latest is None:
        raise _bad_request("nothing to change: give save_experiment_best, save_trial_best or save_trial_latest")
    await deps.publish(ev.CheckpointGCPolicyChanged(
        experiment_id=experiment_id, save_experiment_best=data.save_experiment_best,
        save_trial_best=data.save_trial_best, save_trial_latest=data.save_trial_latest,
        requested_by=request.user.username, change_id=uuid.uuid4().hex))
    return api.GCPolicy(id=experiment_id, save_experiment_best=data.save_experiment_best,
                        save_trial_best=data.save_trial_best, save_trial_latest=data.save_trial_latest)


@get("/api/v1/experiments/{experiment_id:int}/context", operation_id="downloadExperimentContext",
     responses={200: ResponseSpec(data_container=bytes, media_type="application/gzip",
                                  description="The code context as submitted (a tar.gz, byte for byte)",
                                  generate_examples=False), **_errors(403, 404, 410)})
async def download_context(state: State, request: Request[Principal, int, Any], experiment_id: Id) -> Response[bytes]:
    """The experiment's code context exactly as submitted (owner or admin)."""
    deps = _deps(state)
    experiment = await _owned_experiment(deps, request.user, experiment_id)
    try:
        blob = await deps.s3(_read_context, experiment.context_digest)
    except S3Error as exc:
        if exc.code not in ("NoSuchKey", "NoSuchBucket"):
            raise
        raise ClientException(status_code=410, detail=f"the code context of experiment {experiment_id} is gone"
                              f" from the store ({exc.code})") from exc
    return Response(blob, media_type="application/gzip", headers={
        "Content-Disposition": f'attachment; filename="experiment-{experiment_id}-context.tar.gz"',
        "X-Context-Digest": experiment.context_digest})


def _read_context(deps: GatewayDeps, digest: str) -> bytes:
    resp = deps.minio.get_object(deps.bucket, code_context.object_key(digest))
    try:
        return bytes(resp.read())
    finally:
        resp.close()
        resp.release_conn()


# -- continue and fork (Determined's ``det experiment continue`` / ``fork``) -----------------------------------


def _overrides(deps: GatewayDeps, text: str) -> dict[str, Any]:
    """The request's override document; a 400 when it is not a YAML mapping within the config limits."""
    try:
        return load_overrides(text, YamlLimits(max_bytes=deps.max_config_bytes))
    except ConfigError as exc:
        raise _bad_request("invalid override config",
                           errors=[api.ConfigProblem(path=e.path, message=e.message) for e in exc.errors]) from exc


def _merged_yaml(deps: GatewayDeps, experiment: api.Experiment, overrides: dict[str, Any]) -> str:
    """The experiment's config as submitted with the overrides merged in (its YAML unchanged without any)."""
    if not overrides:
        return experiment.config_yaml
    try:
        base = load_config_document(experiment.config_yaml, YamlLimits(max_bytes=deps.max_config_bytes))
    except ConfigError:
        base = experiment.config  # recorded before a limit it no longer meets: its validated form
    return dump_config(merge_overrides(base, overrides))


@post("/api/v1/experiments/{experiment_id:int}/continue", operation_id="continueExperiment",
      status_code=HTTP_202_ACCEPTED, responses=_errors(403, 404, 409))
async def continue_experiment(state: State, request: Request[Principal, int, Any], experiment_id: Id,
                              data: api.ContinueRequest) -> api.Continued:
    """Continue an ended experiment (owner or admin): a single trial trains on from its latest checkpoint under
    the config with ``config``'s overrides (a longer ``searcher.max_length``); a grid or random search reruns
    the trials that did not complete."""
    deps = _deps(state)
    experiment = await _experiment(deps, experiment_id)
    _may_change(request.user, experiment)
    overrides = _overrides(deps, data.config)
    if problems := continuation.override_problems(overrides):
        raise _bad_request("these fields cannot be changed by a continue", errors=problems)
    config_yaml = _merged_yaml(deps, experiment, overrides)
    config, warnings = await _parsed_config(deps, config_yaml)
    async with deps.db() as conn:
        trials = await queries.list_trials(conn, experiment_id, 10_000, 0)
        latest = [t.latest_checkpoint for t in trials if t.latest_checkpoint]
        deleted = await queries.deleted_checkpoints(conn, latest) if latest else set()
    facts = [continuation.TrialFacts(id=t.id, state=t.state, exit_code=t.exit_code,
                                     latest_checkpoint=t.latest_checkpoint,
                                     latest_checkpoint_deleted=t.latest_checkpoint in deleted) for t in trials]
    try:
        trial_ids = continuation.continue_trials(experiment_id, experiment.state, experiment.searcher_name,
                                                 bool(overrides), config.searcher.name, facts)
    except continuation.Refused as exc:
        errors = [api.ConfigProblem(path=exc.path, message=exc.detail)] if exc.path else None
        raise ClientException(status_code=exc.status, detail=exc.detail,
                              extra=msgspec.to_builtins(api.ErrorDetails(errors=errors)) if errors else None) from exc
    await deps.publish(ev.ExperimentContinued(
        experiment_id=experiment_id, config=config_to_dict(config), config_yaml=config_yaml, trial_ids=trial_ids,
        requested_by=request.user.username, request_id=uuid.uuid4().hex))
    log.info("experiment.continued", experiment_id=experiment_id, trials=trial_ids, by=request.user.username)
    return api.Continued(id=experiment_id, state="ACTIVE", trial_ids=trial_ids, config_yaml=config_yaml,
                         warnings=warnings)


@post("/api/v1/experiments/{experiment_id:int}/fork", operation_id="forkExperiment", status_code=HTTP_201_CREATED,
      responses=_errors(403, 404, 409, 410))
async def fork_experiment(state: State, request: Request[Principal, int, Any], experiment_id: Id,
                          data: api.ForkRequest) -> api.Forked:
    """A new experiment from this one's code context and its config merged with ``config``'s overrides (the
    experiment's owner or an admin: its code is theirs); the fork is the caller's."""
    deps = _deps(state)
    experiment = await _owned_experiment(deps, request.user, experiment_id)
    config_yaml = _merged_yaml(deps, experiment, _overrides(deps, data.config))
    config, warnings = await _parsed_config(deps, config_yaml)
    source = await _source_checkpoint(deps, request.user, config)
    digest = experiment.context_digest
    config, lineage = await data_lineage.resolve(deps, config, config_yaml, digest, source)
    deps.require_bus()
    try:
        size = await deps.s3(_context_size, digest)
    except S3Error as exc:
        if exc.code not in ("NoSuchKey", "NoSuchBucket"):
            raise
        raise ClientException(status_code=410, detail=f"the code context of experiment {experiment_id} is gone"
                              f" from the store ({exc.code}): it cannot be forked") from exc
    async with deps.db() as conn:
        new_id = await queries.next_experiment_id(conn)
    await _publish_submission(deps, _submission_event(new_id, config, config_yaml, digest, size, request.user,
                                                      paused=data.paused, source=source, forked_from=experiment_id,
                                                      lineage=lineage))
    log.info("experiment.forked", experiment_id=new_id, forked_from=experiment_id, by=request.user.username)
    return api.Forked(id=new_id, forked_from=experiment_id, warnings=warnings, context_digest=digest,
                      config_yaml=config_yaml)


def _context_size(deps: GatewayDeps, digest: str) -> int:
    return int(deps.minio.stat_object(deps.bucket, code_context.object_key(digest)).size or 0)


# -- users and tokens ------------------------------------------------------------------------------------------


class Login(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /api/v1/auth/login``."""

    username: Annotated[str, msgspec.Meta(pattern=NO_NUL)]
    password: str


class NewUser(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /api/v1/users``."""

    username: Annotated[str, msgspec.Meta(pattern=NO_NUL)]
    password: str
    admin: bool = False


class NewToken(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /api/v1/tokens``."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=NO_NUL)]
    # At most 100 years: a Postgres interval (and timestamp) overflows somewhere past 178 million years.
    expires_in_days: Annotated[float, msgspec.Meta(gt=0, le=36_500)] | None = None


async def _issue_token(conn: Any, user_id: int, name: str, kind: str, ttl_s: float | None) -> api.IssuedToken:
    """A new token: the value goes back to the caller once; only its digest is stored."""
    token = auth.new_token()
    record = await queries.create_token(conn, user_id, auth.token_digest(token), name, kind, ttl_s)
    return msgspec.convert({**record, "token": token}, api.IssuedToken)


@post("/api/v1/auth/login", operation_id="login", status_code=200, opt={auth.PUBLIC: True}, security=[{}],
      responses=_errors(401, public=True))
async def login(state: State, data: Login) -> api.LoginAnswer:
    """Sign in with username and password; returns a session token (Authorization: Bearer <token>)."""
    async with _deps(state).db() as conn:
        # A name no user can have (checked like a new one) is not looked up: no NUL byte ever reaches Postgres.
        user = await queries.user_credentials(conn, data.username) if not auth.check_username(data.username) else None
        # Verified even for an unknown name (against a dummy hash): the answer's timing does not tell names.
        ok = await asyncio.to_thread(auth.verify_password, user["password_hash"] if user else None, data.password)
        if not ok or user is None:
            log.warning("auth.login_failed", username=data.username[:64])
            raise NotAuthorizedException("wrong username or password")
        issued = await _issue_token(conn, user["id"], "login", "session", auth.SESSION_TTL_S)
    log.info("auth.login", username=user["username"], token_id=issued.id)
    return api.LoginAnswer(token=issued.token, token_id=issued.id, expires_at=issued.expires_at,
                           username=user["username"], admin=user["admin"])


@post("/api/v1/auth/logout", operation_id="logout", status_code=200, responses=_errors())
async def logout(state: State, request: Request[Principal, int, Any]) -> api.Revoked:
    """Revoke the token this request was made with."""
    async with _deps(state).db() as conn:
        await queries.revoke_token(conn, request.user.token_id)
    log.info("auth.logout", username=request.user.username, token_id=request.user.token_id)
    return api.Revoked(token_id=request.user.token_id, revoked=True)


@get("/api/v1/me", operation_id="getMe", responses=_errors())
async def me(request: Request[Principal, int, Any]) -> api.Me:
    """The signed-in user."""
    p = request.user
    return api.Me(id=p.user_id, username=p.username, admin=p.admin, token_id=p.token_id)


@post("/api/v1/users", operation_id="createUser", status_code=HTTP_201_CREATED, responses=_errors(403, 409))
async def create_user(state: State, request: Request[Principal, int, Any], data: NewUser) -> api.User:
    """Create a user (admins only)."""
    if not request.user.admin:
        raise PermissionDeniedException("only an admin may create users")
    if problem := auth.check_username(data.username) or auth.check_password(data.password):
        raise _bad_request(problem)
    password_hash = await asyncio.to_thread(auth.hash_password, data.password)  # ~50 ms of CPU: off the loop
    async with _deps(state).db() as conn:
        created = await queries.create_user(conn, data.username, password_hash, data.admin)
    if created is None:
        raise ClientException(status_code=409, detail=f"user {data.username!r} exists already")
    log.info("auth.user_created", username=data.username, admin=data.admin, by=request.user.username)
    return created


@get("/api/v1/users", operation_id="listUsers", responses=_errors())
async def list_users(state: State) -> list[api.User]:
    """Every user, with whether they are an admin."""
    async with _deps(state).db() as conn:
        return await queries.list_users(conn)


@post("/api/v1/tokens", operation_id="createToken", status_code=HTTP_201_CREATED, responses=_errors())
async def create_token(state: State, request: Request[Principal, int, Any], data: NewToken) -> api.IssuedToken:
    """Create a named API token for the signed-in user; its value is shown in this answer only."""
    if problem := text_problem(data.name):
        raise _bad_request(f"token name {problem}")
    ttl_s = data.expires_in_days * 86400 if data.expires_in_days is not None else None
    async with _deps(state).db() as conn:
        issued = await _issue_token(conn, request.user.user_id, data.name, "named", ttl_s)
    log.info("auth.token_created", username=request.user.username, token_id=issued.id, name=data.name)
    return issued


@get("/api/v1/tokens", operation_id="listTokens", responses=_errors(403))
async def list_tokens(
    state: State, request: Request[Principal, int, Any], all_users: Annotated[bool, Parameter(query="all")] = False,
) -> list[api.TokenInfo]:
    """The signed-in user's live tokens (``all=true``: every user's, admins only); never their values."""
    if all_users and not request.user.admin:
        raise PermissionDeniedException("only an admin may list every user's tokens")
    async with _deps(state).db() as conn:
        return await queries.list_tokens(conn, None if all_users else request.user.user_id)


@delete("/api/v1/tokens/{token_id:int}", operation_id="revokeToken", status_code=200, responses=_errors(404))
async def revoke_token(state: State, request: Request[Principal, int, Any], token_id: Id) -> api.Revoked:
    """Revoke a token (one's own, or any as an admin)."""
    async with _deps(state).db() as conn:
        token = await queries.get_token(conn, token_id)
        # Others' tokens are not revealed: a token one may not revoke is not found.
        found(token if token is not None and auth.may_revoke(request.user, token.user_id) else None, "token", token_id)
        await queries.revoke_token(conn, token_id)
    log.info("auth.token_revoked", token_id=token_id, by=request.user.username)
    return api.Revoked(token_id=token_id, revoked=True)


# -- TensorBoard files of a trial: readable by the experiment's owner or an admin, as its checkpoints ------------

# Files one listing names, and bytes one read returns (a client reads a bigger file in several).
MAX_TENSORBOARD_FILES = 100_000
MAX_TENSORBOARD_CHUNK = 8 << 20


async def _board_trial(deps: GatewayDeps, principal: Principal, trial_id: int) -> api.TrialDetail:
    """A trial whose TensorBoard files ``principal`` may read, or a 404 (no such trial) or 403 (not theirs)."""
    async with deps.db() as conn:
        trial = found(await queries.get_trial(conn, trial_id), "trial", trial_id)
        experiment = found(await queries.get_experiment(conn, trial.experiment_id), "trial", trial_id)
    if not auth.may_change(principal, experiment.submitted_by):
        raise PermissionDeniedException(
            f"the TensorBoard files of experiment {experiment.id} belong to {experiment.submitted_by!r}: only its"
            f" owner or an admin may read them (you are {principal.username!r})")
    return trial


@get("/api/v1/trials/{trial_id:int}/tensorboard/files", operation_id="listTrialTensorboardFiles",
     responses=_errors(403, 404))
async def trial_tensorboard_files(state: State, request: Request[Principal, int, Any],
                                  trial_id: Id) -> api.TensorboardListing:
    """The files of a trial's TensorBoard directory in the store, with their sizes (owner or admin)."""
    deps = _deps(state)
    trial = await _board_trial(deps, request.user, trial_id)
    prefix = tensorboard_prefix(trial.experiment_id, trial_id) + "/"
    files, truncated = await deps.s3(_list_board, prefix)
    return api.TensorboardListing(experiment_id=trial.experiment_id, trial_id=trial_id, files=files,
                                  truncated=truncated)


def _list_board(deps: GatewayDeps, prefix: str) -> tuple[list[api.TensorboardFile], bool]:
    files: list[api.TensorboardFile] = []
    for obj in deps.minio.list_objects(deps.bucket, prefix=prefix, recursive=True):
        if len(files) >= MAX_TENSORBOARD_FILES:
            return files, True
        files.append(api.TensorboardFile(path=obj.object_name[len(prefix):], size=int(obj.size or 0)))
    return files, False


@get("/api/v1/trials/{trial_id:int}/tensorboard/file", operation_id="downloadTrialTensorboardFile",
     responses={200: ResponseSpec(data_container=bytes, media_type="application/octet-stream",
                                  description="Bytes of the file from ``offset`` (at most ``length``; none at or past"
                                              " its end); ``X-File-Size`` is the whole file's size",
                                  generate_examples=False), **_errors(403, 404)})
async def trial_tensorboard_file(
    state: State,
    request: Request[Principal, int, Any],
    trial_id: Id,
    path: Annotated[str, Parameter(min_length=1, max_length=1024)],
    offset: Offset = 0,
    length: Annotated[int, Parameter(ge=1, le=MAX_TENSORBOARD_CHUNK)] = MAX_TENSORBOARD_CHUNK,
) -> Response[bytes]:
    """Part of one file of a trial's TensorBoard directory, from ``offset`` (owner or admin)."""
    if problem := key_refusal(path):
        raise ClientException(detail=f"query parameter 'path': {problem}",
                              extra=[api.ParamProblem(key="path", source="query", message=problem)])
    deps = _deps(state)
    trial = await _board_trial(deps, request.user, trial_id)
    key = f"{tensorboard_prefix(trial.experiment_id, trial_id)}/{path}"
    try:
        data, size = await deps.s3(_read_board, key, offset, length)
    except S3Error as exc:
        # The store refusing the name itself (too long for it, a character it does not take) means no such file.
        if exc.code not in ("NoSuchKey", "NoSuchBucket", "ResourceNotFound", "KeyTooLongError") \
                and not str(exc.code).startswith(("Invalid", "XMinioInvalid")):
            raise
        raise NotFoundException(f"trial {trial_id} has no TensorBoard file {path!r}") from exc
    return Response(data, media_type="application/octet-stream", headers={"X-File-Size": str(size)})


def _read_board(deps: GatewayDeps, key: str, offset: int, length: int) -> tuple[bytes, int]:
    size = int(deps.minio.stat_object(deps.bucket, key).size or 0)
    if offset >= size:
        return b"", size
    resp = deps.minio.get_object(deps.bucket, key, offset=offset, length=min(length, size - offset))
    try:
        return bytes(resp.read()), size
    finally:
        resp.close()
        resp.release_conn()
# -- the model registry: models and their versions (registered checkpoints) -------------------------------------
# Any signed-in user may read the registry; a model's owner (its creator) or an admin registers versions, changes
# and deletes it (``auth.may_change``, the experiments' rule). Registering needs the right to see the checkpoint
# (its experiment's owner or an admin), and a version shows the checkpoint's whole record only to those who may.
# Each command is one event; the answer waits (``projection_wait_s``) until the tracker folded it, so it shows what
# the read model shows, and a create or registration that lost a race to another is a 409, not a false success.

ModelName = Annotated[str, Parameter(min_length=1, max_length=registry.MAX_NAME + 64)]
VersionNumber = Annotated[str, Parameter(pattern=r"^[0-9]{1,10}$", description="A version number")]
VersionSelector = Annotated[str, Parameter(pattern=r"^(latest|[0-9]{1,10})$",
                                           description="A version number, or ``latest``")]
Metadata = dict[str, Any]


class NewModel(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /api/v1/models`` (Determined's ``create_model``)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=NO_NUL)]
    description: Annotated[str, msgspec.Meta(max_length=10_000, pattern=NO_NUL)] = ""
    labels: Annotated[list[Label], msgspec.Meta(max_length=100)] = []
    metadata: Metadata = {}


class NewModelVersion(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /api/v1/models/{name}/versions``: the checkpoint to register as the next version."""

    checkpoint_uuid: Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=NO_NUL)]
    name: Annotated[str, msgspec.Meta(max_length=255, pattern=NO_NUL)] = ""
    comment: Annotated[str, msgspec.Meta(max_length=10_000, pattern=NO_NUL)] = ""
    metadata: Metadata = {}


class ModelPatch(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /api/v1/models/{name}/metadata``: what to change; absent fields stay as they are."""

    description: Annotated[str, msgspec.Meta(max_length=10_000, pattern=NO_NUL)] | None = None
    add_labels: Annotated[list[Label], msgspec.Meta(max_length=100)] = []
    remove_labels: Annotated[list[Label], msgspec.Meta(max_length=100)] = []
    set_metadata: Metadata = {}  # top-level keys set (replaced)
    remove_metadata: Annotated[list[Label], msgspec.Meta(max_length=100)] = []  # top-level keys removed


def _body_problem(key: str, message: str) -> ClientException:
    """A 400 naming the body field that is wrong and why."""
    return ClientException(detail=f"{key}: {message}", extra=[api.ParamProblem(key=key, source="body",
                                                                                message=message)])


def _check_metadata(key: str, value: Any) -> None:
    if problem := registry.metadata_problem(value, key):
        raise _body_problem(key, problem)


def _may_change_model(principal: Principal, model: api.Model) -> None:
    """403 unless the principal owns the model or is an admin (``auth.may_change``)."""
    if not auth.may_change(principal, model.owner):
        raise PermissionDeniedException(
            f"model {model.name!r} belongs to {model.owner!r}: only its owner or an admin may change it"
            f" (you are {principal.username!r})")


async def _model(deps: GatewayDeps, name: str) -> api.Model:
    """A live model by name (or id), or a 404."""
    async with deps.db() as conn:
        return found(await queries.get_model(conn, name), "model", repr(name))


async def _projected(deps: GatewayDeps, seq: int) -> bool:
    """Wait until the tracker has folded the event at ``seq`` (at most ``projection_wait_s``); whether it did."""
    deadline = time.monotonic() + deps.projection_wait_s
    while True:
        async with deps.db() as conn:
            if await queries.projected_through(conn, readmodel.DOMAIN_PROJECTION, seq):
                return True
        if time.monotonic() >= deadline:
            log.warning("registry.projection_slow", seq=seq, waited_s=deps.projection_wait_s)
            return False
        await asyncio.sleep(0.05)


def _shown(principal: Principal, found_version: tuple[api.ModelVersion, str | None],
           checkpoints: dict[str, api.Checkpoint]) -> api.ModelVersion:
    """A version as this principal may see it: the checkpoint's record only for its experiment's owner or an admin."""
    version, owner = found_version
    record = checkpoints.get(version.checkpoint_uuid)
    visible = owner is not None and auth.may_change(principal, owner)
    return msgspec.structs.replace(version, checkpoint=record if visible else None)


async def _versions_shown(conn: Any, principal: Principal,
                          rows: list[tuple[api.ModelVersion, str | None]]) -> list[api.ModelVersion]:
    visible = [v.checkpoint_uuid for v, owner in rows if owner is not None and auth.may_change(principal, owner)]
    records = await queries.checkpoints_by_uuid(conn, visible) if visible else {}
    return [_shown(principal, row, records) for row in rows]


@post("/api/v1/models", operation_id="createModel", status_code=HTTP_201_CREATED, responses=_errors(409))
async def create_model(state: State, request: Request[Principal, int, Any], data: NewModel) -> api.Model:
    """Create a model in the registry (names are unique); the signed-in user owns it."""
    deps = _deps(state)
    if problem := registry.check_model_name(data.name):
        raise _body_problem("name", f"{data.name!r}: {problem}")
    _check_metadata("metadata", data.metadata)
    deps.require_bus()
    async with deps.db() as conn:
        if await queries.get_model(conn, data.name) is not None:
            raise ClientException(status_code=409, detail=f"a model named {data.name!r} exists already")
        model_id = await queries.next_model_id(conn)
    labels = ev.relabelled([], data.labels, [])
    event = ev.ModelCreated(model_id=model_id, name=data.name, description=data.description, labels=labels,
                            metadata=data.metadata, created_by=request.user.username, created_at=time.time())
    seq = await deps.publish_new(event)
    log.info("model.created", model_id=model_id, name=data.name, by=request.user.username)
    if await _projected(deps, seq):
        async with deps.db() as conn:
            model = await queries.get_model_by_id(conn, model_id)
        if model is None:  # another create of the name came first in the stream (or it is deleted already)
            raise ClientException(status_code=409, detail=f"a model named {data.name!r} was created by another"
                                  " request first, or deleted meanwhile: this one was not created")
        return model
    at = datetime.fromtimestamp(event.created_at, UTC)
    return api.Model(id=model_id, name=data.name, description=data.description, labels=labels,
                     metadata=data.metadata, owner=request.user.username, created_at=at, updated_at=at, num_versions=0,
                     last_version=0)


@get("/api/v1/models", operation_id="listModels", responses=_errors())
async def list_models(
    state: State,
    label: Annotated[list[str] | None, Parameter(query="label")] = None,
    name: Annotated[str | None, Parameter(max_length=255)] = None,
    owner: Annotated[str | None, Parameter(max_length=64)] = None,
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> list[api.Model]:
    """Models by name; ``label`` (repeatable): only those with every one; ``name``: names containing it."""
    async with _deps(state).db() as conn:
        return await queries.list_models(conn, label or [], name, owner, limit, offset)


@get("/api/v1/models/{name:str}", operation_id="getModel", responses=_errors(404))
async def get_model(state: State, name: ModelName) -> api.Model:
    """One model by name (or id): description, labels, metadata, owner, version count."""
    return await _model(_deps(state), name)


@post("/api/v1/models/{name:str}/metadata", operation_id="setModelMetadata", status_code=HTTP_202_ACCEPTED,
      responses=_errors(403, 404))
async def set_model_metadata(state: State, request: Request[Principal, int, Any], name: ModelName,
                             data: ModelPatch) -> api.Model:
    """Change a model's description, labels (added, then removed) or metadata (keys set, then removed)."""
    deps = _deps(state)
    model = await _model(deps, name)
    _may_change_model(request.user, model)
    if data.description is None and not (data.add_labels or data.remove_labels or data.set_metadata
                                         or data.remove_metadata):
        raise _bad_request("nothing to change: give description, add_labels, remove_labels, set_metadata or"
                           " remove_metadata")
    _check_metadata("set_metadata", data.set_metadata)
    seq = await deps.publish(ev.ModelMetadataChanged(
        model_id=model.id, description=data.description, labels_added=data.add_labels,
        labels_removed=data.remove_labels, metadata_set=data.set_metadata, metadata_removed=data.remove_metadata,
        requested_by=request.user.username, change_id=uuid.uuid4().hex))
    if await _projected(deps, seq):
        async with deps.db() as conn:
            now = await queries.get_model_by_id(conn, model.id)
        return found(now, "model", repr(name))  # deleted meanwhile: 404
    # What the tracker will show once it folds the event (the one rules, ``ev.relabelled``, ``ev.remetadata``).
    return msgspec.structs.replace(
        model, description=model.description if data.description is None else data.description,
        labels=ev.relabelled(model.labels, data.add_labels, data.remove_labels),
        metadata=ev.remetadata(model.metadata, data.set_metadata, data.remove_metadata))


@delete("/api/v1/models/{name:str}", operation_id="deleteModel", status_code=200, responses=_errors(403, 404))
async def delete_model(state: State, request: Request[Principal, int, Any], name: ModelName) -> api.ModelRemoved:
    """Delete a model and all its versions; their checkpoints are collectable again by their experiments' retention."""
    deps = _deps(state)
    model = await _model(deps, name)
    _may_change_model(request.user, model)
    async with deps.db() as conn:
        versions = [v.version for v, _ in await queries.model_versions(conn, model.id)]
    seq = await deps.publish(ev.ModelDeleted(model_id=model.id, name=model.name, requested_by=request.user.username))
    await _projected(deps, seq)
    log.info("model.deleted", model_id=model.id, name=model.name, by=request.user.username)
    return api.ModelRemoved(id=model.id, name=model.name, versions=versions, model_deleted=True)


@get("/api/v1/models/{name:str}/versions", operation_id="listModelVersions", responses=_errors(404))
async def list_model_versions(
    state: State, request: Request[Principal, int, Any], name: ModelName,
    order: Annotated[str, Parameter(pattern="^(asc|desc)$")] = "asc",
) -> list[api.ModelVersion]:
    """A model's versions in version order (``order=desc``: the latest first)."""
    deps = _deps(state)
    model = await _model(deps, name)
    async with deps.db() as conn:
        return await _versions_shown(conn, request.user, await queries.model_versions(conn, model.id,
                                                                                      order == "desc"))


@post("/api/v1/models/{name:str}/versions", operation_id="registerModelVersion", status_code=HTTP_201_CREATED,
      responses=_errors(403, 404, 409))
async def register_model_version(state: State, request: Request[Principal, int, Any], name: ModelName,
                                 data: NewModelVersion) -> api.ModelVersion:
    """Register a checkpoint as the model's next version; it is never collected while a version names it."""
    deps = _deps(state)
    model = await _model(deps, name)
    _may_change_model(request.user, model)
    _check_metadata("metadata", data.metadata)
    deps.require_bus()
    async with deps.db() as conn:
        checkpoint = await queries.get_checkpoint(conn, data.checkpoint_uuid)
        if checkpoint is None:
            raise NotFoundException(f"checkpoint {data.checkpoint_uuid} not found: register the uuid of a"
                                    " checkpoint a trial stored (`kiln checkpoint list EXPERIMENT_ID`)")
        record, owner = checkpoint
        _may_touch_checkpoints(request.user, record.experiment_id, owner)
        if record.state != "COMPLETED":
            raise ClientException(status_code=409, detail=f"checkpoint {record.uuid} is {record.state}"
                                  f" ({record.delete_reason or 'its files left the store'}): only a checkpoint with"
                                  " its files can be registered")
        if (taken := await queries.version_of_checkpoint(conn, model.id, record.uuid)) is not None:
            raise ClientException(status_code=409, detail=f"checkpoint {record.uuid} is version {taken} of model"
                                  f" {model.name!r} already")
    event = ev.ModelVersionRegistered(
        model_id=model.id, version=model.last_version + 1, checkpoint_uuid=record.uuid,
        experiment_id=record.experiment_id, trial_id=record.trial_id, name=data.name, comment=data.comment,
        metadata=data.metadata, registered_by=request.user.username, registered_at=time.time())
    seq = await deps.publish_new(event)  # a registration racing for the same number: the second is a 409
    log.info("model.version_registered", model_id=model.id, version=event.version, checkpoint=record.uuid,
             by=request.user.username)
    if await _projected(deps, seq):
        async with deps.db() as conn:
            now = await queries.model_version(conn, model.id, event.version)
            if now is None or now[0].checkpoint_uuid != record.uuid:
                raise ClientException(status_code=409, detail=f"model {model.name!r} was deleted, or its version"
                                      f" {event.version} taken by another registration, while this one was made:"
                                      f" checkpoint {record.uuid} is not registered")
            return (await _versions_shown(conn, request.user, [now]))[0]
    return api.ModelVersion(
        model_id=model.id, model_name=model.name, version=event.version, checkpoint_uuid=record.uuid,
        experiment_id=record.experiment_id, trial_id=record.trial_id, steps_completed=record.steps_completed,
        checkpoint_state=record.state, name=data.name, comment=data.comment, metadata=data.metadata,
        registered_by=request.user.username, registered_at=datetime.fromtimestamp(event.registered_at, UTC),
        checkpoint=record)


@get("/api/v1/models/{name:str}/versions/{version:str}", operation_id="getModelVersion", responses=_errors(404))
async def get_model_version(state: State, request: Request[Principal, int, Any], name: ModelName,
                            version: VersionSelector) -> api.ModelVersion:
    """One version of a model: a number, or ``latest``."""
    deps = _deps(state)
    model = await _model(deps, name)
    latest = version == registry.LATEST
    async with deps.db() as conn:
        row = await queries.model_version(conn, model.id, None if latest else int(version))
        if row is None:
            raise NotFoundException(f"model {model.name!r} has no versions yet" if latest
                                    else f"model {model.name!r} has no version {version}")
        return (await _versions_shown(conn, request.user, [row]))[0]


@delete("/api/v1/models/{name:str}/versions/{version:str}", operation_id="deleteModelVersion", status_code=200,
        responses=_errors(403, 404))
async def delete_model_version(state: State, request: Request[Principal, int, Any], name: ModelName,
                               version: VersionNumber) -> api.ModelRemoved:
    """Delete one version; its checkpoint is collectable again once no version names it."""
    deps = _deps(state)
    model = await _model(deps, name)
    _may_change_model(request.user, model)
    async with deps.db() as conn:
        row = found(await queries.model_version(conn, model.id, int(version)), f"model {model.name!r} version",
                    version)
    seq = await deps.publish(ev.ModelVersionDeleted(
        model_id=model.id, version=row[0].version, checkpoint_uuid=row[0].checkpoint_uuid,
        experiment_id=row[0].experiment_id, requested_by=request.user.username))
    await _projected(deps, seq)
    log.info("model.version_deleted", model_id=model.id, version=row[0].version, by=request.user.username)
    return api.ModelRemoved(id=model.id, name=model.name, versions=[row[0].version], model_deleted=False)


# -- the web UI's reads (``services/gateway/ui`` serves the pages; these feed the lists and charts) --------------

Text = Annotated[str | None, Parameter(min_length=1, max_length=255)]


@get("/api/v1/experiments/page", operation_id="listExperimentsPage", responses=_errors())
async def experiments_page(
    state: State,
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 50,
    offset: Offset = 0,
    sort: Annotated[str, Parameter(pattern="^(" + "|".join(queries.EXPERIMENT_SORTS) + ")$")] = "id",
    order: Annotated[str, Parameter(pattern="^(asc|desc)$")] = "desc",
    experiment_state: Annotated[str | None, Parameter(query="state", min_length=1, max_length=64)] = None,
    archived: bool | None = None,
    name: Text = None,
    owner: Text = None,
    label: Text = None,
    searcher: Text = None,
) -> api.ExperimentPage:
    """A page of experiments filtered (state, name contains, owner, label, searcher) and sorted in Postgres, with
    how many match in all."""
    where = queries.ExperimentFilter(state=experiment_state, archived=archived, name=name, owner=owner, label=label,
                                     searcher=searcher)
    async with _deps(state).db() as conn:
        return await queries.experiments_page(conn, where, sort, order == "desc", limit, offset)


@get("/api/v1/experiments/{experiment_id:int}/metric-names", operation_id="getExperimentMetricNames",
     responses=_errors(404))
async def experiment_metric_names(state: State, experiment_id: Id) -> list[api.ExperimentMetricName]:
    """The metrics the experiment's trials reported (training and validation), with how many trials each."""
    async with _deps(state).db() as conn:
        found(await queries.get_experiment(conn, experiment_id), "experiment", experiment_id)
        return await queries.experiment_metric_names(conn, experiment_id)


@get("/api/v1/experiments/{experiment_id:int}/series", operation_id="getExperimentSeries", responses=_errors(404))
async def experiment_series(
    state: State,
    experiment_id: Id,
    name: Annotated[str, Parameter(min_length=1, max_length=255)],
    kind: Annotated[str, Parameter(pattern="^(training|validation)$")] = "validation",
    max_points: Annotated[int, Parameter(ge=2, le=10000)] = 500,
    trial_id: Annotated[list[int] | None, Parameter(query="trial_id")] = None,
) -> api.ExperimentSeries:
    """One metric's series for every trial of the experiment (or the ``trial_id`` ones), each downsampled
    server-side to at most ~max_points keeping extremes, with each point's wall time."""
    async with _deps(state).db() as conn:
        found(await queries.get_experiment(conn, experiment_id), "experiment", experiment_id)
        ids = await queries.experiment_trial_ids(conn, experiment_id)
        if trial_id is not None:  # only the experiment's own: other ids (any int) never reach Postgres
            wanted = set(trial_id)
            ids = [i for i in ids if i in wanted]
        by_trial = await queries.series_of_trials(conn, ids, kind, name, max_points) if ids else {}
    return api.ExperimentSeries(experiment_id=experiment_id, kind=kind, name=name,  # type: ignore[arg-type]
                                max_points=max_points,
                                trials=[api.TrialSeries(trial_id=t, points=p) for t, p in by_trial.items()])


ROUTES = [
    health, master_info, create_experiment, list_experiments, get_experiment, list_trials, kill_experiment, get_trial,
    pause_experiment, activate_experiment, set_resources, kill_trial, list_agents, list_jobs,
    trial_series, trial_metric_names, experiment_events, stream_metrics,
    trial_metrics, trial_logs, trial_checkpoints, get_checkpoint, download_checkpoint,
    experiment_checkpoints, delete_checkpoint, delete_experiment, set_gc_policy, set_metadata, download_context,
    continue_experiment, fork_experiment,
    login, logout, me, create_user, list_users, create_token, list_tokens, revoke_token,
    trial_tensorboard_files, trial_tensorboard_file,
    create_model, list_models, get_model, set_model_metadata, delete_model, list_model_versions,
    register_model_version, get_model_version, delete_model_version,
    experiments_page, experiment_metric_names, experiment_series,
]
ROUTES += [experiment_lineage]
ROUTES += [checkpoint_files]


def _request_id(scope: Scope) -> str:
    state: dict[str, Any] = scope.setdefault("state", {})
    if "request_id" not in state:
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        state["request_id"] = given[:128] if given and given.isascii() and given.isprintable() else uuid.uuid4().hex
    return str(state["request_id"])


def _error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[api.ErrorBody]:
    """The one place failures become 5xx answers: an outage is 503 with Retry-After, anything else 500."""
    request_id = _request_id(request.scope)
    request.scope["state"]["error_logged"] = True
    where = {"method": request.method, "path": request.url.path, "request_id": request_id}
    if (down := outage(exc)) is not None:
        cause = exc.__cause__ if isinstance(exc, Unavailable) and exc.__cause__ is not None else exc
        log.warning("request.unavailable", down=down.down, error=repr(cause)[:500], **where)
        body = api.ErrorBody(status_code=503, status="degraded", down=down.down,  # type: ignore[arg-type]
                             detail=down.detail, request_id=request_id, extra=down.extra)
        return Response(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    log.error("request.failed", exc_info=exc, **where)
    return Response(api.ErrorBody(status_code=500, detail="internal server error", request_id=request_id),
                    status_code=500)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[api.ErrorBody]:
    """Every other error answer (401, 404, Litestar's validation errors...) in the one shape, ``api.ErrorBody``."""
    extra: list[api.ParamProblem] | api.ErrorDetails | None = None
    if exc.extra:
        try:
            extra = msgspec.convert(exc.extra, list[api.ParamProblem] | api.ErrorDetails, from_attributes=True)
        except msgspec.ValidationError as why:  # a shape not documented: the detail still says what is wrong
            log.warning("request.undocumented_extra", extra=repr(exc.extra)[:500], error=str(why))
    body = api.ErrorBody(status_code=exc.status_code, detail=exc.detail, extra=extra,
                         request_id=_request_id(request.scope))
    return Response(body, status_code=exc.status_code, headers=exc.headers)


def _request_ids(app: ASGIApp) -> ASGIApp:
    """Middleware: every answer carries ``X-Request-Id``; a 5xx the error handler did not log is logged here."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        request_id = _request_id(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                state = scope["state"]
                if message["status"] >= 500 and not state.get("error_logged"):
                    log.error("request.5xx", status=message["status"], method=scope.get("method"),
                              path=scope.get("path"), request_id=request_id)
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await app(scope, receive, send_with_id)

    return middleware


def _one_number_type(node: Any) -> None:
    """Where a union allows both ``number`` and ``integer`` (a metric value: ``float | int | ...``), keep ``number``:
    in JSON Schema every integer is a number too, so ``oneOf`` would refuse an integer for matching both."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        if isinstance(node, Schema) and node.one_of \
                and any(isinstance(o, Schema) and o.type == OpenAPIType.NUMBER for o in node.one_of):
            node.one_of = [o for o in node.one_of if not (isinstance(o, Schema) and o.type == OpenAPIType.INTEGER)]
        for field in dataclasses.fields(node):
            _one_number_type(getattr(node, field.name))
    elif isinstance(node, dict):
        for value in node.values():
            _one_number_type(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _one_number_type(value)


def create_app(deps_factory: Any, max_body_bytes: int) -> Litestar:
    """The Litestar app; ``deps_factory`` is an async context manager yielding GatewayDeps."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with deps_factory() as deps:
            app.state.deps = deps
            yield

    app = Litestar(
        route_handlers=[*ROUTES, *ui.routes({auth.PUBLIC: True})],
        lifespan=[lifespan],
        openapi_config=OpenAPIConfig(
            title="Kiln", version="0.1.0", security=[{auth.SCHEME: []}],
            render_plugins=ui.schema_plugins(),  # served from the vendored files: no CDN, works offline
            components=Components(security_schemes={auth.SCHEME: SecurityScheme(
                type="http", scheme="bearer",
                description="An API token from POST /api/v1/auth/login or POST /api/v1/tokens (`kiln user login`)")}),
        ),
        request_max_body_size=max_body_bytes,
        # Status codes win over types: a 500 HTTPException goes to _error_response, every other one to _http_error.
        exception_handlers={Unavailable: _error_response, HTTP_500_INTERNAL_SERVER_ERROR: _error_response,
                            HTTPException: _http_error},
        middleware=[_request_ids],
        guards=[auth.require_user],
        before_request=_refuse_bad_text,
        debug=False,
    )
    _one_number_type(app.openapi_schema)  # built once, here, and served as fixed
    return app
