"""The Kiln SDK: a thin HTTP client for the gateway (``KILN_MASTER``)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import httpx

from kiln import context as code_context

DEFAULT_MASTER = "http://127.0.0.1:18080"
TERMINAL_STATES = {"COMPLETED", "ERROR", "CANCELED"}


class APIError(Exception):
    """The gateway refused a request; ``errors`` lists field-level problems when there are any."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, str]] | None = None) -> None:
        self.status = status
        self.detail = detail
        self.errors = errors or []
        lines = [f"{detail} (HTTP {status})"] + [f"  {e.get('path', '?')}: {e.get('message', '')}" for e in self.errors]
        super().__init__("\n".join(lines))


def master_url() -> str:
    """The gateway address: ``KILN_MASTER``, else the local stack's default."""
    return os.environ.get("KILN_MASTER", DEFAULT_MASTER).rstrip("/")


class Client:
    """Calls the gateway's REST API; every method returns decoded JSON."""

    def __init__(self, master: str | None = None, timeout: float = 60.0) -> None:
        self.master = (master or master_url()).rstrip("/")
        self._http = httpx.Client(base_url=self.master, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _check(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {"detail": resp.text}
            extra = body.get("extra") or {}
            raise APIError(resp.status_code, str(body.get("detail", resp.reason_phrase)), extra.get("errors"))
        return resp.json()

    def _get(self, path: str, **params: Any) -> Any:
        try:
            resp = self._http.get(path, params={k: v for k, v in params.items() if v is not None})
        except httpx.TransportError as exc:
            raise APIError(0, f"cannot reach Kiln at {self.master}: {exc} (is it up? `kiln up`)") from exc
        return self._check(resp)

    def health(self) -> dict[str, Any]:
        """The gateway's health answer."""
        return self._get("/health")  # type: ignore[no-any-return]

    def create_experiment(self, config_yaml: str, context_dir: Path) -> dict[str, Any]:
        """Pack ``context_dir`` and submit it with the config; returns ``{id, warnings}``."""
        blob = code_context.pack(context_dir)
        files = {"context": ("context.tar.gz", blob, "application/gzip")}
        data = {"config": config_yaml, "submitted_by": os.environ.get("USER", "anonymous")}
        try:
            resp = self._http.post("/api/v1/experiments", data=data, files=files)
        except httpx.TransportError as exc:
            raise APIError(0, f"cannot reach Kiln at {self.master}: {exc} (is it up? `kiln up`)") from exc
        return self._check(resp)  # type: ignore[no-any-return]

    def list_experiments(self, limit: int = 100, state: str | None = None) -> list[dict[str, Any]]:
        """Experiments, newest first."""
        return self._get("/api/v1/experiments", limit=limit, state=state)  # type: ignore[no-any-return]

    def get_experiment(self, experiment_id: int) -> dict[str, Any]:
        """One experiment."""
        return self._get(f"/api/v1/experiments/{experiment_id}")  # type: ignore[no-any-return]

    def list_trials(self, experiment_id: int) -> list[dict[str, Any]]:
        """An experiment's trials."""
        return self._get(f"/api/v1/experiments/{experiment_id}/trials")  # type: ignore[no-any-return]

    def _post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            resp = self._http.post(path, json=body) if body is not None else self._http.post(path)
        except httpx.TransportError as exc:
            raise APIError(0, f"cannot reach Kiln at {self.master}: {exc} (is it up? `kiln up`)") from exc
        return self._check(resp)

    def kill_experiment(self, experiment_id: int) -> dict[str, Any]:
        """Kill an experiment."""
        return self._post(f"/api/v1/experiments/{experiment_id}/kill")  # type: ignore[no-any-return]

    def pause_experiment(self, experiment_id: int) -> dict[str, Any]:
        """Pause an experiment (its trials checkpoint and release their slots)."""
        return self._post(f"/api/v1/experiments/{experiment_id}/pause")  # type: ignore[no-any-return]

    def activate_experiment(self, experiment_id: int) -> dict[str, Any]:
        """Activate a paused experiment."""
        return self._post(f"/api/v1/experiments/{experiment_id}/activate")  # type: ignore[no-any-return]

    def set_resources(self, experiment_id: int, **knobs: Any) -> dict[str, Any]:
        """Change priority, weight or max_slots."""
        return self._post(f"/api/v1/experiments/{experiment_id}/resources", knobs)  # type: ignore[no-any-return]

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

    def trial_logs(self, trial_id: int, limit: int = 10000, offset: int = 0, tail: bool = False) -> list[dict[str, Any]]:
        """A trial's log lines."""
        return self._get(f"/api/v1/trials/{trial_id}/logs", limit=limit, offset=offset,  # type: ignore[no-any-return]
                         tail=str(tail).lower())

    def trial_checkpoints(self, trial_id: int) -> list[dict[str, Any]]:
        """A trial's checkpoints."""
        return self._get(f"/api/v1/trials/{trial_id}/checkpoints")  # type: ignore[no-any-return]

    def get_checkpoint(self, uuid: str) -> dict[str, Any]:
        """A checkpoint's record."""
        return self._get(f"/api/v1/checkpoints/{uuid}")  # type: ignore[no-any-return]

    def download_checkpoint(self, uuid: str, target: Path) -> list[str]:
        """Download a checkpoint's files into ``target``; return their relative paths."""
        try:
            resp = self._http.get(f"/api/v1/checkpoints/{uuid}/download")
        except httpx.TransportError as exc:
            raise APIError(0, f"cannot reach Kiln at {self.master}: {exc}") from exc
        if resp.status_code >= 400:
            self._check(resp)
        target.mkdir(parents=True, exist_ok=True)
        names = []
        with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:") as tar:
            for member in tar.getmembers():
                names.append(member.name)
            tar.extractall(target, filter="data")
        return names
