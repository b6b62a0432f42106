"""Read-model queries the gateway serves. SQL lives here; controllers stay thin.

What a route answers with comes back as its ``schemas.api`` Struct, converted (and so checked) here: a column
whose type drifts from the documented answer fails in the query, not in a client. ``None`` means not found.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, TypeVar

import msgspec

from schemas import api
from schemas import events as ev

T = TypeVar("T")

EXPERIMENT_COLUMNS = (
    "e.id, e.name, e.description, e.labels, e.state, e.searcher_name, e.searcher_metric, e.smaller_is_better,"
    " e.submitted_by, e.submitted_at, e.ended_at, e.end_reason, e.progress, e.context_digest,"
    " e.priority, e.weight, e.max_slots, e.archived"
)
TRIAL_COLUMNS = (
    "t.id, t.experiment_id, t.request_id, t.hparams, t.seed, t.max_length, t.state, t.restarts, t.exit_code,"
    " t.end_reason, t.stop_requested, t.allocation_id, t.worker_id, t.created_at, t.started_at, t.ended_at,"
    " t.steps_completed, t.progress, t.latest_validation, t.best_metric, t.latest_checkpoint"
)


async def init_connection(conn: Any) -> None:
    """Decode jsonb columns into Python values on the gateway's connections."""
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def _rows(records: list[Any]) -> list[dict[str, Any]]:
    return [dict(r) for r in records]


def _typed(records: list[Any], kind: type[T]) -> list[T]:
    """Rows as a list of ``kind`` (checked against its field types)."""
    return msgspec.convert([dict(r) for r in records], list[kind])  # type: ignore[valid-type]


def _one(row: Any, kind: type[T]) -> T | None:
    return msgspec.convert(dict(row), kind) if row is not None else None


async def list_experiments(conn: Any, limit: int, offset: int, state: str | None,
                           archived: bool | None = None) -> list[api.ExperimentSummary]:
    """Experiments, newest first, with trial counts (``archived``: only those archived, or only those not)."""
    records = await conn.fetch(
        f"SELECT {EXPERIMENT_COLUMNS}, (SELECT count(*) FROM trials t WHERE t.experiment_id = e.id) AS num_trials"
        " FROM experiments e WHERE ($3::text IS NULL OR e.state = $3) AND ($4::boolean IS NULL OR e.archived = $4)"
        " ORDER BY e.id DESC LIMIT $1 OFFSET $2",
        limit, offset, state, archived,
    )
    return _typed(records, api.ExperimentSummary)


# The experiments page (the web UI's list): sort keys a client may ask for, mapped to SQL (never the client's
# text). The best metric is the best trial's, in the experiment's own direction.
_BEST = ("(SELECT t.best_metric FROM trials t WHERE t.experiment_id = e.id AND t.best_metric IS NOT NULL"
         " ORDER BY CASE WHEN e.smaller_is_better THEN t.best_metric ELSE -t.best_metric END LIMIT 1)")
EXPERIMENT_SORTS = {
    "id": "e.id", "name": "lower(e.name)", "state": "e.state", "searcher": "e.searcher_name",
    "progress": "e.progress", "owner": "e.submitted_by", "submitted_at": "e.submitted_at",
    "ended_at": "e.ended_at", "num_trials": "(SELECT count(*) FROM trials t WHERE t.experiment_id = e.id)",
    "best_metric": _BEST,
}


class ExperimentFilter(msgspec.Struct, frozen=True, kw_only=True):
    """What the experiments page shows: each field narrows the list (None: no condition)."""

    state: str | None = None
    archived: bool | None = None
    name: str | None = None  # contained in the name, ignoring case
    owner: str | None = None
    label: str | None = None
    searcher: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition (parameters from $1) and its arguments."""
        args: list[Any] = []
        conds = []
        for column, value in (("e.state = {}", self.state), ("e.archived = {}", self.archived),
                              ("strpos(lower(e.name), lower({})) > 0", self.name),
                              ("e.submitted_by = {}", self.owner),
                              ("e.labels @> jsonb_build_array({}::text)", self.label),
                              ("e.searcher_name = {}", self.searcher)):
            if value is not None:
                args.append(value)
                conds.append(column.format(f"${len(args)}"))
        return (" AND ".join(conds) or "true"), args


async def experiments_page(conn: Any, where: ExperimentFilter, sort: str, descending: bool, limit: int,
                           offset: int) -> api.ExperimentPage:
    """A page of experiments, filtered and sorted in Postgres, with the number that match.

    The page's ids are chosen first from the experiments table alone (and the sort key); trial counts and best
    trials are looked up for those rows only, so a page costs the same with ten or ten thousand experiments.
    """
    cond, args = where.where()
    n = len(args)
    direction = "DESC" if descending else "ASC"
    order = f"{EXPERIMENT_SORTS[sort]} {direction} NULLS LAST, e.id {direction}"
    total = await conn.fetchval(f"SELECT count(*) FROM experiments e WHERE {cond}", *args)
    records = await conn.fetch(
        f"WITH page AS (SELECT e.id FROM experiments e WHERE {cond} ORDER BY {order} LIMIT ${n + 1} OFFSET ${n + 2})"
        f" SELECT {EXPERIMENT_COLUMNS},"
        " (SELECT count(*) FROM trials t WHERE t.experiment_id = e.id) AS num_trials, b.id AS best_id,"
        " b.best_metric AS best_value"
        " FROM page JOIN experiments e ON e.id = page.id"
        " LEFT JOIN LATERAL (SELECT t.id, t.best_metric FROM trials t WHERE t.experiment_id = e.id"
        "   AND t.best_metric IS NOT NULL"
        "   ORDER BY CASE WHEN e.smaller_is_better THEN t.best_metric ELSE -t.best_metric END LIMIT 1) b ON true"
        f" ORDER BY {order}",  # the same order over the same rows (ties go by id): the page as chosen
        *args, limit, offset)
    rows = []
    for r in records:
        row = dict(r)
        best_id, best_value = row.pop("best_id"), row.pop("best_value")
        row["best_trial"] = {"id": best_id, "best_metric": best_value} if best_id is not None else None
        rows.append(row)
    return api.ExperimentPage(total=total, offset=offset, limit=limit,
                              experiments=msgspec.convert(rows, list[api.ExperimentSummary]))


async def get_experiment(conn: Any, experiment_id: int) -> api.Experiment | None:
    """One experiment with its config and a per-state trial count."""
    row = await conn.fetchrow(f"SELECT {EXPERIMENT_COLUMNS}, e.config, e.config_yaml, e.seed, e.lineage"
                              " FROM experiments e WHERE e.id = $1", experiment_id)
    if row is None:
        return None
    out = dict(row)
    out["lineage"] = experiment_lineage(experiment_id, out.pop("lineage"), row["config_yaml"], row["context_digest"])
    counts = await conn.fetch("SELECT state, count(*) AS n FROM trials WHERE experiment_id = $1 GROUP BY state",
                              experiment_id)
    out["trial_states"] = {r["state"]: r["n"] for r in counts}
    best = await conn.fetchrow(
        "SELECT id, best_metric FROM trials WHERE experiment_id = $1 AND best_metric IS NOT NULL"
        " ORDER BY CASE WHEN $2 THEN best_metric ELSE -best_metric END LIMIT 1",
        experiment_id, row["smaller_is_better"],
    )
    out["best_trial"] = dict(best) if best else None
    return msgspec.convert(out, api.Experiment)


# Sort keys a client may ask for, mapped to SQL (never interpolate the client's text).
TRIAL_SORTS = {"id": "t.id", "best_metric": "t.best_metric", "steps_completed": "t.steps_completed",
               "state": "t.state", "restarts": "t.restarts"}


async def list_trials(conn: Any, experiment_id: int, limit: int, offset: int, sort: str = "id",
                      descending: bool = False) -> list[api.Trial]:
    """An experiment's trials, sorted (nulls last) and paged; served from the trials table alone."""
    order = f"{TRIAL_SORTS[sort]} {'DESC' if descending else 'ASC'} NULLS LAST, t.id"
    records = await conn.fetch(f"SELECT {TRIAL_COLUMNS} FROM trials t WHERE t.experiment_id = $1"
                               f" ORDER BY {order} LIMIT $2 OFFSET $3", experiment_id, limit, offset)
    return _typed(records, api.Trial)


async def metric_names(conn: Any, trial_id: int) -> list[api.MetricName]:
    """The metrics a trial reported, with last/min/max (from the summaries, not the points)."""
    records = await conn.fetch("SELECT kind, name, last_step, last_value, min_value, max_value"
                               " FROM metric_summaries WHERE trial_id = $1 ORDER BY kind, name", trial_id)
    return _typed(records, api.MetricName)


async def series(conn: Any, trial_id: int, kind: str, name: str, max_points: int) -> list[api.SeriesPoint]:
    """One metric's series of one trial, downsampled in Postgres (``series_of_trials``)."""
    return (await series_of_trials(conn, [trial_id], kind, name, max_points)).get(trial_id, [])


async def series_of_trials(conn: Any, trial_ids: list[int], kind: str, name: str,
                           max_points: int) -> dict[int, list[api.SeriesPoint]]:
    """One metric's series of each trial (those without a point are left out), each downsampled in Postgres to
    about ``max_points`` points that keep extremes.

    A trial's steps are cut into ``max_points / 2`` equal buckets; each bucket keeps its minimum and its
    maximum (a spike or a NaN never disappears from a chart). Short series come back whole.
    """
    buckets = max(max_points // 2, 1)
    records = await conn.fetch(
        # One hash aggregate per (trial, bucket): min(ARRAY[value, step, time]) is the bucket's lowest value
        # with its earliest step, max(ARRAY[value, -step, time]) its highest (NaN sorts highest). The ranges are
        # MATERIALIZED so they are computed once, not per row. (benchmarks/ingest: p95 169 -> 94 ms at 100k.)
        "WITH s AS MATERIALIZED (SELECT trial_id, count(*) AS n, min(step) AS lo, max(step) AS hi"
        "           FROM metric_points WHERE trial_id = ANY($1::bigint[]) AND kind = $2 AND name = $3"
        "           AND value IS NOT NULL GROUP BY trial_id),"
        " b AS (SELECT p.trial_id, CASE WHEN s.n <= $4 THEN p.step"
        "                   ELSE ((p.step - s.lo) * $5) / GREATEST(s.hi - s.lo + 1, 1) END AS bucket,"
        "              min(ARRAY[p.value, p.step::float8, extract(epoch FROM p.reported_at)::float8]) AS lo,"
        "              max(ARRAY[p.value, -p.step::float8, extract(epoch FROM p.reported_at)::float8]) AS hi"
        "       FROM metric_points p JOIN s ON s.trial_id = p.trial_id WHERE p.trial_id = ANY($1::bigint[])"
        "       AND p.kind = $2 AND p.name = $3 AND p.value IS NOT NULL GROUP BY 1, 2)"
        " SELECT trial_id, lo[2]::bigint AS step, lo[1] AS value, lo[3] AS wall_time FROM b"
        " UNION SELECT trial_id, (-hi[2])::bigint, hi[1], hi[3] FROM b"
        " ORDER BY trial_id, step",
        trial_ids, kind, name, max_points, buckets,
    )
    out: dict[int, list[api.SeriesPoint]] = {}
    for r in records:
        out.setdefault(r["trial_id"], []).append(
            api.SeriesPoint(step=r["step"], value=r["value"], wall_time=r["wall_time"]))
    return out


async def experiment_trial_ids(conn: Any, experiment_id: int) -> list[int]:
    """The ids of an experiment's trials, in order."""
    return [r["id"] for r in await conn.fetch("SELECT id FROM trials WHERE experiment_id = $1 ORDER BY id",
                                              experiment_id)]


async def experiment_metric_names(conn: Any, experiment_id: int) -> list[api.ExperimentMetricName]:
    """The metrics any trial of an experiment reported, with how many trials reported each."""
    records = await conn.fetch(
        "SELECT m.kind, m.name, count(*) AS trials FROM metric_summaries m JOIN trials t ON t.id = m.trial_id"
        " WHERE t.experiment_id = $1 GROUP BY m.kind, m.name ORDER BY m.kind, m.name", experiment_id)
    return _typed(records, api.ExperimentMetricName)


async def get_trial(conn: Any, trial_id: int) -> api.TrialDetail | None:
    """One trial with its allocations (restarts are visible there)."""
    row = await conn.fetchrow(f"SELECT {TRIAL_COLUMNS} FROM trials t WHERE t.id = $1", trial_id)
    if row is None:
        return None
    out = dict(row)
    allocations = await conn.fetch(
        "SELECT id, worker_id, slot_ids, nodes, restarts, assigned_at, started_at, ended_at, exit_code, end_reason"
        " FROM allocations WHERE trial_id = $1 ORDER BY assigned_at", trial_id)
    out["allocations"] = _rows(allocations)
    return msgspec.convert(out, api.TrialDetail)


async def trial_metrics(conn: Any, trial_id: int, kind: str | None, limit: int,
                        offset: int) -> list[api.MetricsAtStep]:
    """A trial's metric points in step order."""
    records = await conn.fetch(
        "SELECT kind, step AS steps_completed,"
        " jsonb_object_agg(name, COALESCE(to_jsonb(value), to_jsonb(text_value))) AS metrics,"
        " max(reported_at) AS reported_at FROM metric_points WHERE trial_id = $1"
        " AND ($2::text IS NULL OR kind = $2) GROUP BY kind, step ORDER BY kind, step LIMIT $3 OFFSET $4",
        trial_id, kind, limit, offset,
    )
    return _typed(records, api.MetricsAtStep)


async def trial_logs(conn: Any, trial_id: int, limit: int, offset: int, tail: bool,
                     since: datetime | None = None) -> list[api.LogLine]:
    """A trial's log lines across its allocations, in time order (``tail``: the last ``limit``; ``since``: those
    written at or after it)."""
    order = "DESC" if tail else "ASC"
    records = await conn.fetch(
        "SELECT allocation_id, line_no, stream, ts, text FROM trial_logs WHERE trial_id = $1"
        " AND ($4::timestamptz IS NULL OR ts >= $4)"
        f" ORDER BY ts {order}, allocation_id {order}, line_no {order} LIMIT $2 OFFSET $3",
        trial_id, limit, offset, since,
    )
    rows = _typed(records, api.LogLine)
    return rows[::-1] if tail else rows


# A checkpoint with its state and the searcher metric of the validation at its step (if there was one).
_CHECKPOINT_SELECT = (
    "SELECT c.uuid, c.trial_id, c.experiment_id, c.steps_completed, c.storage, c.resources, c.metadata,"
    " c.reported_at, c.state, c.deleted_at, c.delete_reason, c.protected, e.searcher_metric, p.value AS metric,"
    " e.submitted_by AS experiment_owner"
    " FROM checkpoints c JOIN experiments e ON e.id = c.experiment_id"
    " LEFT JOIN metric_points p ON p.trial_id = c.trial_id AND p.kind = 'validation'"
    " AND p.name = e.searcher_metric AND p.step = c.steps_completed"
)
# Sort keys a client may ask for (never interpolate the client's text). "metric": best first, by the
# experiment's smaller_is_better; checkpoints without a metric last.
CHECKPOINT_SORTS = {
    "trial": "c.trial_id, c.steps_completed",
    "steps_completed": "c.steps_completed, c.trial_id",
    "reported_at": "c.reported_at, c.uuid",
    "metric": "CASE WHEN e.smaller_is_better THEN p.value ELSE -p.value END NULLS LAST, c.steps_completed DESC",
}


async def trial_checkpoints(conn: Any, trial_id: int) -> list[api.Checkpoint]:
    """A trial's checkpoints in step order."""
    records = await conn.fetch(f"{_CHECKPOINT_SELECT} WHERE c.trial_id = $1 ORDER BY c.steps_completed, c.uuid",
                               trial_id)
    return _typed(records, api.Checkpoint)


async def experiment_checkpoints(conn: Any, experiment_id: int, sort: str, state: str | None, limit: int,
                                 offset: int) -> list[api.Checkpoint]:
    """An experiment's checkpoints (of one state, or all), sorted and paged."""
    records = await conn.fetch(
        f"{_CHECKPOINT_SELECT} WHERE c.experiment_id = $1 AND ($2::text IS NULL OR c.state = $2)"
        f" ORDER BY {CHECKPOINT_SORTS[sort]}, c.uuid LIMIT $3 OFFSET $4", experiment_id, state, limit, offset)
    return _typed(records, api.Checkpoint)


async def deleted_experiment(conn: Any, experiment_id: int) -> tuple[Any, str] | None:
    """When and by whom an experiment was deleted; None when it was not."""
    row = await conn.fetchrow("SELECT deleted_at, deleted_by FROM deleted_experiments WHERE id = $1", experiment_id)
    return (row["deleted_at"], row["deleted_by"]) if row is not None else None


async def get_checkpoint(conn: Any, uuid: str) -> tuple[api.Checkpoint, str] | None:
    """One checkpoint's record and who owns its experiment."""
    row = await conn.fetchrow(f"{_CHECKPOINT_SELECT} WHERE c.uuid = $1", uuid)
    return (msgspec.convert(dict(row), api.Checkpoint), row["experiment_owner"]) if row is not None else None


async def next_experiment_id(conn: Any) -> int:
    """A fresh experiment id: never reused (even after a failed submit) and, unlike a sequence, without a
    jump after a database crash (the counter row is committed with the increment)."""
    value: int = await conn.fetchval(
        "UPDATE id_counters SET value = value + 1 WHERE name = 'experiment' RETURNING value")
    return value


# -- the model registry ---------------------------------------------------------------------------------------

MODEL_COLUMNS = ("m.id, m.name, m.description, m.labels, m.metadata, m.owner, m.created_at, m.updated_at,"
                 " m.last_version, (SELECT count(*) FROM model_versions v WHERE v.model_id = m.id) AS num_versions")
_VERSION_SELECT = (
    "SELECT v.model_id, m.name AS model_name, v.version, v.checkpoint_uuid, v.experiment_id, v.trial_id,"
    " c.steps_completed, c.state AS checkpoint_state, v.name, v.comment, v.metadata, v.registered_by,"
    " v.registered_at, e.submitted_by AS experiment_owner"
    " FROM model_versions v JOIN models m ON m.id = v.model_id"
    " LEFT JOIN checkpoints c ON c.uuid = v.checkpoint_uuid LEFT JOIN experiments e ON e.id = v.experiment_id"
)


async def next_model_id(conn: Any) -> int:
    """A fresh model id (never reused), as experiment ids are taken."""
    value: int = await conn.fetchval("UPDATE id_counters SET value = value + 1 WHERE name = 'model' RETURNING value")
    return value


async def get_model(conn: Any, name: str) -> api.Model | None:
    """A live model by its name, or (a name of digits only) by its id."""
    if name.isascii() and name.isdigit():
        row = await conn.fetchrow(f"SELECT {MODEL_COLUMNS} FROM models m WHERE m.id = $1", int(name)) \
            if int(name) < 2**63 else None
    else:
        row = await conn.fetchrow(f"SELECT {MODEL_COLUMNS} FROM models m WHERE m.name = $1", name)
    return _one(row, api.Model)


async def get_model_by_id(conn: Any, model_id: int) -> api.Model | None:
    """A live model by its id."""
    return _one(await conn.fetchrow(f"SELECT {MODEL_COLUMNS} FROM models m WHERE m.id = $1", model_id), api.Model)


async def list_models(conn: Any, labels: list[str], name: str | None, owner: str | None, limit: int,
                      offset: int) -> list[api.Model]:
    """Models by name; only those carrying every one of ``labels``, whose name contains ``name`` (any case), of
    ``owner``."""
    records = await conn.fetch(
        f"SELECT {MODEL_COLUMNS} FROM models m WHERE m.labels @> $1::jsonb"
        " AND ($2::text IS NULL OR strpos(lower(m.name), lower($2)) > 0) AND ($3::text IS NULL OR m.owner = $3)"
        " ORDER BY m.name LIMIT $4 OFFSET $5", labels, name, owner, limit, offset)
    return _typed(records, api.Model)


def _version(row: Any) -> tuple[api.ModelVersion, str | None]:
    out = dict(row)
    owner = out.pop("experiment_owner")
    return msgspec.convert(out, api.ModelVersion), owner


async def model_versions(conn: Any, model_id: int, descending: bool = False) -> list[tuple[api.ModelVersion,
                                                                                           str | None]]:
    """A model's versions in version order, each with the owner of its checkpoint's experiment."""
    records = await conn.fetch(f"{_VERSION_SELECT} WHERE v.model_id = $1 ORDER BY v.version"
                               f" {'DESC' if descending else 'ASC'}", model_id)
    return [_version(r) for r in records]


async def model_version(conn: Any, model_id: int, version: int | None) -> tuple[api.ModelVersion, str | None] | None:
    """One version of a model (None: the latest), with the owner of its checkpoint's experiment."""
    if version is None:
        row = await conn.fetchrow(f"{_VERSION_SELECT} WHERE v.model_id = $1 ORDER BY v.version DESC LIMIT 1",
                                  model_id)
    else:
        row = await conn.fetchrow(f"{_VERSION_SELECT} WHERE v.model_id = $1 AND v.version = $2", model_id, version)
    return _version(row) if row is not None else None


async def version_of_checkpoint(conn: Any, model_id: int, uuid: str) -> int | None:
    """The version of a model that names this checkpoint, if one does."""
    value: int | None = await conn.fetchval(
        "SELECT min(version) FROM model_versions WHERE model_id = $1 AND checkpoint_uuid = $2", model_id, uuid)
    return value


async def checkpoints_by_uuid(conn: Any, uuids: list[str]) -> dict[str, api.Checkpoint]:
    """Checkpoint records by uuid (those the read model has)."""
    records = await conn.fetch(f"{_CHECKPOINT_SELECT} WHERE c.uuid = ANY($1::text[])", uuids)
    return {r["uuid"]: msgspec.convert(dict(r), api.Checkpoint) for r in records}


async def registered_checkpoints(conn: Any, uuids: list[str]) -> set[str]:
    """Which of these checkpoints a model version names (those retention must never collect)."""
    records = await conn.fetch("SELECT DISTINCT checkpoint_uuid FROM model_versions"
                               " WHERE checkpoint_uuid = ANY($1::text[])", uuids)
    return {r["checkpoint_uuid"] for r in records}


async def projected_through(conn: Any, consumer: str, seq: int) -> bool:
    """Whether the projection ``consumer`` has folded the stream up to ``seq``."""
    last = await conn.fetchval("SELECT last_seq FROM projection_positions WHERE consumer = $1", consumer)
    return last is not None and last >= seq


# -- users and tokens (gateway-owned tables, not projections; see services/gateway/auth.py) -------------------

USER_COLUMNS = "u.id, u.username, u.admin, u.created_at"
TOKEN_COLUMNS = "t.id, t.user_id, u.username, t.name, t.kind, t.created_at, t.expires_at, t.revoked_at"


async def principal_for_token(conn: Any, digest: str) -> dict[str, Any] | None:
    """The user a live (unrevoked, unexpired) token belongs to, by the token's digest."""
    row = await conn.fetchrow(
        "SELECT u.id AS user_id, u.username, u.admin, t.id AS token_id FROM api_tokens t"
        " JOIN users u ON u.id = t.user_id WHERE t.token_sha256 = $1 AND t.revoked_at IS NULL"
        " AND (t.expires_at IS NULL OR t.expires_at > now()) AND u.active", digest)
    return dict(row) if row else None


async def user_credentials(conn: Any, username: str) -> dict[str, Any] | None:
    """An active user's id, admin flag and password hash, for a login."""
    row = await conn.fetchrow("SELECT id, username, admin, password_hash FROM users WHERE username = $1 AND active",
                              username)
    return dict(row) if row else None


async def create_user(conn: Any, username: str, password_hash: str, admin: bool) -> api.User | None:
    """A new user; None when the name is taken."""
    row = await conn.fetchrow(
        "INSERT INTO users (username, password_hash, admin) VALUES ($1, $2, $3)"
        " ON CONFLICT (username) DO NOTHING RETURNING id, username, admin, created_at", username, password_hash, admin)
    return _one(row, api.User)


async def create_first_admin(conn: Any, password_hash: str) -> bool:
    """Create ``admin`` when there is no user at all; whether it was created now (idempotent, race-free)."""
    created = await conn.fetchval(
        "INSERT INTO users (username, password_hash, admin) SELECT 'admin', $1, true"
        " WHERE NOT EXISTS (SELECT 1 FROM users) ON CONFLICT (username) DO NOTHING RETURNING id", password_hash)
    return created is not None


async def list_users(conn: Any) -> list[api.User]:
    """Every active user, by id."""
    return _typed(await conn.fetch(f"SELECT {USER_COLUMNS} FROM users u WHERE u.active ORDER BY u.id"), api.User)


async def create_token(conn: Any, user_id: int, digest: str, name: str, kind: str,
                       ttl_s: float | None) -> dict[str, Any]:
    """Record a token by its digest (the value itself is never stored)."""
    row = await conn.fetchrow(
        "INSERT INTO api_tokens (user_id, token_sha256, name, kind, expires_at)"
        " VALUES ($1, $2, $3, $4, CASE WHEN $5::float8 IS NULL THEN NULL"
        "         ELSE now() + make_interval(secs => $5::float8) END)"
        " RETURNING id, name, kind, created_at, expires_at", user_id, digest, name, kind, ttl_s)
    return dict(row)


async def list_tokens(conn: Any, user_id: int | None) -> list[api.TokenInfo]:
    """Live tokens of one user (every user's when ``user_id`` is None), by id; never their values."""
    return _typed(await conn.fetch(
        f"SELECT {TOKEN_COLUMNS} FROM api_tokens t JOIN users u ON u.id = t.user_id"
        " WHERE ($1::bigint IS NULL OR t.user_id = $1) AND t.revoked_at IS NULL"
        " AND (t.expires_at IS NULL OR t.expires_at > now()) ORDER BY t.id", user_id), api.TokenInfo)


async def get_token(conn: Any, token_id: int) -> api.TokenInfo | None:
    """One token's record (not its value)."""
    row = await conn.fetchrow(f"SELECT {TOKEN_COLUMNS} FROM api_tokens t JOIN users u ON u.id = t.user_id"
                              " WHERE t.id = $1", token_id)
    return _one(row, api.TokenInfo)


async def revoke_token(conn: Any, token_id: int) -> None:
    """Revoke a token from now on (kept, with the time, for the record)."""
    await conn.execute("UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", token_id)


# -- lineage -----------------------------------------------------------------------------------------------------


def experiment_lineage(experiment_id: int, recorded: dict[str, Any] | None, config_yaml: str,
                       context_digest: str) -> api.ExperimentLineage:
    """What the API shows: the lineage recorded at submission, or (experiments submitted before lineage was
    recorded) the digests, derived from what the read model holds."""
    if recorded is not None:
        lineage = msgspec.convert(recorded, ev.Lineage)
    else:
        lineage = ev.Lineage(config_digest=ev.config_digest(config_yaml), code_digest=context_digest)
    return api.ExperimentLineage(experiment_id=experiment_id, config_digest=lineage.config_digest,
                                 code_digest=lineage.code_digest, data=lineage.data, parent=lineage.parent,
                                 recorded=recorded is not None)


# -- continue and fine-tune ----------------------------------------------------------------------------------


async def latest_trial_checkpoint(conn: Any, trial_id: int) -> tuple[api.Checkpoint, str] | None:
    """A trial's latest checkpoint whose files are still there (most steps, then newest) and who owns its
    experiment: what ``searcher.source_trial_id`` starts from, as Determined's latest checkpoint of a trial."""
    row = await conn.fetchrow(f"{_CHECKPOINT_SELECT} WHERE c.trial_id = $1 AND c.state = 'COMPLETED'"
                              " ORDER BY c.steps_completed DESC, c.reported_at DESC LIMIT 1", trial_id)
    return (msgspec.convert(dict(row), api.Checkpoint), row["experiment_owner"]) if row is not None else None


async def deleted_checkpoints(conn: Any, uuids: list[str]) -> set[str]:
    """Which of these checkpoints were deleted (their files left the store)."""
    records = await conn.fetch("SELECT uuid FROM checkpoints WHERE uuid = ANY($1::text[]) AND state = 'DELETED'",
                               uuids)
    return {r["uuid"] for r in records}
