"""What a worker tells a trial process about itself: the contract between worker and ``kiln.core``."""

from __future__ import annotations

from typing import Any

import msgspec

# The environment variable the worker puts the encoded ClusterInfo in.
CLUSTER_INFO_ENV = "KILN_CLUSTER_INFO"
# Exit code a trial uses to say "these hyperparameters are invalid" (Core API: InvalidHP).
INVALID_HP_EXIT_CODE = 77


class TrialInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The trial a process runs (Determined's ``ClusterInfo.trial``)."""

    trial_id: int
    experiment_id: int
    hparams: dict[str, Any]
    trial_seed: int
    config: dict[str, Any]
    max_length: int | None = None


class ClusterInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a trial process needs to know to report, checkpoint and resume."""

    master_url: str
    cluster_id: str
    allocation_id: str
    worker_id: str
    trial: TrialInfo
    latest_checkpoint: str | None = None
    restarts: int = 0
    slot_ids: list[str] = []
    container_addrs: list[str] = []
    container_rank: int = 0
    # How the trial reaches the bus and the checkpoint store; its own credentials.
    nats_url: str = ""
    nats_user: str = ""
    nats_password: str = ""
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "kiln"
    s3_secure: bool = False
