"""The Kiln SDK: a thin HTTP client for the gateway (``KILN_MASTER``).

Authentication as Determined's ``det`` does it: ``kiln user login`` stores a token per master URL and user in
``~/.kiln/auth.json`` (mode 0600; ``KILN_AUTH_DIR`` moves it); ``KILN_TOKEN`` overrides what is stored.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln._lazy import LazyModule
from schemas import context as code_context
from schemas import ports
from schemas.checkpoint import CheckpointFile, CorruptCheckpoint, mismatch

if TYPE_CHECKING:
    import httpx
else:
    httpx = LazyModule("httpx")  # imported on the first request: the CLI's --help never pays for it

DEFAULT_MASTER = ports.MASTER_URL
TERMINAL_STATES = {"COMPLETED", "ERROR", "CANCELED"}


class APIError(Exception):
    """The gateway refused a request; ``errors`` lists field-level problems when there are any."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, str]] | None = None,
                 request_id: str | None = None) -> None:
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.request_id = request_id
        where = f", request id {request_id}" if request_id and status >= 500 else ""
        lines = [f"{detail} (HTTP {status}{where})"]
        lines += [f"  {e.get('path', '?')}: {e.get('message', '')}" for e in self.errors]
        super().__init__("\n".join(lines))


def field_errors(extra: Any) -> list[dict[str, str]]:
    """Field-level problems from an error body's ``extra`` (``schemas.api.ErrorBody``), in either of its shapes:
    the config's ``{"errors": [{"path", "message"}]}`` or the parameters' list ``[{"key", "message"}]``."""
    if isinstance(extra, dict):
        extra = extra.get("errors") or []
    if not isinstance(extra, list):
        return []
    return [{"path": str(e.get("path", e.get("key", "?"))), "message": str(e.get("message", ""))}
            for e in extra if isinstance(e, dict)]


def api_error(resp: httpx.Response) -> APIError:
    """The error an answer of 400 or more stands for. Its body is ``schemas.api.ErrorBody``; anything else (a
    proxy's HTML page, a truncated body) still gives a readable error, never a traceback."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = " ".join(resp.text.split())[:300]
        body = {"detail": text or resp.reason_phrase}
    detail = str(body.get("detail") or resp.reason_phrase)
    if resp.status_code == 401:
        return NotLoggedIn(detail)
    request_id = body.get("request_id") or resp.headers.get("x-request-id")
    return APIError(resp.status_code, detail, field_errors(body.get("extra")),
                    str(request_id) if request_id else None)


class NotLoggedIn(APIError):
    """The gateway answered 401: no token, or one that is unknown, expired or revoked."""

    def __init__(self, detail: str) -> None:
        super().__init__(401, detail)

    def __str__(self) -> str:
        return "not logged in: run kiln user login"


class Unreachable(APIError):
    """No answer at all: the master refused the connection, timed out, or its name did not resolve."""

    def __init__(self, master: str, exc: Exception) -> None:
        super().__init__(0, f"cannot reach the Kiln master at {master}: {_transport_reason(exc)}")

    def __str__(self) -> str:
        return f"{self.detail} (is the stack up? `kiln up`)"


def _transport_reason(exc: Exception) -> str:
    """``connection refused``, ``timed out`` or the library's own words, without errno noise."""
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return text.split("] ", 1)[-1]


def auth_file() -> Path:
    """Where the CLI keeps its tokens: ``$KILN_AUTH_DIR/auth.json``, else ``~/.kiln/auth.json``."""
    return Path(os.environ.get("KILN_AUTH_DIR") or Path.home() / ".kiln") / "auth.json"


def _read_auth() -> dict[str, Any]:
    try:
        data = json.loads(auth_file().read_text())
    except (FileNotFoundError, ValueError):
        return {"version": 1, "masters": {}}
    data.setdefault("masters", {})
    return data  # type: ignore[no-any-return]


def _write_auth(data: dict[str, Any]) -> None:
    """Replace the auth file atomically; it and its directory are readable by this user only."""
    path = auth_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".auth.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.chmod(tmp, 0o600)  # an umask never widens it, but an older file of the same name may have been wider
    os.replace(tmp, path)


def stored_token(master: str) -> tuple[str, str] | None:
    """(user, token) of the active user stored for ``master``, if any."""
    entry = _read_auth()["masters"].get(master.rstrip("/"), {})
    user = entry.get("active_user")
    token = entry.get("tokens", {}).get(user) if user else None
    return (user, token) if user and token else None


def store_token(master: str, user: str, token: str) -> None:
    """Remember ``user``'s token for ``master`` and make that user the active one there."""
    data = _read_auth()
    entry = data["masters"].setdefault(master.rstrip("/"), {"tokens": {}})
    entry.setdefault("tokens", {})[user] = token
    entry["active_user"] = user
    _write_auth(data)


def forget_token(master: str, user: str) -> None:
    """Drop ``user``'s token for ``master`` (after a logout)."""
    data = _read_auth()
    entry = data["masters"].get(master.rstrip("/"))
    if not entry:
        return
    entry.get("tokens", {}).pop(user, None)
    if entry.get("active_user") == user:
        entry.pop("active_user")
    _write_auth(data)


def master_url() -> str:
    """The gateway address: ``KILN_MASTER``, else the local stack's default."""
    return os.environ.get("KILN_MASTER", DEFAULT_MASTER).rstrip("/")


class Client:
    """Calls the gateway's REST API; every method returns decoded JSON."""

    def __init__(self, master: str | None = None, timeout: float = 60.0, token: str | None = None) -> None:
        """``token``: the API token to send; else ``KILN_TOKEN``, else the one ``kiln user login`` stored."""
        self.master = (master or master_url()).rstrip("/")
        if token is None:
            token = os.environ.get("KILN_TOKEN") or None
        if token is None and (stored := stored_token(self.master)) is not None:
            token = stored[1]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.master, timeout=timeout, headers=headers)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _check(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            raise api_error(resp)
        try:
            return resp.json()
        except ValueError:
            raise APIError(resp.status_code, f"the answer from {self.master} is not JSON:"
                           f" {' '.join(resp.text.split())[:200]!r}") from None

    def _get(self, path: str, **params: Any) -> Any:
        try:
            resp = self._http.get(path, params={k: v for k, v in params.items() if v is not None})
        except httpx.TransportError as exc:
            raise Unreachable(self.master, exc) from exc
        return self._check(resp)

    def health(self) -> dict[str, Any]:
        """The gateway's health answer."""
        return self._get("/health")  # type: ignore[no-any-return]

    def master_info(self) -> dict[str, Any]:
        """What the master is: ``{version}`` (public)."""
        return self._get("/api/v1/info")  # type: ignore[no-any-return]

    def create_experiment(self, config_yaml: str, context_dir: Path, paused: bool = False) -> dict[str, Any]:
        """Pack ``context_dir`` and submit it with the config; returns ``{id, warnings}``. ``paused``: nothing of it
        starts until it is activated."""
        blob = code_context.pack(context_dir)
        files = {"context": ("context.tar.gz", blob, "application/gzip")}
        data = {"config": config_yaml}  # the owner is whoever the token belongs to
        if paused:
            data["paused"] = "true"
        try:
            resp = self._http.post("/api/v1/experiments", data=data, files=files)
        except httpx.TransportError as exc:
            raise Unreachable(self.master, exc) from exc
        return self._check(resp)  # type: ignore[no-any-return]

    def list_experiments(self, limit: int = 100, state: str | None = None,
                         archived: bool | None = None) -> list[dict[str, Any]]:
        """Experiments, newest first (``archived=False``: without the archived ones)."""
        return self._get("/api/v1/experiments", limit=limit, state=state,  # type: ignore[no-any-return]
                         archived=None if archived is None else str(archived).lower())

    def get_experiment(self, experiment_id: int) -> dict[str, Any]:
        """One experiment."""
        return self._get(f"/api/v1/experiments/{experiment_id}")  # type: ignore[no-any-return]

    def list_trials(self, experiment_id: int) -> list[dict[str, Any]]:
        """An experiment's trials."""
        return self._get(f"/api/v1/experiments/{experiment_id}/trials")  # type: ignore[no-any-return]

    def stream_experiment(self, experiment_id: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """The experiment's live Server-Sent Events as ``(event, data)``: ``training``, ``validation``, ``trial``,
        ``progress`` and, last, ``end`` (``schemas.api.Live*``). Keep-alive comments are skipped."""
        path = f"/api/v1/experiments/{experiment_id}/metrics/stream"
        try:
            with self._http.stream("GET", path, timeout=httpx.Timeout(60.0)) as resp:  # keep-alive every 15 s
                if resp.status_code >= 400:
                    resp.read()
                    raise api_error(resp)
                event, data = "message", list[str]()
                for line in resp.iter_lines():
                    if not line:  # a blank line ends a message
                        # A keep-alive comment comes with an empty data line (Litestar's encoding): no message.
                        if "".join(data).strip():
                            yield event, json.loads("\n".join(data))
                        event, data = "message", []
                    elif line.startswith("event:"):
                        event = line[len("event:"):].strip()
                    elif line.startswith("data:"):
                        data.append(line[len("data:"):].removeprefix(" "))
        except httpx.TransportError as exc:
            raise Unreachable(self.master, exc) from exc

    def _post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            resp = self._http.post(path, json=body) if body is not None else self._http.post(path)
        except httpx.TransportError as exc:
            raise Unreachable(self.master, exc) from exc
        return self._check(resp)

    def _delete(self, path: str) -> Any:
        try:
            resp = self._http.delete(path)
        except httpx.TransportError as exc:
            raise Unreachable(self.master, exc) from exc
        return self._check(resp)

    def login(self, username: str, password: str) -> dict[str, Any]:
        """Sign in; returns ``{token, username, admin, ...}`` (not stored: see ``store_token``)."""
        try:
            resp = self._http.post("/api/v1/auth/login", json={"username": username, "password": password})
        except httpx.TransportError as exc:
            raise Unreachable(self.master, exc) from exc
        if resp.status_code == 401:
            raise APIError(401, "wrong username or password")
        return self._check(resp)  # type: ignore[no-any-return]

    def logout(self) -> dict[str, Any]:
        """Revoke the token this client sends."""
        return self._post("/api/v1/auth/logout")  # type: ignore[no-any-return]

    def me(self) -> dict[str, Any]:
        """The signed-in user."""
        return self._get("/api/v1/me")  # type: ignore[no-any-return]

    def create_user(self, username: str, password: str, admin: bool = False) -> dict[str, Any]:
        """Create a user (admins only)."""
        return self._post("/api/v1/users",  # type: ignore[no-any-return]
                          {"username": username, "password": password, "admin": admin})

    def list_users(self) -> list[dict[str, Any]]:
        """Every user."""
        return self._get("/api/v1/users")  # type: ignore[no-any-return]

    def create_token(self, name: str, expires_in_days: float | None = None) -> dict[str, Any]:
        """A new named token for the signed-in user; its value is in the answer only."""
        body: dict[str, Any] = {"name": name}
        if expires_in_days is not None:
            body["expires_in_days"] = expires_in_days
        return self._post("/api/v1/tokens", body)  # type: ignore[no-any-return]

    def list_tokens(self, all_users: bool = False) -> list[dict[str, Any]]:
        """Live tokens (own; every user's for an admin with ``all_users``), never their values."""
        return self._get("/api/v1/tokens", all=str(all_users).lower())  # type: ignore[no-any-return]

    def revoke_token(self, token_id: int) -> dict[str, Any]:
        """Revoke a token by id."""
        return self._delete(f"/api/v1/tokens/{token_id}")  # type: ignore[no-any-return]

    def kill_experiment(self, experiment_id: int) -> dict[str, Any]:
        """Kill an experiment."""
        return self._post(f"/api/v1/experiments/{experiment_id}/kill")  # type: ignore[no-any-return]

    def continue_experiment(self, experiment_id: int, overrides_yaml: str = "") -> dict[str, Any]:
        """Continue an ended experiment (Determined's ``det experiment continue``) with these override fields (a
        YAML mapping, e.g. a longer ``searcher.max_length``); returns ``{id, state, trial_ids, config_yaml...}``."""
        return self._post(f"/api/v1/experiments/{experiment_id}/continue",  # type: ignore[no-any-return]
                          {"config": overrides_yaml})

    def fork_experiment(self, experiment_id: int, overrides_yaml: str = "", paused: bool = False) -> dict[str, Any]:
        """A new experiment with this one's code and its config merged with the overrides (a YAML mapping);
        returns ``{id, forked_from, warnings, config_yaml...}``."""
        return self._post(f"/api/v1/experiments/{experiment_id}/fork",  # type: ignore[no-any-return]
                          {"config": overrides_yaml, "paused": paused})

    def pause_experiment(self, experiment_id: int) -> dict[str, Any]:
        """Pause an experiment (its trials checkpoint and release their slots)."""
        return self._post(f"/api/v1/experiments/{experiment_id}/pause")  # type: ignore[no-any-return]

    def activate_experiment(self, experiment_id: int) -> dict[str, Any]:
        """Activate a paused experiment."""
        return self._post(f"/api/v1/experiments/{experiment_id}/activate")  # type: ignore[no-any-return]

    def set_resources(self, experiment_id: int, **knobs: Any) -> dict[str, Any]:
        """Change priority, weight or max_slots."""
        return self._post(f"/api/v1/experiments/{experiment_id}/resources", knobs)  # type: ignore[no-any-return]

    def set_experiment_metadata(self, experiment_id: int, name: str | None = None, description: str | None = None,
                                add_labels: list[str] | None = None,
                                remove_labels: list[str] | None = None,
                                archived: bool | None = None) -> dict[str, Any]:
        """Rename, redescribe or relabel an experiment; returns ``{id, name, description, labels}`` as they are now."""
        body: dict[str, Any] = {"add_labels": add_labels or [], "remove_labels": remove_labels or []}
        if name is not None:
            body["name"] = name
        if description is not None:
            body["description"] = description
        if archived is not None:
            body["archived"] = archived
        return self._post(f"/api/v1/experiments/{experiment_id}/metadata", body)  # type: ignore[no-any-return]

    def wait_experiment(self, experiment_id: int, poll_s: float = 1.0, timeout_s: float | None = None,
                        not_found_s: float = 30.0) -> dict[str, Any]:
        """Poll until the experiment reaches a terminal state; return it. ``TimeoutError`` after ``timeout_s``.
        A 404 in the first ``not_found_s`` is waited out: a submission reaches the read model a moment later."""
        import time

        started = time.monotonic()
        deadline = None if timeout_s is None else started + timeout_s
        while True:
            try:
                exp = self.get_experiment(experiment_id)
            except APIError as exc:
                if exc.status != 404 or time.monotonic() - started > not_found_s:
                    raise
                time.sleep(poll_s)
                continue
            if exp["state"] in TERMINAL_STATES:
                return exp
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"experiment {experiment_id} is still {exp['state']} after {timeout_s} s")
            time.sleep(poll_s)

    def kill_trial(self, trial_id: int) -> dict[str, Any]:
        """Kill one trial."""
        return self._post(f"/api/v1/trials/{trial_id}/kill")  # type: ignore[no-any-return]

    def experiment_events(self, experiment_id: int, after_seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """The experiment's audit trail, in stream order."""
        return self._get(f"/api/v1/experiments/{experiment_id}/events",  # type: ignore[no-any-return]
                         after_seq=after_seq, limit=limit)

    def list_agents(self) -> list[dict[str, Any]]:
        """Worker agents and their slots."""
        return self._get("/api/v1/agents")  # type: ignore[no-any-return]

    def list_jobs(self) -> list[dict[str, Any]]:
        """The job queue."""
        return self._get("/api/v1/jobs")  # type: ignore[no-any-return]

    def get_trial(self, trial_id: int) -> dict[str, Any]:
        """One trial with its allocations."""
        return self._get(f"/api/v1/trials/{trial_id}")  # type: ignore[no-any-return]

    def trial_metrics(self, trial_id: int, kind: str | None = None) -> list[dict[str, Any]]:
        """A trial's metric points."""
        return self._get(f"/api/v1/trials/{trial_id}/metrics", kind=kind)  # type: ignore[no-any-return]

    def trial_logs(self, trial_id: int, limit: int = 10000, offset: int = 0,
                   tail: bool = False, since: str | None = None) -> list[dict[str, Any]]:
        """A trial's log lines (``since``: an ISO 8601 time; only lines written at or after it)."""
        return self._get(f"/api/v1/trials/{trial_id}/logs", limit=limit, offset=offset,  # type: ignore[no-any-return]
                         tail=str(tail).lower(), since=since)

    def trial_checkpoints(self, trial_id: int) -> list[dict[str, Any]]:
        """A trial's checkpoints."""
        return self._get(f"/api/v1/trials/{trial_id}/checkpoints")  # type: ignore[no-any-return]

    def get_checkpoint(self, uuid: str) -> dict[str, Any]:
        """A checkpoint's record."""
        return self._get(f"/api/v1/checkpoints/{uuid}")  # type: ignore[no-any-return]

    def experiment_checkpoints(self, experiment_id: int, sort_by: str = "trial", state: str | None = None,
                               limit: int = 1000) -> list[dict[str, Any]]:
        """An experiment's checkpoints; ``sort_by="metric", state="COMPLETED", limit=K``: the best K."""
        found: list[dict[str, Any]] = self._get(f"/api/v1/experiments/{experiment_id}/checkpoints",
                                                sort_by=sort_by, state=state, limit=limit)
        return found

    def delete_checkpoint(self, uuid: str) -> dict[str, Any]:
        """Delete a checkpoint's files from the store."""
        return self._delete(f"/api/v1/checkpoints/{uuid}")  # type: ignore[no-any-return]

    def delete_experiment(self, experiment_id: int) -> dict[str, Any]:
        """Delete an ended experiment: its checkpoints' files, then its trials, metrics and logs."""
        return self._delete(f"/api/v1/experiments/{experiment_id}")  # type: ignore[no-any-return]

    def set_gc_policy(self, experiment_id: int, **policy: int | None) -> dict[str, Any]:
        """Change an experiment's checkpoint retention (``save_experiment_best``, ``save_trial_best``,
        ``save_trial_latest``; None keeps one)."""
        return self._post(f"/api/v1/experiments/{experiment_id}/gc-policy",  # type: ignore[no-any-return]
                          {k: v for k, v in policy.items() if v is not None})

    def _download(self, path: str) -> bytes:
        try:
            resp = self._http.get(path)
        except httpx.TransportError as exc:
            raise Unreachable(self.master, exc) from exc
        if resp.status_code >= 400:
            self._check(resp)
        return resp.content

    def tensorboard_files(self, trial_id: int) -> dict[str, Any]:
        """A trial's TensorBoard files in the store: ``{experiment_id, trial_id, files: [{path, size}], truncated}``
        (``schemas.api.TensorboardListing``; owner or admin)."""
        return self._get(f"/api/v1/trials/{trial_id}/tensorboard/files")  # type: ignore[no-any-return]

    def tensorboard_chunk(self, trial_id: int, path: str, offset: int = 0) -> tuple[bytes, int]:
        """Bytes of one of a trial's TensorBoard files from ``offset`` (as many as one answer holds; none at its
        end) and the whole file's size."""
        try:
            resp = self._http.get(f"/api/v1/trials/{trial_id}/tensorboard/file",
                                  params={"path": path, "offset": offset})
        except httpx.TransportError as exc:
            raise Unreachable(self.master, exc) from exc
        if resp.status_code >= 400:
            self._check(resp)
        data = resp.content
        return data, int(resp.headers.get("x-file-size") or offset + len(data))

    def download_context(self, experiment_id: int, target: Path) -> list[str]:
        """Unpack an experiment's code context, as submitted, into ``target``; return its files."""
        blob = self._download(f"/api/v1/experiments/{experiment_id}/context")
        target.mkdir(parents=True, exist_ok=True)
        code_context.extract(blob, target)
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            return [m.name for m in tar.getmembers() if m.isfile()]

    def checkpoint_files(self, uuid: str) -> dict[str, Any]:
        """What the uploader recorded of a checkpoint: steps, framework, each file's size, sha256 and mtime."""
        return self._get(f"/api/v1/checkpoints/{uuid}/files")  # type: ignore[no-any-return]

    def download_checkpoint(self, uuid: str, target: Path) -> list[str]:
        """Download a checkpoint's files into ``target`` (keeping their recorded modification times); return their
        paths. Each file is checked against the checkpoint's recorded sha256 as it is written: one that does not
        match is removed and raised as ``schemas.checkpoint.CorruptCheckpoint``."""
        blob = self._download(f"/api/v1/checkpoints/{uuid}/download")
        try:
            recorded = self.checkpoint_files(uuid)
        except APIError as exc:
            if exc.status not in (404, 409):  # 404: a gateway from before the route; 409: stored elsewhere
                raise
            recorded = {"hashed": False, "files": {}}
        target.mkdir(parents=True, exist_ok=True)
        names = []
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            for member in tar.getmembers():
                names.append(member.name)
            tar.extractall(target, filter="data")  # sets each file's mtime from the archive
            for member in tar.getmembers():
                _verify(target, uuid, member, recorded)
        return names

    # -- the model registry ---------------------------------------------------------------------------------

    def create_model(self, name: str, description: str = "", labels: list[str] | None = None,
                     metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create a model in the registry; the signed-in user owns it."""
        return self._post("/api/v1/models", {"name": name, "description": description,  # type: ignore[no-any-return]
                                             "labels": labels or [], "metadata": metadata or {}})

    def list_models(self, labels: list[str] | None = None, name: str | None = None, owner: str | None = None,
                    limit: int = 1000) -> list[dict[str, Any]]:
        """Models by name: only those carrying every one of ``labels``, whose name contains ``name``."""
        return self._get("/api/v1/models", label=labels or None, name=name,  # type: ignore[no-any-return]
                         owner=owner, limit=limit)

    def get_model(self, name: str | int) -> dict[str, Any]:
        """One model by name (or id)."""
        return self._get(f"/api/v1/models/{_segment(name)}")  # type: ignore[no-any-return]

    def set_model_metadata(self, name: str | int, description: str | None = None,
                           add_labels: list[str] | None = None, remove_labels: list[str] | None = None,
                           set_metadata: dict[str, Any] | None = None,
                           remove_metadata: list[str] | None = None) -> dict[str, Any]:
        """Change a model's description, labels or metadata (owner or admin); returns the model as it is now."""
        body: dict[str, Any] = {"add_labels": add_labels or [], "remove_labels": remove_labels or [],
                                "set_metadata": set_metadata or {}, "remove_metadata": remove_metadata or []}
        if description is not None:
            body["description"] = description
        return self._post(f"/api/v1/models/{_segment(name)}/metadata", body)  # type: ignore[no-any-return]

    def delete_model(self, name: str | int) -> dict[str, Any]:
        """Delete a model and its versions (owner or admin)."""
        return self._delete(f"/api/v1/models/{_segment(name)}")  # type: ignore[no-any-return]

    def model_versions(self, name: str | int, descending: bool = False) -> list[dict[str, Any]]:
        """A model's versions in version order (``descending``: the latest first)."""
        return self._get(f"/api/v1/models/{_segment(name)}/versions",  # type: ignore[no-any-return]
                         order="desc" if descending else "asc")

    def register_model_version(self, name: str | int, checkpoint_uuid: str, version_name: str = "",
                               comment: str = "", metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Register a checkpoint as the model's next version (owner or admin, who may see the checkpoint)."""
        return self._post(f"/api/v1/models/{_segment(name)}/versions",  # type: ignore[no-any-return]
                          {"checkpoint_uuid": checkpoint_uuid, "name": version_name, "comment": comment,
                           "metadata": metadata or {}})

    def get_model_version(self, name: str | int, version: int | str = "latest") -> dict[str, Any]:
        """One version of a model: a number, or ``latest``."""
        return self._get(f"/api/v1/models/{_segment(name)}/versions/{_segment(version)}")  # type: ignore[no-any-return]

    def delete_model_version(self, name: str | int, version: int) -> dict[str, Any]:
        """Delete one version of a model (owner or admin)."""
        return self._delete(f"/api/v1/models/{_segment(name)}/versions/{int(version)}")  # type: ignore[no-any-return]


def _segment(value: str | int) -> str:
    """One path segment: a name that is not a URL-safe token is quoted, so it can only be refused, never rerouted."""
    from urllib.parse import quote

    return quote(str(value), safe="")


def _verify(target: Path, uuid: str, member: tarfile.TarInfo, recorded: dict[str, Any]) -> None:
    """Check one extracted file against the checkpoint's recorded size and sha256; restore its recorded mtime."""
    want = recorded["files"].get(member.name)
    if not member.isfile() or not recorded.get("hashed") or want is None:
        return
    path = target / member.name
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
    why = mismatch(member.name, CheckpointFile(size=want["size"], sha256=want["sha256"], mtime=want["mtime"]),
                   path.stat().st_size, sha.hexdigest())
    if why:
        path.unlink(missing_ok=True)
        raise CorruptCheckpoint(f"checkpoint {uuid} arrived corrupted: {why}")
    os.utime(path, (want["mtime"], want["mtime"]))  # the tar holds whole seconds; the record is exact
