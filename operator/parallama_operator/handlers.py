"""kopf handlers: the only place with I/O. They read, call the pure planner and builders, apply, and
write status and events.

Flow:

* ``gpu_nodes`` indexes Nodes (trimmed to what the planner reads); ``node_changed`` bumps an
  inventory version only when a trimmed Node really changed, so kubelet heartbeats cost nothing;
* ``reconcile_handler`` (create, resume, spec update) plans and applies;
* ``replan_loop`` (one task per operator, started at startup) waits for inventory changes, lets them
  settle (debounce), and re-plans every known ModelDeployment; it also runs the retries of failed
  reconciles and the periodic resync;
* ``model_deployment_event`` keeps the set of known ModelDeployments and forgets deleted ones (their
  gauges too);
* ``pod_event`` turns what runtime pods report (OOMKilled, the runtime's termination reason) into
  a host or GPU reserve and a re-plan, or phase Invalid (see ``health``);
* ``deployment_event`` mirrors the Deployment's readiness into status;
* the autoscaler (:mod:`parallama_operator.autoscaler`, one task per operator, started at startup)
  reads the ready replicas' load of every ModelDeployment with ``spec.autoscaling.enabled`` and sets
  its ``spec.replicas``, which the reconcile then applies like any other spec change.

Every reconcile of one object holds that object's lock, so the loop, the handlers and pod events
never interleave their read-plan-apply-patch sequences.

No handler needs a finalizer (no per-object daemon or timer, no on.delete): children are garbage-collected
through their ownerReferences, so ``kubectl delete`` never waits for the operator. A failed reconcile
is not retried by kopf (whose retry is tied to the spec diff it started from, so a spec reverted
during a retry would be dropped) but by ``replan_loop``, which re-reads the current object each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
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
    APPLIED_HASH_ANNOTATION,
    DEFAULT_RUNTIME_IMAGE,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODEL_DEPLOYMENT_LABEL,
    Owner,
    build_all,
    selector_string,
    with_applied_hash,
)
from .health import OOM_KILLED, react, runtime_invalid, runtime_troubles, unschedulable_reason
from .inventory import trim_node, trim_pod
from .kube import FIELD_MANAGER, ApiError, KubeClient, resource_path
from .planning import (
    compute_plan,
    host_bytes,
    model_from_metadata,
    model_url_refusal,
    parse_url_allowlist,
    phase_for,
    plan_status,
    reserve_key,
    reserves_for,
    set_condition,
    user_sets_memory,
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
    name_error,
)

__all__ = ["STATE", "OperatorState", "reconcile"]

log = logging.getLogger(__name__)
MAX_TROUBLES_KEPT = 20
MAX_RETRY_SECONDS = 300.0
TRANSIENT = (TimeoutError, ApiError, OSError, aiohttp.ClientError)
"""Failures a later attempt may cure (a permanent ApiError on a child becomes :class:`ChildRefused`)."""
Key = tuple[str, str]


class ModelURLRefused(Exception):
    """The model URL is outside the operator's allowlist (``PARALLAMA_MODEL_URL_ALLOW``)."""


class ChildRefused(Exception):
    """The API server refused a child for good (4xx other than a conflict or a rate limit), or the
    child exists and belongs to someone else: retrying the same object cannot help."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        super().__init__(f"{kind} {name} was refused: {message}")


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
    retry_seconds: float = 10.0
    url_allow: tuple[str, ...] = ()
    inventory_version: int = 0
    nodes_seen: dict[str, dict[str, Any]] = field(default_factory=dict)
    unschedulable_reported: set[str] = field(default_factory=set)
    """Pod UIDs whose Unschedulable condition was reported (one event per pod)."""
    gpu_pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    """Every pod of the cluster that holds an NVIDIA resource, trimmed (inventory.trim_pod): GPUs
    they hold are not free for a plan. A pod change does not re-plan by itself."""
    models: dict[tuple[str, str | None], ModelInfo] = field(default_factory=dict)
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    model_locks: dict[tuple[str, str | None], asyncio.Lock] = field(default_factory=dict)
    known: set[Key] = field(default_factory=set)
    retries: dict[Key, tuple[float, int, str]] = field(default_factory=dict)
    """(due time on the monotonic clock, attempts so far, trigger) of each pending retry."""
    applied_shapes: dict[str, tuple[str, Any]] = field(default_factory=dict)
    """Per child path: (applied hash, the server's answer cut to the desired fields). Values the
    server normalises (``1.5Gi`` -> ``1536Mi``) then still count as unchanged."""
    node_index: Any = None
    loop_task: asyncio.Task[None] | None = None
    autoscale_seconds: float = 15.0
    """Period of the autoscaler (``PARALLAMA_AUTOSCALE_INTERVAL_SECONDS``)."""
    scrape_timeout_seconds: float = 2.0
    """How long one replica's /metrics may take (``PARALLAMA_AUTOSCALE_SCRAPE_TIMEOUT_SECONDS``)."""
    autoscaled: set[Key] = field(default_factory=set)
    """ModelDeployments whose spec.autoscaling.enabled is true (from the watch)."""
    autoscaling: dict[Key, Any] = field(default_factory=dict)
    """The autoscaler's memory per ModelDeployment (``autoscaler.Memory``): recent recommendations,
    replicas failing to report. In memory only: a restarted operator starts a fresh window."""
    autoscale_task: asyncio.Task[None] | None = None

    inventory_changed: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

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

    def schedule_retry(self, key: Key, trigger: str, attempts: int = 0) -> float:
        """Retry ``key`` later with exponential backoff after ``attempts`` failed retries; returns
        the delay."""
        delay = min(self.retry_seconds * 2.0**attempts, MAX_RETRY_SECONDS)
        self.retries[key] = (time.monotonic() + delay, attempts + 1, trigger)
        self.wake.set()
        return delay

    def forget(self, key: Key) -> None:
        self.known.discard(key)
        self.retries.pop(key, None)
        self.autoscaled.discard(key)
        self.autoscaling.pop(key, None)
        prefix = f"/namespaces/{key[0]}/"
        suffix = f"/{key[1]}"
        for path in [p for p in self.applied_shapes if prefix in p and p.endswith(suffix)]:
            del self.applied_shapes[path]

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
        refusal = model_url_refusal(spec.model.uri, self.url_allow)
        if refusal is not None:
            raise ModelURLRefused(refusal)
        key = (spec.model.uri, spec.model.sha256)
        async with self.model_locks.setdefault(key, asyncio.Lock()):
            if key not in self.models:
                self.models[key] = await asyncio.to_thread(read_model_info, spec.model.uri)
            return self.models[key]


STATE = OperatorState()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _event(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    """Post an Event about a ModelDeployment ourselves: kopf's posting works only inside its own
    per-object tasks, and the replan loop is not one. Best effort: a lost event never fails a
    reconcile."""
    meta = body["metadata"]
    namespace = meta["namespace"]
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": meta["name"],
            "namespace": namespace,
            "uid": meta.get("uid"),
        },
        "type": kind,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": MANAGED_BY},
        "reportingComponent": MANAGED_BY,
        "reportingInstance": os.environ.get("HOSTNAME", MANAGED_BY),
        "firstTimestamp": _now(),
        "lastTimestamp": _now(),
        "count": 1,
    }
    try:
        await STATE.kube.create(f"/api/v1/namespaces/{namespace}/events", event)
    except TRANSIENT as error:
        log.warning("could not post the %s event of %s/%s: %s", reason, namespace, meta["name"], error)


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
    # Named for the ModelDeployments that an older version finalized: kopf removes a finalizer no
    # handler needs any more, and no handler here needs one (see the module docstring).
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
        retry_seconds=_env_float("PARALLAMA_RETRY_SECONDS", 10.0),
        url_allow=parse_url_allowlist(os.environ.get("PARALLAMA_MODEL_URL_ALLOW")),
        autoscale_seconds=max(_env_float("PARALLAMA_AUTOSCALE_INTERVAL_SECONDS", 15.0), 0.1),
        scrape_timeout_seconds=max(_env_float("PARALLAMA_AUTOSCALE_SCRAPE_TIMEOUT_SECONDS", 2.0), 0.1),
    )
    STATE.loop_task = asyncio.create_task(replan_loop(STATE), name="parallama-replan-loop")
    from .autoscaler import autoscale_loop  # it builds on this module's helpers

    STATE.autoscale_task = asyncio.create_task(autoscale_loop(STATE), name="parallama-autoscaler")


@kopf.on.cleanup()
async def close_client(**_: Any) -> None:
    for task in (STATE.loop_task, STATE.autoscale_task):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    STATE.loop_task = STATE.autoscale_task = None
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


@kopf.on.event("", "v1", "pods")
def gpu_pod_changed(type: str, name: str, namespace: str | None, body: kopf.Body, **_: Any) -> None:
    key = (namespace or "", name)
    trimmed = None if type == "DELETED" else trim_pod(body)
    if trimmed is None:
        STATE.gpu_pods.pop(key, None)
    else:
        STATE.gpu_pods[key] = trimmed


def _inventory(index: kopf.Index[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [node for _name, store in index.items() for node in store]


# --------------------------------------------------------------------------------------------------
# reconcile


async def _served(client: KubeClient, group_version: str, plural: str) -> bool:
    """Whether the API server serves ``plural`` in ``group_version`` (discovery)."""
    try:
        doc = await client.request("GET", f"/apis/{group_version}")
    except ApiError as error:
        if error.status == 404:
            return False
        raise
    return any(r.get("name") == plural for r in (doc or {}).get("resources", []))


async def _service_monitors_available(client: KubeClient) -> bool:
    return await _served(client, "monitoring.coreos.com/v1", "servicemonitors")


NO_PDB_MESSAGE = (
    "no PodDisruptionBudget: this API server does not serve policy/v1 (Kubernetes before 1.21); "
    "voluntary disruptions such as a drain may evict all replicas at once"
)


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


def _cut(obj: Any, shape: Any) -> Any:
    """``obj`` cut down to the paths of ``shape`` (the server's values of the fields we set)."""
    if isinstance(shape, Mapping) and isinstance(obj, Mapping):
        return {k: _cut(obj.get(k), v) for k, v in shape.items()}
    if isinstance(shape, list) and isinstance(obj, list) and len(obj) == len(shape):
        return [_cut(o, v) for o, v in zip(obj, shape, strict=True)]
    return obj


def _applied_by_us(existing: Mapping[str, Any]) -> bool:
    fields = (existing.get("metadata") or {}).get("managedFields") or []
    return any(f.get("manager") == FIELD_MANAGER and f.get("operation") == "Apply" for f in fields)


def _unchanged(path: str, existing: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Skip the apply when (1) the child carries the hash of this very desired object, (2) the field
    manager ``parallama`` applied it (so a later apply still removes what we drop), and (3) nobody
    changed our values since: they equal the desired ones, or what the server answered to our last
    apply of this hash (values it normalises). A hash alone would miss a ``kubectl edit``; values
    alone would miss fields that must be removed and repeat no-op applies for normalised values."""
    wanted = desired["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]
    annotations = (existing.get("metadata") or {}).get("annotations") or {}
    if annotations.get(APPLIED_HASH_ANNOTATION) != wanted or not _applied_by_us(existing):
        return False
    if _covers(existing, desired):
        return True
    remembered = STATE.applied_shapes.get(path)
    return remembered is not None and remembered[0] == wanted and _covers(existing, remembered[1])


async def apply(client: KubeClient, obj: Mapping[str, Any], owner_uid: str) -> dict[str, Any]:
    """Server-side apply (field manager ``parallama``, forced) unless nothing changed; never adopt
    an object another owner controls. Raises :class:`ChildRefused` when the API server refuses
    the object itself (a 4xx no retry can cure)."""
    meta = obj["metadata"]
    path = resource_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
    desired = with_applied_hash(obj)
    existing = await client.get(path)
    if existing is not None:
        owners = (existing.get("metadata") or {}).get("ownerReferences") or []
        if owners and not any(o.get("uid") == owner_uid for o in owners):
            raise ChildRefused(obj["kind"], meta["name"], "it exists and belongs to someone else")
        if _unchanged(path, existing, desired):
            return existing
    try:
        result = await client.apply(path, desired)
    except ApiError as error:
        if error.permanent:
            raise ChildRefused(obj["kind"], meta["name"], str(error)) from error
        raise
    wanted = desired["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]
    STATE.applied_shapes[path] = (wanted, _cut(result, desired))
    return result


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


async def _patch_status(
    client: KubeClient,
    namespace: str,
    name: str,
    status: Mapping[str, Any],
    current: Mapping[str, Any] | None = None,
) -> None:
    """Merge-patch the status subresource, unless ``current`` (the status read) already says it all."""
    if current is not None and _covers(dict(current), dict(status)):
        return
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
        status,
    )
    if not already:
        await _event(body, "Warning", reason, message)
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
    invalid_name = name_error(name)
    if invalid_name is not None:  # the CRD refuses it too; an older CRD may not
        await _mark_invalid(body, "InvalidName", invalid_name)
        return
    try:
        spec = ModelDeploymentSpec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        await _mark_invalid(body, "InvalidSpec", _validation_message(error))
        return
    try:
        model = await STATE.model_info(spec)
    except ModelURLRefused as error:
        await _mark_invalid(body, "ModelURLRefused", str(error))
        return
    except UnsupportedModelError as error:
        await _mark_invalid(body, "UnsupportedModel", str(error))
        return
    except ModelSourceError as error:
        await _mark_invalid(body, "ModelUnreadable", str(error))
        return

    verdict = runtime_invalid(status, meta.get("generation"))
    if verdict is not None:  # the runtime said no plan can serve this spec: wait for a spec change
        await _mark_invalid(body, *verdict)
        return

    client = STATE.kube
    extra, host_reserve = reserves_for(status, spec)
    reset = (extra, host_reserve) == (0, 0) and status.get("reserveKey") not in (None, reserve_key(spec))
    serving_plan: Mapping[str, Any] = status.get("plan") or {}
    plan = compute_plan(
        spec,
        model,
        nodes,
        extra,
        pods=list(STATE.gpu_pods.values()),
        owner=(namespace, name),
        prefer_product=serving_plan.get("gpuProduct") if serving_plan.get("fits") else None,
    )
    if plan.refused:  # llama.cpp would refuse these settings on any node: a spec error, not capacity
        await _mark_invalid(body, "UnsupportedSettings", plan.reason)
        return
    planned = plan_status(plan, spec, host=host_bytes(model, plan), host_reserve=host_reserve)
    metrics.PLANS.labels(str(plan.fits).lower()).inc()
    previous: Mapping[str, Any] = status.get("plan") or {}
    changed = previous.get("hash") != planned.hash
    if trigger == "nodes" and changed and previous.get("fits") and (status.get("readyReplicas") or 0) > 0:
        # inventory churn (a cordon, a NotReady blip, GPUs taken by others) never takes serving
        # capacity away: the serving plan stays, with maxSurge 0 any roll would stop pods before
        # their replacements are ready; only a spec change re-plans it
        await _hold_serving_plan(body, plan)
        return

    desired = spec.replicas if plan.fits else 0
    ready = observed = 0
    owner = Owner(name=name, namespace=namespace, uid=uid)
    if plan.fits:
        monitors = spec.monitoring.service_monitor and await _service_monitors_available(client)
        pdbs = spec.replicas <= 1 or await _served(client, "policy/v1", "poddisruptionbudgets")
        children = build_all(
            owner,
            spec,
            planned,
            service_monitor_available=monitors,
            pdb_available=pdbs,
            default_image=STATE.default_image,
            default_pull_policy=STATE.default_pull_policy,
        )
        try:
            applied = [await apply(client, child, uid) for child in children]
        except ChildRefused as error:
            log.error("%s/%s: %s", namespace, name, error)
            await _mark_invalid(body, "ChildRefused", str(error))
            return
        deployment_status = applied[0].get("status") or {}
        ready = int(deployment_status.get("readyReplicas") or 0)
        observed = int(deployment_status.get("replicas") or 0)
        if spec.replicas <= 1:  # an absent policy/v1 reads as 404: nothing to delete
            await _delete_if_owned(client, "policy/v1", "PodDisruptionBudget", namespace, name, uid)
        if not pdbs and changed:
            await _event(body, "Normal", "NoPodDisruptionBudget", NO_PDB_MESSAGE)
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
    phase = phase_for(
        fits=plan.fits, desired=desired, ready=ready, degraded=degraded, placed=plan.replicas_placed
    )
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
    if reset:  # learned under another spec: this one starts from the plain estimate
        new_status.update(extraReserveBytes=0, hostReserveBytes=0, reserveKey=None)
    if status.get("runtimeFailure"):  # of an older generation (see runtime_invalid above)
        new_status["runtimeFailure"] = None
    await _patch_status(client, namespace, name, new_status, status)

    metrics.PLANNED_SLOTS.labels(namespace, name).set(plan.num_parallel if plan.fits else 0)
    metrics.PLANNED_GPUS.labels(namespace, name).set(plan.gpus_per_replica if plan.fits else 0)
    result = "ok" if plan.fits else "unschedulable"
    metrics.RECONCILES.labels(result).inc()
    metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    if not plan.fits:
        if changed or status.get("phase") != Phase.UNSCHEDULABLE:
            await _event(body, "Warning", "Unschedulable", plan.reason)
    elif plan.replicas_placed < spec.replicas:
        if changed or status.get("phase") != Phase.PARTIALLY_SCHEDULED:
            await _event(body, "Warning", "PartiallyScheduled", plan.reason)
    elif changed:
        if previous and trigger != "spec":
            metrics.REPLANS.inc()
            before = f"{previous.get('numParallel')} slots on {previous.get('gpusPerReplica')} GPU(s)"
            message = f"after a {trigger} change (was {before}): {plan.reason}"
            await _event(body, "Normal", "Replanned", message)
        else:
            await _event(body, "Normal", "Planned", plan.reason)


async def _hold_serving_plan(body: Mapping[str, Any], plan: Any) -> None:
    """Keep the serving Deployment as it is; say Degraded, and what a re-plan would do now."""
    meta = body["metadata"]
    status: Mapping[str, Any] = body.get("status") or {}
    verdict = plan.reason if plan.fits else f"it would not fit: {plan.reason}"
    message = f"the GPU inventory changed; the serving plan stays until the spec changes ({verdict})"
    already = _condition_true(status, "Degraded") and any(
        c.get("type") == "Degraded" and c.get("message") == message for c in status.get("conditions") or []
    )
    conditions = set_condition(
        status.get("conditions") or [],
        Condition(type="Degraded", status="True", reason="InventoryChanged", message=message),
        _now(),
    )
    new_status = {**status, "phase": Phase.DEGRADED.value, "conditions": conditions}
    await _patch_status(STATE.kube, meta["namespace"], meta["name"], new_status, status)
    if not already:
        await _event(body, "Warning", "InventoryChanged", message)


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


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile_handler(body: kopf.Body, **kwargs: Any) -> None:
    """Reconcile now; a transient failure is retried by :func:`replan_loop` (never by kopf: see the
    module docstring), so this handler always completes and kopf records the spec as handled."""
    STATE.node_index = kwargs["gpu_nodes"]
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    STATE.known.add(key)
    await reconcile_key(key, trigger="spec")


async def _fresh(namespace: str, name: str) -> dict[str, Any] | None:
    return await STATE.kube.get(_md_path(namespace, name))


def _current_nodes() -> list[dict[str, Any]]:
    if STATE.node_index is not None:
        return _inventory(STATE.node_index)
    return list(STATE.nodes_seen.values())


async def reconcile_key(key: Key, *, trigger: str) -> None:
    """Read the object as it is now, reconcile it under its lock, and schedule a retry (with
    backoff) when an API call fails transiently. Reading afresh on every attempt is what makes a
    spec reverted during a pending retry come out right."""
    namespace, name = key
    async with STATE.lock_for(namespace, name):
        attempts = STATE.retries.pop(key, (0.0, 0, trigger))[1]
        try:
            body = await _fresh(namespace, name)
            if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
                return
            await reconcile(body, _current_nodes(), trigger=trigger)
        except TRANSIENT as error:
            metrics.RECONCILES.labels("error").inc()
            delay = STATE.schedule_retry(key, trigger, attempts)
            log.error("reconciling %s/%s failed, retrying in %.0f s: %s", namespace, name, delay, error)


async def _wait(events: Iterable[asyncio.Event], within: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=max(within, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def replan_loop(state: OperatorState) -> None:
    """One task per operator: re-plan every known ModelDeployment once the inventory is quiet for
    the debounce period after a change, and every resync period regardless; run the due retries.
    It sleeps on events, never polls. Being no per-object daemon, it needs no finalizer."""
    seen = state.inventory_version
    last_resync = time.monotonic()
    while True:
        now = time.monotonic()
        next_retry = min((due for due, _n, _t in state.retries.values()), default=math.inf)
        timeout = min(last_resync + state.resync_seconds, next_retry) - now
        if state.inventory_version == seen:
            state.wake.clear()
            await _wait([state.inventory_changed, state.wake], timeout)
        targets: dict[Key, str] = {}
        if state.inventory_version != seen:
            # debounce: a node pool scaling up sends a burst; plan once it has been quiet a while
            while True:
                version = state.inventory_version
                await _wait([state.inventory_changed], state.debounce_seconds)
                if state.inventory_version == version:
                    break
            seen = state.inventory_version
            targets = dict.fromkeys(state.known, "nodes")
        elif time.monotonic() - last_resync >= state.resync_seconds:
            last_resync = time.monotonic()
            targets = dict.fromkeys(state.known, "nodes")
        now = time.monotonic()
        for key, (due, _attempts, trigger) in list(state.retries.items()):
            if due <= now:
                targets.setdefault(key, trigger)
        if targets:
            await asyncio.gather(
                *(reconcile_key(key, trigger=trigger) for key, trigger in targets.items()),
                return_exceptions=True,
            )


async def _reconcile_or_retry(body: Mapping[str, Any], nodes: list[dict[str, Any]], *, trigger: str) -> None:
    """For event handlers that already hold the lock and a fresh body: a transient failure goes to
    the retry queue of :func:`replan_loop` instead of being lost (kopf does not retry events)."""
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    try:
        await reconcile(body, nodes, trigger=trigger)
    except TRANSIENT as error:
        metrics.RECONCILES.labels("error").inc()
        delay = STATE.schedule_retry(key, trigger)
        log.error("reconciling %s/%s failed, retrying in %.0f s: %s", *key, delay, error)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def model_deployment_event(type: str, name: str, namespace: str | None, **kwargs: Any) -> None:
    """Track the ModelDeployments the loop re-plans and those the autoscaler reads; a deleted one
    loses its retries, its autoscaling memory and its gauges."""
    STATE.node_index = kwargs["gpu_nodes"]
    key = (namespace or "default", name)
    if type == "DELETED":
        STATE.forget(key)
        metrics.forget(*key)
    else:
        STATE.known.add(key)
        autoscaling = (kwargs.get("spec") or {}).get("autoscaling") or {}
        if autoscaling.get("enabled") is True:
            STATE.autoscaled.add(key)
        else:
            STATE.autoscaled.discard(key)  # the autoscaler clears what it wrote on its next round


# --------------------------------------------------------------------------------------------------
# runtime feedback


async def _report_unschedulable(md: Mapping[str, Any], pod: Mapping[str, Any]) -> None:
    """A replica the scheduler cannot place shows in the status (Progressing False) and as one event
    per pod, with the scheduler's own words (``Insufficient nvidia.com/gpu``, an untolerated taint)."""
    why = unschedulable_reason(pod)
    uid = str((pod.get("metadata") or {}).get("uid") or "")
    if why is None or uid in STATE.unschedulable_reported:
        return
    STATE.unschedulable_reported.add(uid)
    name = (pod.get("metadata") or {}).get("name", "")
    message = f"pod {name} is Pending: {why}"
    meta = md["metadata"]
    status: Mapping[str, Any] = md.get("status") or {}
    conditions = set_condition(
        status.get("conditions") or [],
        Condition(type="Progressing", status="False", reason="PodUnschedulable", message=message),
        _now(),
    )
    await _patch_status(
        STATE.kube, meta["namespace"], meta["name"], {**status, "conditions": conditions}, status
    )
    await _event(md, "Warning", "PodUnschedulable", message)


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
        await _report_unschedulable(md, body)
        seen = set(status.get("troubles") or [])
        fresh = [t for t in runtime_troubles(body) if t.signature not in seen]
        if not fresh:
            return
        try:
            spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
        except ValidationError:
            return  # reconcile reports the spec; pods of an invalid spec teach nothing
        reaction = react(
            fresh,
            status,
            generation=(md.get("metadata") or {}).get("generation"),
            reserve_key=reserve_key(spec),
            user_sets_memory=user_sets_memory(spec),
        )
        metrics.OOM_KILLS.inc(sum(1 for t in fresh if t.kind == OOM_KILLED))
        for trouble in fresh:
            metrics.RUNTIME_FAILURES.labels(trouble.kind).inc()
        update = dict(reaction.status)
        if reaction.quiet:
            log.info("%s/%s: pods of an older plan failed: %s", namespace, owner, fresh[0].message)
            await _patch_status(STATE.kube, namespace, owner, update)
            return
        if reaction.invalid:
            # remember the verdict first: _mark_invalid posts the event once per message
            keep = {k: update[k] for k in ("troubles", "oomKills", "runtimeFailure")}
            await _patch_status(STATE.kube, namespace, owner, keep)
            await _mark_invalid(md, reaction.event_reason, reaction.event_message)
            return
        update["conditions"] = set_condition(
            status.get("conditions") or [],
            Condition(
                type="Degraded", status="True", reason=reaction.event_reason, message=reaction.event_message
            ),
            _now(),
        )
        await _patch_status(STATE.kube, namespace, owner, update)
        await _event(md, "Warning", reaction.event_reason, reaction.event_message)
        if reaction.replan:
            md.setdefault("status", {}).update(update)
            await _reconcile_or_retry(md, _inventory(gpu_nodes), trigger="runtime")


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
        if not plan.get("fits") or runtime_invalid(status, (md.get("metadata") or {}).get("generation")):
            return
        if type == "DELETED":
            gpu_nodes: kopf.Index[str, dict[str, Any]] = kwargs["gpu_nodes"]
            await _reconcile_or_retry(md, _inventory(gpu_nodes), trigger="spec")
            return
        desired = int((body.get("spec") or {}).get("replicas") or 0)
        observed = int((body.get("status") or {}).get("replicas") or 0)
        ready = int((body.get("status") or {}).get("readyReplicas") or 0)
        degraded = _condition_true(status, "Degraded")
        placed = (status.get("plan") or {}).get("replicasPlaced")
        phase = phase_for(
            fits=True,
            desired=desired,
            ready=ready,
            degraded=degraded,
            placed=None if placed is None else int(placed),
        )
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
