"""Operator metrics (prefix ``parallama_operator_``), served by prometheus-client from ``main.run``.

They answer the operator's own questions: is it reconciling, how long does it take, which plans
does it make, how often does reality (OOM kills) contradict a plan, and what the autoscaler saw,
wanted and was held back by.
"""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "AUTOSCALING_DESIRED",
    "AUTOSCALING_LIMITED",
    "AUTOSCALING_OBSERVED",
    "AUTOSCALING_REPLICAS",
    "AUTOSCALING_SCALES",
    "AUTOSCALING_SCRAPE_FAILURES",
    "OOM_KILLS",
    "PLANNED_GPUS",
    "PLANNED_SLOTS",
    "PLANS",
    "RECONCILES",
    "RECONCILE_SECONDS",
    "REPLANS",
    "RUNTIME_FAILURES",
    "forget",
    "forget_autoscaling",
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

AUTOSCALING_DESIRED = Gauge(
    "parallama_operator_autoscaling_desired_replicas",
    "Replicas the observed load asks for (stabilised, before maxReplicas and capacity).",
    ["namespace", "name"],
)
AUTOSCALING_REPLICAS = Gauge(
    "parallama_operator_autoscaling_replicas",
    "Replicas the autoscaler set (spec.replicas).",
    ["namespace", "name"],
)
LIMITS = ("max", "capacity")
AUTOSCALING_LIMITED = Gauge(
    "parallama_operator_autoscaling_limited",
    "1 while the autoscaler is held below the desired replicas, by reason (max or capacity).",
    ["namespace", "name", "reason"],
)
SIGNALS = ("busy", "queued", "slots", "reporting", "missing")
AUTOSCALING_OBSERVED = Gauge(
    "parallama_operator_autoscaling_observed",
    "What the last scrape of the ready replicas said, by signal: busy slots, queued requests, slots"
    " of the reporting replicas, reporting and missing replicas.",
    ["namespace", "name", "signal"],
)
AUTOSCALING_SCALES = Counter(
    "parallama_operator_autoscaling_scales_total", "Replica changes the autoscaler made.", ["direction"]
)
AUTOSCALING_SCRAPE_FAILURES = Counter(
    "parallama_operator_autoscaling_scrape_failures_total",
    "Reads of a ready replica's /metrics that failed (the replica counted as missing).",
)


def forget_autoscaling(namespace: str, name: str) -> None:
    """Drop the autoscaling series of a ModelDeployment that stopped autoscaling or was deleted."""
    for gauge in (AUTOSCALING_DESIRED, AUTOSCALING_REPLICAS):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    for reason in LIMITS:
        with contextlib.suppress(KeyError):
            AUTOSCALING_LIMITED.remove(namespace, name, reason)
    for signal in SIGNALS:
        with contextlib.suppress(KeyError):
            AUTOSCALING_OBSERVED.remove(namespace, name, signal)


def forget(namespace: str, name: str) -> None:
    """Drop the per-object series of a deleted ModelDeployment (a gauge would report it forever)."""
    for gauge in (PLANNED_SLOTS, PLANNED_GPUS):
        with contextlib.suppress(KeyError):  # never planned by this process
            gauge.remove(namespace, name)
    forget_autoscaling(namespace, name)
