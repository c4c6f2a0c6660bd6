"""Operator metrics (prefix ``parallama_operator_``), served by prometheus-client from ``main.run``.

They answer the operator's own questions: is it reconciling, how long does it take, which plans
does it make, and how often does reality (OOM kills) contradict a plan.
"""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "OOM_KILLS",
    "PLANNED_GPUS",
    "PLANNED_SLOTS",
    "PLANS",
    "RECONCILES",
    "RECONCILE_SECONDS",
    "REPLANS",
    "RUNTIME_FAILURES",
    "forget",
]

RECONCILES = Counter(
    "parallama_operator_reconcile_total",
    "Reconciliations of ModelDeployments by result (ok, unschedulable, invalid, error).",
    ["result"],
)
RECONCILE_SECONDS = Histogram(
    "parallama_operator_reconcile_duration_seconds",
    "Time from reading a ModelDeployment to its children and status being applied.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PLANS = Counter("parallama_operator_plans_total", "Plans computed, by whether the model fits.", ["fits"])
REPLANS = Counter("parallama_operator_replans_total", "Plans that changed after the inventory or an OOM.")
OOM_KILLS = Counter("parallama_operator_oom_kills_total", "Runtime containers seen OOMKilled.")
RUNTIME_FAILURES = Counter(
    "parallama_operator_runtime_failures_total",
    "Runtime containers seen terminated, by reason: OOMKilled or the runtime's own (gpu-oom-load...).",
    ["reason"],
)
PLANNED_SLOTS = Gauge(
    "parallama_operator_planned_slots", "Slots per replica of the current plan.", ["namespace", "name"]
)
PLANNED_GPUS = Gauge(
    "parallama_operator_planned_gpus_per_replica",
    "GPUs per replica of the current plan.",
    ["namespace", "name"],
)


def forget(namespace: str, name: str) -> None:
    """Drop the per-object series of a deleted ModelDeployment (a gauge would report it forever)."""
    for gauge in (PLANNED_SLOTS, PLANNED_GPUS):
        with contextlib.suppress(KeyError):  # never planned by this process
            gauge.remove(namespace, name)
