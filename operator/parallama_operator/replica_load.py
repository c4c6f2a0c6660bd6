"""Read the load of a ModelDeployment's ready replicas from their own ``/metrics``.

The autoscaler's signal is what each runtime says of itself (``parallama_slots_total``,
``parallama_slots_busy``, ``parallama_queue_depth``; gauges, see ``parallama_runtime.metrics``),
read straight from the pods rather than through Prometheus: no monitoring stack is required, and the
numbers are seconds old, not a scrape interval plus a rule evaluation old.

A replica that cannot be read (refused, timed out, an HTTP error, text without the three gauges)
is *missing*, never an error: the decision counts missing replicas as idle for a scale-up and as
fully busy for a scale-down (see :mod:`parallama_operator.autoscaling`), so an unreachable pod can
neither shrink the deployment nor inflate it. Every replica is read concurrently, each under one
short timeout, so a hung pod costs one timeout per period, not one per replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .autoscaling import Observation

__all__ = [
    "QUEUE_DEPTH",
    "SLOTS_BUSY",
    "SLOTS_TOTAL",
    "ReplicaLoad",
    "Scrape",
    "is_ready",
    "metrics_url",
    "observation",
    "parse_metrics",
    "ready_targets",
    "scrape",
]

SLOTS_TOTAL = "parallama_slots_total"
SLOTS_BUSY = "parallama_slots_busy"
QUEUE_DEPTH = "parallama_queue_depth"
MAX_BODY_BYTES = 4 * 1024 * 1024
"""A runtime's /metrics is a few KiB; a bigger answer is not a parallama runtime."""


@dataclass(frozen=True)
class ReplicaLoad:
    slots: float
    busy: float
    queued: float


@dataclass
class Scrape:
    """One round over the ready replicas: what each reporting pod said, and why the others did not."""

    loads: dict[str, ReplicaLoad] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def parse_metrics(text: str) -> ReplicaLoad:
    """The three gauges from a Prometheus text exposition; ValueError when one is absent or the
    text does not parse (a runtime still loading its model exports no slot gauges)."""
    wanted = {SLOTS_TOTAL, SLOTS_BUSY, QUEUE_DEPTH}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    absent = sorted(wanted - values.keys())
    if absent:
        raise ValueError(f"no {', '.join(absent)} in the metrics")
    return ReplicaLoad(slots=values[SLOTS_TOTAL], busy=values[SLOTS_BUSY], queued=values[QUEUE_DEPTH])


def is_ready(pod: Mapping[str, Any]) -> bool:
    """Running, not being deleted, and the kubelet's Ready condition True: the pods a Service sends
    requests to, so the load they carry is the deployment's load."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def metrics_url(pod_ip: str, port: int) -> str:
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip  # an IPv6 pod address
    return f"http://{host}:{port}/metrics"


def ready_targets(pods: Iterable[Mapping[str, Any]], port: int) -> dict[str, str]:
    """Pod name -> metrics URL of every ready replica."""
    targets = {}
    for pod in pods:
        if is_ready(pod):
            targets[str((pod.get("metadata") or {}).get("name"))] = metrics_url(pod["status"]["podIP"], port)
    return targets


async def _read(session: aiohttp.ClientSession, url: str, within: float) -> ReplicaLoad:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=within)) as response:
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        body = await response.content.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise ValueError("the answer is too large for a runtime's /metrics")
        return parse_metrics(body.decode("utf-8", errors="replace"))


def _why(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__


async def scrape(session: aiohttp.ClientSession, targets: Mapping[str, str], within: float) -> Scrape:
    """Read every target at once, each within ``within`` seconds; each failure is recorded against
    its pod, none is raised."""
    names = list(targets)
    results = await asyncio.gather(
        *(_read(session, targets[name], within) for name in names), return_exceptions=True
    )
    result = Scrape()
    for name, outcome in zip(names, results, strict=True):
        if isinstance(outcome, ReplicaLoad):
            result.loads[name] = outcome
        elif isinstance(outcome, (aiohttp.ClientError, OSError, TimeoutError, ValueError)):
            result.failures[name] = _why(outcome)
        elif isinstance(outcome, BaseException):
            raise outcome  # cancellation, or a bug: not a replica's fault
    return result


def observation(result: Scrape, slots_per_replica: int) -> Observation:
    """The decision's input. ``slots_per_replica`` is the plan's: a replica added now gets the
    current plan's slots, whatever an older pod still runs with."""
    loads = result.loads.values()
    return Observation(
        slots_per_replica=slots_per_replica,
        busy=sum(load.busy for load in loads),
        queued=sum(load.queued for load in loads),
        reporting=len(result.loads),
        missing=len(result.failures),
    )
