"""The scheduler's published view of the cluster: agents, slots and the job queue.

The scheduler writes it to the ``kiln_cluster`` key-value bucket (key ``view``) whenever it changes; the
gateway serves it (``/api/v1/agents``, ``/api/v1/jobs``). It is a snapshot for people, not an event.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.events import Slot

CLUSTER_BUCKET = "kiln_cluster"
CLUSTER_KEY = "view"


class SlotView(msgspec.Struct, frozen=True, kw_only=True):
    """One slot and what runs on it."""

    slot: Slot
    allocation_id: str | None = None
    trial_id: int | None = None


class AgentView(msgspec.Struct, frozen=True, kw_only=True):
    """One worker agent."""

    worker_id: str
    resource_pool: str
    address: str
    last_seen: float
    lost: bool
    slots: list[SlotView]


JobState = Literal["QUEUED", "ASSIGNED", "RUNNING", "PAUSED"]


class JobView(msgspec.Struct, frozen=True, kw_only=True):
    """A trial that holds or wants slots."""

    experiment_id: int
    trial_id: int
    state: JobState
    priority: int
    weight: float
    slots: int
    resource_pool: str
    position: int | None = None  # 1-based place in the queue, for QUEUED jobs
    worker_id: str = ""
    preempting: bool = False
    reason: str = ""  # why a waiting trial cannot start when it is not just its turn (paused, too big for its pool)


class ClusterView(msgspec.Struct, frozen=True, kw_only=True):
    """Agents and jobs, as of ``as_of``."""

    as_of: float
    agents: list[AgentView]
    jobs: list[JobView]
