"""How many replicas a ModelDeployment should run: a pure decision from the runtimes' own load.

The signal is what a replica can do, not a proxy for it: each runtime exports its slots (``parallama_
slots_total``), how many are busy (``parallama_slots_busy``) and how many requests wait
(``parallama_queue_depth``). The load is busy + queued requests; a replica serves ``slots`` of them
at once, and we aim to keep ``target`` of its slots busy, so

    recommendation = ceil((busy + queued) / (slots x target))

The recommendation is then stabilised the way Kubernetes' HPA does (its behaviour fields'
``stabilizationWindowSeconds``): scaling up follows the *lowest* recommendation of the scale-up
window (a spike must last the window), scaling down the *highest* of the scale-down window (a lull
must last it, several minutes by default), so a steady load never flaps between two sizes.

Replicas that did not report (unreachable, restarting) are counted the way the HPA counts missing
metrics: as idle when deciding to scale up and as fully busy when deciding to scale down, so a
replica that cannot be read never causes a scale-down, nor inflates a scale-up.

Capacity comes last: the operator's placement knows how many replicas the cluster's free GPUs can
host, so the decision never asks for more (the extra pods would stay Pending) and says when capacity,
not the maximum, held it back.

Everything here is plain data in, plain data out: the I/O (the clock, the API, the loop) lives in
autoscaler.py, the scraper in replica_load.py, and the property tests drive this module alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "Decision",
    "LimitedBy",
    "Observation",
    "Policy",
    "Recommendation",
    "decide",
    "recommend",
]


@dataclass(frozen=True)
class Policy:
    """``spec.autoscaling`` in the decision's terms (seconds, a fraction of slots)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_utilization: float = 0.8
    scale_up_window_s: float = 0.0
    scale_down_window_s: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= minReplicas <= maxReplicas")
        if not 0 < self.target_utilization <= 1:
            raise ValueError("targetUtilization must lie in (0, 1]")
        if self.scale_up_window_s < 0 or self.scale_down_window_s < 0:
            raise ValueError("stabilization windows cannot be negative")


@dataclass(frozen=True)
class Observation:
    """One scrape of the ready replicas: what the reporting ones said, and how many did not."""

    slots_per_replica: int
    busy: float = 0.0
    """Slots busy, summed over the replicas that reported."""
    queued: float = 0.0
    """Requests waiting for a slot, summed likewise."""
    reporting: int = 0
    missing: int = 0
    """Ready replicas whose /metrics could not be read."""

    @property
    def load(self) -> float:
        return self.busy + self.queued


@dataclass(frozen=True)
class Recommendation:
    """What one observation asks for, taken at ``at`` (seconds, any monotonic clock)."""

    at: float
    up: int
    """Replicas wanted if the missing replicas are idle (used to scale up)."""
    down: int
    """Replicas wanted if the missing replicas are fully busy (used to scale down)."""


class LimitedBy(StrEnum):
    NONE = ""
    MAX = "max"
    CAPACITY = "capacity"


@dataclass(frozen=True)
class Decision:
    replicas: int
    """What to run now."""
    desired: int
    """What the load asks for after stabilisation, before the maximum and capacity."""
    limited_by: LimitedBy = LimitedBy.NONE


def recommend(observation: Observation, policy: Policy, at: float) -> Recommendation:
    """The replicas ``observation``'s load needs, both ways of counting the missing replicas."""
    per_replica = max(1, observation.slots_per_replica) * policy.target_utilization

    def needed(load: float) -> int:
        # a load that is a whole multiple of the target must not round up on float noise
        return max(0, math.ceil(round(load / per_replica, 9)))

    missing_busy = observation.missing * observation.slots_per_replica
    return Recommendation(at=at, up=needed(observation.load), down=needed(observation.load + missing_busy))


def decide(
    history: Sequence[Recommendation],
    policy: Policy,
    current: int,
    now: float,
    capacity: int | None = None,
    observed_since: float | None = None,
) -> Decision:
    """The replicas to run now, from the recommendations of the last windows.

    ``history`` holds recent recommendations, the newest last (older ones than both windows may be
    present; they are ignored). ``capacity`` is how many replicas the cluster can host in all,
    counting the ones running (None: unknown, no limit); it never takes away running replicas: a
    cluster that filled up meanwhile stops further growth, it does not evict.

    ``observed_since`` is when the history began (None: it covers everything that matters). A
    window's verdict needs the whole window observed: until the history spans the scale-down
    window nothing is removed, until it spans the scale-up window nothing is added. Without this a
    freshly started operator (an empty history) or one that saw no replica for a while would scale
    down on its first idle sample, which is exactly what the window is there to prevent.
    """
    up_window = [r.up for r in history if now - r.at <= policy.scale_up_window_s] or [
        history[-1].up if history else current
    ]
    down_window = [r.down for r in history if now - r.at <= policy.scale_down_window_s] or [
        history[-1].down if history else current
    ]
    scale_up_to = min(up_window)
    scale_down_to = max(down_window)
    if observed_since is not None:
        if now - observed_since < policy.scale_up_window_s:
            scale_up_to = min(scale_up_to, current)
        if now - observed_since < policy.scale_down_window_s:
            scale_down_to = max(scale_down_to, current)
    if scale_up_to > current:
        desired = scale_up_to
    elif scale_down_to < current:
        desired = scale_down_to
    else:
        desired = current
    clamped = min(max(desired, policy.min_replicas), policy.max_replicas)
    limited = LimitedBy.MAX if desired > policy.max_replicas else LimitedBy.NONE
    if capacity is not None and clamped > max(capacity, current, policy.min_replicas):
        clamped = max(capacity, current, policy.min_replicas)
        limited = LimitedBy.CAPACITY
    return Decision(replicas=clamped, desired=desired, limited_by=limited)
