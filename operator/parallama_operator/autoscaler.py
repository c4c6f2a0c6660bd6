"""The autoscaler's I/O: read the replicas' load, decide, set ``spec.replicas``, say what happened.

One task per operator (like the replan loop), not a kopf timer: kopf puts a finalizer on every object
a timer serves, and this operator keeps none, so that ``kubectl delete`` never waits for it. Every
period (``PARALLAMA_AUTOSCALE_INTERVAL_SECONDS``, 15 s) it visits each ModelDeployment with
``spec.autoscaling.enabled``:

1. lists its ready pods and reads their ``/metrics`` (:mod:`parallama_operator.replica_load`);
2. records the recommendation (:func:`~parallama_operator.autoscaling.recommend`) in a short
   in-memory history. The history is not persisted: a restarted operator starts a fresh window,
   which is safe because :func:`~parallama_operator.autoscaling.decide` scales down only once the
   history spans the whole scale-down window (and up once it spans the scale-up window);
3. under the object's lock, asks the planner how many replicas the GPU class the deployment runs on
   can host in all (its own pods counted as free) and decides;
4. writes ``spec.replicas`` with a merge patch guarded by the resourceVersion it read (a user's or
   a controller's concurrent change wins; the next period decides again). The normal reconcile then
   scales the Deployment: the autoscaler, an HPA and KEDA all take the same path;
5. writes ``status.autoscaling``, posts an event when the replicas change and a Warning when
   capacity holds them back (on change only), and sets the operator's autoscaling gauges.

It never scales while the serving plan is held after an inventory change (the plan for the current
inventory differs from the serving one): the spec change would re-plan and restart every replica.
With ``spec.autoscaling`` off it writes nothing, so an HPA or KEDA can own the scale subresource.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from parallama_runtime.planning.model_info import ModelSourceError, UnsupportedModelError
from parallama_runtime.planning.planner import Plan, format_bytes
from pydantic import ValidationError

from . import handlers, metrics
from .autoscaling import Decision, LimitedBy, Observation, Policy, Recommendation, decide, recommend
from .builders import selector_string
from .kube import ApiError
from .planning import compute_plan, host_bytes, plan_status, reserves_for
from .replica_load import Scrape, observation, ready_targets, scrape
from .resources import (
    AutoscalingStatus,
    ModelDeploymentSpec,
    ObservedLoad,
    Phase,
)

__all__ = ["Capacity", "Memory", "autoscale_key", "autoscale_loop", "policy_of"]

log = logging.getLogger(__name__)
Key = tuple[str, str]
GAP_PERIODS = 3
"""A history older than this many periods has a hole (no ready replica, an API outage): it starts
over, so that a window is never judged on the few samples after the hole."""


@dataclass
class Memory:
    """What the autoscaler remembers of one ModelDeployment between periods."""

    history: deque[Recommendation] = field(default_factory=deque)
    since: float | None = None
    """When the history began (monotonic clock)."""
    failing: dict[str, str] = field(default_factory=dict)
    """Pods whose /metrics could not be read last time, and why (logged once, when they start)."""

    def record(self, recommendation: Recommendation, policy: Policy, period: float) -> None:
        now = recommendation.at
        if self.history and now - self.history[-1].at > GAP_PERIODS * period:
            self.history.clear()
            self.since = None
        if self.since is None:
            self.since = now
        self.history.append(recommendation)
        keep = max(policy.scale_up_window_s, policy.scale_down_window_s) + 2 * period
        while self.history and now - self.history[0].at > keep:
            self.history.popleft()


@dataclass(frozen=True)
class Capacity:
    replicas: int | None = None
    """Replicas the serving GPU class can host in all; None: unknown (no limit from capacity)."""
    hold: str | None = None
    """Why no replica count may change now (the plan would change), or None."""


def policy_of(spec: ModelDeploymentSpec) -> Policy:
    scaling = spec.autoscaling
    return Policy(
        min_replicas=scaling.min_replicas,
        max_replicas=scaling.max_replicas or scaling.min_replicas,
        target_utilization=scaling.target_utilization,
        scale_up_window_s=float(scaling.scale_up_stabilization_seconds),
        scale_down_window_s=float(scaling.scale_down_stabilization_seconds),
    )


async def autoscale_loop(state: handlers.OperatorState) -> None:
    """Visit every autoscaled ModelDeployment once a period, all at once; nothing one of them does
    (an API error, a bug) stops the others or the loop. The first round waits one period, so that
    the watches have listed the nodes and the pods holding GPUs: planned over a half-listed
    inventory, capacity would count GPUs other pods hold as free."""
    async with aiohttp.ClientSession() as session:
        await asyncio.sleep(state.autoscale_seconds)
        while True:
            started = time.monotonic()
            keys = sorted(state.autoscaled | set(state.autoscaling))
            results = await asyncio.gather(
                *(autoscale_key(state, key, session) for key in keys), return_exceptions=True
            )
            for key, result in zip(keys, results, strict=True):
                if isinstance(result, handlers.TRANSIENT):
                    log.warning("autoscaling %s/%s: %s", *key, result)
                elif isinstance(result, Exception):
                    log.error("autoscaling %s/%s failed", *key, exc_info=result)
            await asyncio.sleep(max(state.autoscale_seconds - (time.monotonic() - started), 0.0))


async def _stop(state: handlers.OperatorState, key: Key) -> None:
    """Autoscaling was turned off: remove what the autoscaler wrote in status, then forget (a
    failed write is tried again next period)."""
    metrics.forget_autoscaling(*key)
    body = await state.kube.get(_path(*key))
    if body is not None and (body.get("status") or {}).get("autoscaling") is not None:
        await handlers._patch_status(state.kube, key[0], key[1], {"autoscaling": None})
    state.autoscaling.pop(key, None)


def _path(namespace: str, name: str) -> str:
    return handlers._md_path(namespace, name)


def _spec(body: Mapping[str, Any]) -> ModelDeploymentSpec | None:
    try:
        return ModelDeploymentSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return None  # the reconcile reports it


def _serving(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The serving plan, or None when nothing serves (not planned yet, does not fit, invalid)."""
    status: Mapping[str, Any] = body.get("status") or {}
    plan: Mapping[str, Any] = status.get("plan") or {}
    if not plan.get("fits") or status.get("phase") in (Phase.INVALID, Phase.UNSCHEDULABLE):
        return None
    return plan


async def autoscale_key(state: handlers.OperatorState, key: Key, session: aiohttp.ClientSession) -> None:
    namespace, name = key
    if key not in state.autoscaled:
        if key in state.autoscaling:
            await _stop(state, key)
        return
    body = await state.kube.get(_path(namespace, name))
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        state.autoscaled.discard(key)
        state.autoscaling.pop(key, None)
        metrics.forget_autoscaling(namespace, name)
        return
    spec = _spec(body)
    if spec is None:
        return
    if not spec.autoscaling.enabled:
        state.autoscaled.discard(key)
        await _stop(state, key)
        return
    serving = _serving(body)
    if serving is None:
        return
    policy = policy_of(spec)
    memory: Memory = state.autoscaling.setdefault(key, Memory())

    pods = await state.kube.request(
        "GET", f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": selector_string(name)}
    )
    targets = ready_targets((pods or {}).get("items") or [], spec.service.port)
    result = await scrape(session, targets, state.scrape_timeout_seconds)
    await _report_failures(body, memory, result)
    slots = int(serving.get("numParallel") or 0) or max(
        (int(r.slots) for r in result.loads.values()), default=1
    )
    observed = observation(result, slots)
    now = time.monotonic()
    if observed.reporting or observed.missing:  # no ready replica: no signal, nothing recorded
        memory.record(recommend(observed, policy, now), policy, state.autoscale_seconds)

    async with state.lock_for(namespace, name):
        body = await state.kube.get(_path(namespace, name))
        spec = _spec(body) if body is not None else None
        serving = _serving(body) if body is not None else None
        if body is None or spec is None or serving is None or not spec.autoscaling.enabled:
            return
        await _decide_and_apply(state, body, spec, memory, observed, now)


async def _decide_and_apply(
    state: handlers.OperatorState,
    body: Mapping[str, Any],
    spec: ModelDeploymentSpec,
    memory: Memory,
    observed: Observation,
    now: float,
) -> None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    status: Mapping[str, Any] = body.get("status") or {}
    before: Mapping[str, Any] = status.get("autoscaling") or {}
    policy = policy_of(spec)
    current = spec.replicas
    capacity = await _capacity(state, body, spec)
    decision = decide(memory.history, policy, current, now, capacity.replicas, observed_since=memory.since)
    replicas = current if capacity.hold else decision.replicas
    closest: str | None = None
    shortfall = 0
    message = _sentence(observed, policy, decision, current, replicas)
    if capacity.hold:
        message += f"; held at {current}: {capacity.hold}"
    elif decision.limited_by == LimitedBy.CAPACITY:
        closest, shortfall, why = await _one_more(state, body, spec, replicas)
        message += f"; {why}"

    last_scale = before.get("lastScaleTime")
    if replicas != current:
        patch = {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "spec": {"replicas": replicas}}
        try:
            await state.kube.merge_patch(_path(namespace, name), patch)
        except ApiError as error:
            if error.status in (404, 409):  # deleted, or changed since read: decide again next period
                log.info("%s/%s: not scaled (%s); deciding again next period", namespace, name, error)
                return
            raise
        last_scale = handlers._now()
        direction = "up" if replicas > current else "down"
        metrics.AUTOSCALING_SCALES.labels(direction).inc()
        log.info("%s/%s: scaled %s from %d to %d: %s", namespace, name, direction, current, replicas, message)
        await handlers._event(
            body, "Normal", "Scaled", f"scaled from {current} to {replicas} replicas: {message}"
        )

    new = AutoscalingStatus.model_validate(
        {
            "observed": ObservedLoad(
                busy=round(observed.busy),
                queued=round(observed.queued),
                slots_per_replica=observed.slots_per_replica,
                reporting=observed.reporting,
                missing=observed.missing,
            ),
            "desired": decision.desired,
            "current": replicas,
            "limitedBy": decision.limited_by.value,
            "capacity": capacity.replicas,
            "closestNode": closest,
            "shortfallBytes": shortfall,
            "message": message,
            "lastScaleTime": last_scale,
        }
    )
    dumped = new.model_dump(by_alias=True)
    await handlers._patch_status(state.kube, namespace, name, {"autoscaling": dumped}, status)
    if decision.limited_by == LimitedBy.CAPACITY and before.get("limitedBy") != LimitedBy.CAPACITY:
        await handlers._event(body, "Warning", "AutoscalingAtCapacity", message)
    _set_gauges(namespace, name, observed, decision, replicas)


def _sentence(observed: Observation, policy: Policy, decision: Decision, current: int, replicas: int) -> str:
    load = f"{observed.busy:g} busy + {observed.queued:g} queued on {observed.reporting} replica(s)"
    if observed.missing:
        load += f" ({observed.missing} not reporting)"
    per = f"{policy.target_utilization:.0%} of {observed.slots_per_replica} slots"
    sentence = f"{load}; the load asks for {decision.desired} at {per}"
    if decision.limited_by == LimitedBy.MAX:
        sentence += f"; limited by maxReplicas {policy.max_replicas}"
    elif decision.limited_by == LimitedBy.CAPACITY:
        sentence += f"; limited by capacity to {replicas}"
    elif replicas == current and decision.desired != current:
        sentence += f"; stays at {current} within the stabilisation windows and bounds"
    return sentence


async def _capacity(
    state: handlers.OperatorState, body: Mapping[str, Any], spec: ModelDeploymentSpec
) -> Capacity:
    """How many replicas the serving GPU class can host, from the same plan a reconcile would make
    now; a hold when that plan differs from the serving one (see the module docstring)."""
    plan = await _plan(state, body, spec, spec)
    if isinstance(plan, str):
        return Capacity(hold=f"cannot plan: {plan}")
    status: Mapping[str, Any] = body.get("status") or {}
    serving: Mapping[str, Any] = status.get("plan") or {}
    model = await state.model_info(spec)
    _extra, host_reserve = reserves_for(status, spec)
    planned = plan_status(plan, spec, host=host_bytes(model, plan), host_reserve=host_reserve)
    if not plan.fits or planned.hash != serving.get("hash"):
        verdict = plan.reason if plan.fits else f"it would not fit: {plan.reason}"
        return Capacity(
            hold="a plan for the current GPU inventory differs from the serving one, and changing the "
            f"replicas would apply it and restart every replica ({verdict})"
        )
    return Capacity(replicas=plan.replicas_possible)


async def _plan(
    state: handlers.OperatorState,
    body: Mapping[str, Any],
    spec: ModelDeploymentSpec,
    request: ModelDeploymentSpec,
    *,
    held: list[dict[str, Any]] | None = None,
) -> Plan | str:
    """``request`` planned as the reconcile plans ``spec`` (its reserve, the serving product
    preferred, its own pods counted as free); ``held``: more pods holding GPUs. A string says why
    there is no plan."""
    meta = body["metadata"]
    status: Mapping[str, Any] = body.get("status") or {}
    serving: Mapping[str, Any] = status.get("plan") or {}
    try:
        model = await state.model_info(spec)
    except (handlers.ModelURLRefused, UnsupportedModelError, ModelSourceError) as error:
        return str(error)
    extra, _host_reserve = reserves_for(status, spec)
    return compute_plan(
        request,
        model,
        handlers._current_nodes(),
        extra,
        pods=[*state.gpu_pods.values(), *(held or [])],
        owner=(meta["namespace"], meta["name"]),
        prefer_product=serving.get("gpuProduct"),
    )


def _holder(node: str, gpus: int, resource: str) -> dict[str, Any]:
    """A pod that holds ``gpus`` GPUs on ``node``, as the inventory keeps pods (inventory.trim_pod)."""
    return {
        "metadata": {"namespace": "", "labels": {}},
        "spec": {"nodeName": node, "containers": [{"resources": {"limits": {resource: str(gpus)}}}]},
        "status": {"phase": "Running"},
    }


async def _one_more(
    state: handlers.OperatorState, body: Mapping[str, Any], spec: ModelDeploymentSpec, replicas: int
) -> tuple[str | None, int, str]:
    """(closest node shape, its shortfall, a sentence) for one replica more than ``replicas``: the
    planner over the GPUs left free once ``replicas`` are placed as the plan places them (whether
    their pods are bound yet or not)."""
    placed = await _plan(state, body, spec, spec.model_copy(update={"replicas": replicas}))
    if isinstance(placed, str):
        return None, 0, f"no plan for another replica: {placed}"
    if placed.gpus_per_replica == 0:
        return None, 0, "every node that may run a CPU replica runs one already"
    held = [
        _holder(node, count * placed.gpus_per_replica, spec.gpu.resource_name)
        for node, count in placed.placement.items()
    ]
    plan = await _plan(state, body, spec, spec.model_copy(update={"replicas": 1}), held=held)
    if isinstance(plan, str):
        return None, 0, f"no plan for another replica: {plan}"
    serving = ((body.get("status") or {}).get("plan") or {}).get("gpuProduct")
    if plan.fits:
        where = f"{plan.node_shape} ({', '.join(plan.nodes)})"
        return (
            plan.node_shape,
            0,
            f"another replica would fit only on {where}, not on the {serving} GPUs the replicas run on "
            "(moving there would restart every replica: change the spec to do it)",
        )
    if plan.closest_node is None:
        return None, 0, f"no free GPU for another replica ({plan.reason})"
    return (
        plan.closest_node,
        plan.shortfall_bytes,
        f"another replica does not fit: the closest node shape {plan.closest_node} lacks "
        f"{format_bytes(plan.shortfall_bytes)}",
    )


async def _report_failures(body: Mapping[str, Any], memory: Memory, result: Scrape) -> None:
    """Log a replica that stops answering once, with an event; and once again when it recovers."""
    meta = body["metadata"]
    for pod, why in result.failures.items():
        metrics.AUTOSCALING_SCRAPE_FAILURES.inc()
        if pod in memory.failing:
            continue
        message = (
            f"cannot read the load of ready pod {pod} ({why}): counted as idle for scaling up and as "
            "fully busy for scaling down until it answers"
        )
        log.warning("%s/%s: %s", meta["namespace"], meta["name"], message)
        await handlers._event(body, "Warning", "ReplicaMetricsUnavailable", message)
    for pod in [p for p in memory.failing if p not in result.failures]:
        if pod in result.loads:
            log.info("%s/%s: pod %s reports its load again", meta["namespace"], meta["name"], pod)
    memory.failing = dict(result.failures)


def _set_gauges(namespace: str, name: str, observed: Observation, decision: Decision, replicas: int) -> None:
    metrics.AUTOSCALING_DESIRED.labels(namespace, name).set(decision.desired)
    metrics.AUTOSCALING_REPLICAS.labels(namespace, name).set(replicas)
    for reason in metrics.LIMITS:
        metrics.AUTOSCALING_LIMITED.labels(namespace, name, reason).set(
            1 if decision.limited_by.value == reason else 0
        )
    values = {
        "busy": observed.busy,
        "queued": observed.queued,
        "slots": observed.reporting * observed.slots_per_replica,
        "reporting": observed.reporting,
        "missing": observed.missing,
    }
    for signal in metrics.SIGNALS:
        metrics.AUTOSCALING_OBSERVED.labels(namespace, name, signal).set(values[signal])
