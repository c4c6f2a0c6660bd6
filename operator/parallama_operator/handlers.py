"""kopf handlers: the only place with I/O. They read, call the pure planner and builders, apply, and
write status and events.

Flow:

* ``gpu_nodes`` indexes Nodes (trimmed to what the planner reads); ``node_changed`` bumps an
  inventory version only when a trimmed Node really changed, so kubelet heartbeats cost nothing;
* ``reconcile_handler`` (create, resume, spec update) plans and applies;
* ``replanner`` (one daemon per ModelDeployment) waits for inventory changes, lets them settle
  (debounce), and re-plans; the Deployment rolls only if the plan hash changed;
* ``pod_event`` turns OOM kills or slot shortfalls into extra reserve and a re-plan;
* ``deployment_event`` mirrors the Deployment's readiness into status.

Every reconcile of one object holds that object's lock, so the daemon, the handlers and pod events
never interleave their read-plan-apply-patch sequences.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from parallama_runtime.planning.model_info import (
    ModelInfo,
    ModelSourceError,
    UnsupportedModelError,
    read_model_info,
)
from pydantic import ValidationError

from . import metrics
from .builders import (
    DEFAULT_RUNTIME_IMAGE,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODEL_DEPLOYMENT_LABEL,
    Owner,
    build_all,
    selector_string,
)
from .health import runtime_troubles
from .inventory import trim_node
from .kube import ApiError, KubeClient, resource_path
from .planning import (
    compute_plan,
    model_from_metadata,
    next_extra_reserve,
    phase_for,
    plan_status,
    set_condition,
)
from .resources import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    Condition,
    ModelDeploymentSpec,
    Phase,
    PlanStatus,
)

__all__ = ["STATE", "OperatorState", "reconcile"]

log = logging.getLogger(__name__)
MAX_TROUBLES_KEPT = 20


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class OperatorState:
    """Per-process state, rebuilt at every operator start (tests start several in one process)."""

    client: KubeClient | None = None
    default_image: str = DEFAULT_RUNTIME_IMAGE
    default_pull_policy: str | None = None
    debounce_seconds: float = 5.0
    resync_seconds: float = 300.0
    inventory_version: int = 0
    nodes_seen: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[tuple[str, str | None], ModelInfo] = field(default_factory=dict)
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    model_locks: dict[tuple[str, str | None], asyncio.Lock] = field(default_factory=dict)

    inventory_changed: asyncio.Event = field(default_factory=asyncio.Event)

    def bump_inventory(self) -> None:
        """Wake every waiting daemon: set this generation's event and start a new one."""
        self.inventory_version += 1
        self.inventory_changed.set()
        self.inventory_changed = asyncio.Event()

    async def wait_inventory_change(self, seen: int, stopped: kopf.DaemonStopped, *, within: float) -> None:
        """Until the inventory moves past ``seen``, the daemon is stopped, or ``within`` seconds pass."""
        if self.inventory_version != seen or stopped:
            return
        waiters = {
            asyncio.ensure_future(self.inventory_changed.wait()),
            asyncio.ensure_future(stopped.wait()),
        }
        try:
            await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def lock_for(self, namespace: str, name: str) -> asyncio.Lock:
        return self.locks.setdefault((namespace, name), asyncio.Lock())

    @property
    def kube(self) -> KubeClient:
        if self.client is None:
            raise kopf.TemporaryError("the operator has not started yet", delay=5)
        return self.client

    async def model_info(self, spec: ModelDeploymentSpec) -> ModelInfo:
        """Metadata wins; otherwise the header, read once per (URI, sha256) and never in the loop:
        a Range read of a big header over a slow link must not stall every other handler."""
        explicit = model_from_metadata(spec)
        if explicit is not None:
            return explicit
        key = (spec.model.uri, spec.model.sha256)
        async with self.model_locks.setdefault(key, asyncio.Lock()):
            if key not in self.models:
                self.models[key] = await asyncio.to_thread(read_model_info, spec.model.uri)
            return self.models[key]


STATE = OperatorState()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _event_body(body: Mapping[str, Any]) -> kopf.Body:
    return kopf.Body(cast(Any, dict(body)))


def _md_path(namespace: str, name: str) -> str:
    return resource_path(API_VERSION, KIND, namespace, name)


# --------------------------------------------------------------------------------------------------
# lifecycle


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # One replica, no peering objects (and no RBAC for them); see docs/operator.md.
    settings.peering.standalone = True
    # Progress and diff-base in our own annotations: status.kopf would be pruned by the schema.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    global STATE
    STATE = OperatorState(
        client=KubeClient.from_environment(),
        default_image=os.environ.get("PARALLAMA_RUNTIME_IMAGE", DEFAULT_RUNTIME_IMAGE),
        default_pull_policy=os.environ.get("PARALLAMA_RUNTIME_IMAGE_PULL_POLICY") or None,
        debounce_seconds=_env_float("PARALLAMA_REPLAN_DEBOUNCE_SECONDS", 5.0),
        resync_seconds=_env_float("PARALLAMA_RESYNC_SECONDS", 300.0),
    )


@kopf.on.cleanup()
async def close_client(**_: Any) -> None:
    if STATE.client is not None:
        await STATE.client.close()


# --------------------------------------------------------------------------------------------------
# node inventory


@kopf.index("", "v1", "nodes")
def gpu_nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    return {name: trim_node(body)}


@kopf.on.event("", "v1", "nodes")
def node_changed(type: str, name: str, body: kopf.Body, **_: Any) -> None:
    trimmed = trim_node(body)
    if type == "DELETED":
        if STATE.nodes_seen.pop(name, None) is not None:
            STATE.bump_inventory()
    elif STATE.nodes_seen.get(name) != trimmed:
        STATE.nodes_seen[name] = trimmed
        STATE.bump_inventory()


def _inventory(index: kopf.Index[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [node for _name, store in index.items() for node in store]


# --------------------------------------------------------------------------------------------------
# reconcile


async def _service_monitors_available(client: KubeClient) -> bool:
    try:
        doc = await client.request("GET", "/apis/monitoring.coreos.com/v1")
    except ApiError as error:
        if error.status == 404:
            return False
        raise
    return any(r.get("name") == "servicemonitors" for r in (doc or {}).get("resources", []))


def _covers(existing: Any, desired: Any) -> bool:
    """Whether ``existing`` already holds every value of ``desired`` (server defaults may add more)."""
    if isinstance(desired, Mapping):
        return isinstance(existing, Mapping) and all(_covers(existing.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(existing, list)
            and len(existing) == len(desired)
            and all(_covers(e, d) for e, d in zip(existing, desired, strict=True))
        )
    return bool(existing == desired)


async def apply(client: KubeClient, obj: Mapping[str, Any], owner_uid: str) -> dict[str, Any]:
    """Create, or merge-patch when it differs; never adopt an object another owner controls."""
    meta = obj["metadata"]
    base = resource_path(obj["apiVersion"], obj["kind"], meta["namespace"])
    path = f"{base}/{meta['name']}"
    existing = await client.get(path)
    if existing is None:
        try:
            return await client.create(base, obj)
        except ApiError as error:
            if error.status != 409:
                raise
            existing = await client.get(path)  # created meanwhile (a restart, a race): patch it
            if existing is None:
                raise
    owners = (existing.get("metadata") or {}).get("ownerReferences") or []
    if owners and not any(o.get("uid") == owner_uid for o in owners):
        raise kopf.PermanentError(f"{obj['kind']} {meta['name']} exists and belongs to someone else")
    if _covers(existing, obj):
        return existing
    return await client.merge_patch(path, obj)


async def _delete_if_owned(
    client: KubeClient, api_version: str, kind: str, ns: str, name: str, uid: str
) -> None:
    path = resource_path(api_version, kind, ns, name)
    try:
        existing = await client.get(path)
    except ApiError as error:
        if error.status == 404:  # the API itself is absent (no ServiceMonitor CRD)
            return
        raise
    owners = ((existing or {}).get("metadata") or {}).get("ownerReferences") or []
    if existing is not None and any(o.get("uid") == uid for o in owners):
        await client.delete(path)


def _condition_true(status: Mapping[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in status.get("conditions") or [])


async def _patch_status(client: KubeClient, namespace: str, name: str, status: Mapping[str, Any]) -> None:
    try:
        await client.merge_patch(_md_path(namespace, name) + "/status", {"status": dict(status)})
    except ApiError as error:
        if error.status != 404:  # deleted meanwhile: nothing to report to
            raise


async def _mark_invalid(body: Mapping[str, Any], reason: str, message: str) -> None:
    meta = body["metadata"]
    status = body.get("status") or {}
    already = status.get("phase") == Phase.INVALID and status.get("message") == message
    conditions = set_condition(
        status.get("conditions") or [],
        Condition(
            type="Planned",
            status="False",
            reason=reason,
            message=message,
            observed_generation=meta.get("generation"),
        ),
        _now(),
    )
    await _patch_status(
        STATE.kube,
        meta["namespace"],
        meta["name"],
        {
            "phase": Phase.INVALID.value,
            "message": message,
            "observedGeneration": meta.get("generation"),
            "conditions": conditions,
        },
    )
    if not already:
        kopf.warn(_event_body(body), reason=reason, message=message)
    metrics.RECONCILES.labels("invalid").inc()


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item.get("loc", ()))
        parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "invalid spec: " + "; ".join(parts)


async def reconcile(body: Mapping[str, Any], nodes: Iterable[Mapping[str, Any]], *, trigger: str) -> None:
    """Plan, apply the children, write status and events. ``trigger`` is spec | nodes | runtime."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    status: Mapping[str, Any] = body.get("status") or {}
    started = time.monotonic()
    try:
        spec = ModelDeploymentSpec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        await _mark_invalid(body, "InvalidSpec", _validation_message(error))
        return
    try:
        model = await STATE.model_info(spec)
    except UnsupportedModelError as error:
        await _mark_invalid(body, "UnsupportedModel", str(error))
        return
    except ModelSourceError as error:
        await _mark_invalid(body, "ModelUnreadable", str(error))
        return

    client = STATE.kube
    extra = int(status.get("extraReserveBytes") or 0)
    plan = compute_plan(spec, model, nodes, extra)
    if plan.refused:  # llama.cpp would refuse these settings on any node: a spec error, not capacity
        await _mark_invalid(body, "UnsupportedSettings", plan.reason)
        return
    planned = plan_status(plan, spec)
    metrics.PLANS.labels(str(plan.fits).lower()).inc()
    previous: Mapping[str, Any] = status.get("plan") or {}
    changed = previous.get("hash") != planned.hash

    desired = spec.replicas if plan.fits else 0
    ready = observed = 0
    owner = Owner(name=name, namespace=namespace, uid=uid)
    if plan.fits:
        monitors = spec.monitoring.service_monitor and await _service_monitors_available(client)
        applied = [
            await apply(client, child, uid)
            for child in build_all(
                owner,
                spec,
                planned,
                service_monitor_available=monitors,
                default_image=STATE.default_image,
                default_pull_policy=STATE.default_pull_policy,
            )
        ]
        deployment_status = applied[0].get("status") or {}
        ready = int(deployment_status.get("readyReplicas") or 0)
        observed = int(deployment_status.get("replicas") or 0)
        if spec.replicas <= 1:
            await _delete_if_owned(client, "policy/v1", "PodDisruptionBudget", namespace, name, uid)
        if not monitors:
            await _delete_if_owned(client, "monitoring.coreos.com/v1", "ServiceMonitor", namespace, name, uid)
    else:
        # no pods for a model that cannot fit: they would OOM or sit Pending forever
        path = resource_path("apps/v1", "Deployment", namespace, name)
        existing = await client.get(path)
        if existing is not None and (existing.get("spec") or {}).get("replicas", 0) != 0:
            await client.merge_patch(path, {"spec": {"replicas": 0}})

    # a Degraded condition lasts until a different plan answers it
    degraded = _condition_true(status, "Degraded") and not changed
    phase = phase_for(fits=plan.fits, desired=desired, ready=ready, degraded=degraded)
    now = _now()
    gen = meta.get("generation")
    conditions: list[dict[str, Any]] = list(status.get("conditions") or [])
    planned_condition = (
        Condition(type="Planned", status="True", reason="Fits", message=plan.reason, observed_generation=gen)
        if plan.fits
        else Condition(
            type="Planned",
            status="False",
            reason="Unschedulable",
            message=plan.reason,
            observed_generation=gen,
        )
    )
    conditions = set_condition(conditions, planned_condition, now)
    conditions = set_condition(conditions, _available(ready, desired), now)
    conditions = set_condition(conditions, _progressing(ready, desired), now)
    if not degraded:
        reason = "Replanned" if _condition_true(status, "Degraded") else "AsPlanned"
        conditions = set_condition(conditions, Condition(type="Degraded", status="False", reason=reason), now)
    new_status = {
        "phase": phase.value,
        "observedGeneration": gen,
        "message": plan.reason,
        "plan": planned.model_dump(by_alias=True),
        "replicas": observed,
        "readyReplicas": ready,
        "selector": selector_string(name),
        "endpoint": f"http://{name}.{namespace}.svc:{spec.service.port}" if plan.fits else None,
        "conditions": conditions,
    }
    await _patch_status(client, namespace, name, new_status)

    metrics.PLANNED_SLOTS.labels(namespace, name).set(plan.num_parallel if plan.fits else 0)
    metrics.PLANNED_GPUS.labels(namespace, name).set(plan.gpus_per_replica if plan.fits else 0)
    result = "ok" if plan.fits else "unschedulable"
    metrics.RECONCILES.labels(result).inc()
    metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    if not plan.fits:
        if changed or status.get("phase") != Phase.UNSCHEDULABLE:
            kopf.warn(_event_body(body), reason="Unschedulable", message=plan.reason)
    elif changed:
        if previous and trigger != "spec":
            metrics.REPLANS.inc()
            before = f"{previous.get('numParallel')} slots on {previous.get('gpusPerReplica')} GPU(s)"
            message = f"after a {trigger} change (was {before}): {plan.reason}"
            kopf.info(_event_body(body), reason="Replanned", message=message)
        else:
            kopf.info(_event_body(body), reason="Planned", message=plan.reason)


def _available(ready: int, desired: int) -> Condition:
    if desired == 0:
        return Condition(type="Available", status="False", reason="NoReplicas", message="no replicas planned")
    if ready >= 1:
        return Condition(
            type="Available",
            status="True",
            reason="MinimumReplicasAvailable",
            message=f"{ready}/{desired} replicas ready",
        )
    return Condition(
        type="Available",
        status="False",
        reason="NoReplicaReady",
        message=f"0/{desired} replicas ready (loading the model takes a while)",
    )


def _progressing(ready: int, desired: int) -> Condition:
    if ready < desired:
        return Condition(
            type="Progressing",
            status="True",
            reason="RollingOut",
            message=f"{ready}/{desired} replicas ready",
        )
    return Condition(type="Progressing", status="False", reason="Complete", message="all replicas ready")


@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=10)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=10)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", backoff=10)
async def reconcile_handler(body: kopf.Body, **kwargs: Any) -> None:
    gpu_nodes: kopf.Index[str, dict[str, Any]] = kwargs["gpu_nodes"]
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    async with STATE.lock_for(namespace, name):
        try:
            # re-read under the lock: kopf's body may predate a status written by another handler
            fresh = await _fresh(namespace, name)
            if fresh is None:
                return
            await reconcile(fresh, _inventory(gpu_nodes), trigger="spec")
        except (TimeoutError, ApiError, OSError) as error:
            metrics.RECONCILES.labels("error").inc()
            raise kopf.TemporaryError(f"API call failed: {error}", delay=10) from error


async def _fresh(namespace: str, name: str) -> dict[str, Any] | None:
    return await STATE.kube.get(_md_path(namespace, name))


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def replanner(
    stopped: kopf.DaemonStopped,
    name: str,
    namespace: str | None,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    """Re-plan when the inventory settles after a change, and every resync period regardless."""
    gpu_nodes: kopf.Index[str, dict[str, Any]] = kwargs["gpu_nodes"]
    namespace = namespace or "default"
    seen = STATE.inventory_version
    last_run = time.monotonic()
    while not stopped:
        remaining = STATE.resync_seconds - (time.monotonic() - last_run)
        await STATE.wait_inventory_change(seen, stopped, within=max(remaining, 0.0))
        if stopped:
            return
        resync = time.monotonic() - last_run >= STATE.resync_seconds
        if STATE.inventory_version == seen and not resync:
            continue
        # debounce: a node pool scaling up sends a burst; plan once it has been quiet for a while
        while not resync and not stopped:
            version = STATE.inventory_version
            await STATE.wait_inventory_change(version, stopped, within=STATE.debounce_seconds)
            if STATE.inventory_version == version:
                break
        if stopped:
            return
        seen = STATE.inventory_version
        last_run = time.monotonic()
        async with STATE.lock_for(namespace, name):
            try:
                body = await _fresh(namespace, name)
                if body is None:
                    return
                await reconcile(body, _inventory(gpu_nodes), trigger="nodes")
            except (TimeoutError, ApiError, OSError) as error:
                metrics.RECONCILES.labels("error").inc()
                logger.warning(f"re-plan failed, will retry on the next change or resync: {error}")


# --------------------------------------------------------------------------------------------------
# runtime feedback


@kopf.on.event("", "v1", "pods", labels={MANAGED_BY_LABEL: MANAGED_BY})
async def pod_event(
    type: str,
    body: kopf.Body,
    namespace: str | None,
    **kwargs: Any,
) -> None:
    gpu_nodes: kopf.Index[str, dict[str, Any]] = kwargs["gpu_nodes"]
    if type == "DELETED" or STATE.client is None or not namespace:
        return
    owner = (body.get("metadata", {}).get("labels") or {}).get(MODEL_DEPLOYMENT_LABEL)
    if not owner:
        return
    async with STATE.lock_for(namespace, owner):
        md = await _fresh(namespace, owner)
        if md is None:
            return
        status = md.get("status") or {}
        plan_dict = status.get("plan")
        plan = PlanStatus.model_validate(plan_dict) if plan_dict else None
        seen = set(status.get("troubles") or [])
        fresh = [
            t for t in runtime_troubles(body, plan.num_parallel if plan else None) if t.signature not in seen
        ]
        if not fresh:
            return
        reserve = int(status.get("extraReserveBytes") or 0)
        for _t in fresh:
            reserve = next_extra_reserve(reserve, plan)
        ooms = sum(1 for t in fresh if t.reason == "OOMKilled")
        metrics.OOM_KILLS.inc(ooms)
        trouble = fresh[0]
        message = (
            f"{trouble.message}; keeping {reserve // (1024 * 1024)} MiB more free per GPU in the next plan"
        )
        conditions = set_condition(
            status.get("conditions") or [],
            Condition(type="Degraded", status="True", reason=trouble.reason, message=message),
            _now(),
        )
        update = {
            "phase": Phase.DEGRADED.value,
            "extraReserveBytes": reserve,
            "oomKills": int(status.get("oomKills") or 0) + ooms,
            "troubles": [*(status.get("troubles") or []), *(t.signature for t in fresh)][-MAX_TROUBLES_KEPT:],
            "conditions": conditions,
            "message": message,
        }
        await _patch_status(STATE.kube, namespace, owner, update)
        kopf.warn(_event_body(md), reason=trouble.reason, message=message)
        md.setdefault("status", {}).update(update)
        await reconcile(md, _inventory(gpu_nodes), trigger="runtime")


@kopf.on.event("apps", "v1", "deployments", labels={MANAGED_BY_LABEL: MANAGED_BY})
async def deployment_event(type: str, body: kopf.Body, namespace: str | None, **kwargs: Any) -> None:
    """Mirror readiness into status; recreate a Deployment someone deleted (its owner still wants it)."""
    if STATE.client is None or not namespace:
        return
    owner = (body.get("metadata", {}).get("labels") or {}).get(MODEL_DEPLOYMENT_LABEL)
    if not owner:
        return
    async with STATE.lock_for(namespace, owner):
        md = await _fresh(namespace, owner)
        if md is None or (md.get("metadata") or {}).get("deletionTimestamp"):
            return
        status = md.get("status") or {}
        plan = status.get("plan") or {}
        if not plan.get("fits"):
            return
        if type == "DELETED":
            gpu_nodes: kopf.Index[str, dict[str, Any]] = kwargs["gpu_nodes"]
            await reconcile(md, _inventory(gpu_nodes), trigger="spec")
            return
        desired = int((body.get("spec") or {}).get("replicas") or 0)
        observed = int((body.get("status") or {}).get("replicas") or 0)
        ready = int((body.get("status") or {}).get("readyReplicas") or 0)
        degraded = _condition_true(status, "Degraded")
        phase = phase_for(fits=True, desired=desired, ready=ready, degraded=degraded)
        unchanged = status.get("readyReplicas") == ready and status.get("replicas") == observed
        if unchanged and status.get("phase") == phase.value:
            return
        now = _now()
        conditions = set_condition(status.get("conditions") or [], _available(ready, desired), now)
        conditions = set_condition(conditions, _progressing(ready, desired), now)
        await _patch_status(
            STATE.kube,
            namespace,
            owner,
            {"phase": phase.value, "readyReplicas": ready, "replicas": observed, "conditions": conditions},
        )
