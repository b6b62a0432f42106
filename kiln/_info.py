"""``kiln.get_cluster_info()``: what a trial knows about itself, in Determined's shape."""

from __future__ import annotations

import functools
import os
from typing import Any

import msgspec

from schemas.trial import CLUSTER_INFO_ENV
from schemas.trial import ClusterInfo as _WireInfo


class TrialInfo:
    """``info.trial``: the trial's id, experiment, hyperparameters and seed."""

    def __init__(self, wire: _WireInfo) -> None:
        t = wire.trial
        self.trial_id = t.trial_id
        self.experiment_id = t.experiment_id
        self.hparams: dict[str, Any] = t.hparams
        self.trial_seed = t.trial_seed
        self._trial_seed = t.trial_seed  # Determined's private spelling, used by some scripts
        self._config: dict[str, Any] = t.config
        self.config = t.config
        self.user_data: dict[str, Any] = t.config.get("data") or {}
        self.max_length = t.max_length


class ClusterInfo:
    """Determined's ``ClusterInfo``: ``.trial``, ``.latest_checkpoint``, ``.container_addrs``..."""

    task_type = "TRIAL"

    def __init__(self, wire: _WireInfo) -> None:
        self._wire = wire
        self.master_url = wire.master_url
        self.cluster_id = wire.cluster_id
        self.allocation_id = wire.allocation_id
        self.task_id = f"{wire.trial.experiment_id}.{wire.trial.trial_id}"
        self.trial = TrialInfo(wire)
        self.latest_checkpoint = wire.latest_checkpoint
        self.container_addrs = list(wire.container_addrs)
        self.container_rank = wire.container_rank
        self.agent_id = wire.worker_id
        self.slot_ids = list(wire.slot_ids)
        self.gpu_uuids: list[str] = []
        self.restarts = wire.restarts


@functools.cache
def _cached(raw: str) -> ClusterInfo:
    return ClusterInfo(msgspec.json.decode(raw, type=_WireInfo))


def wire_cluster_info() -> _WireInfo | None:
    """The raw info the worker passed, with credentials (for ``kiln.core`` only)."""
    raw = os.environ.get(CLUSTER_INFO_ENV)
    return _cached(raw)._wire if raw else None


def get_cluster_info() -> ClusterInfo | None:
    """The running trial's info, or None outside a Kiln cluster (then ``core.init()`` runs locally)."""
    raw = os.environ.get(CLUSTER_INFO_ENV)
    return _cached(raw) if raw else None
