"""From a ModelDeployment spec and the GPU inventory to a plan and its status (pure).

The operator's decisions that are not Kubernetes plumbing live here: which request the planner
gets, how an OOM kill turns into extra reserve, what the status says, and which phase follows.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlparse

from parallama_runtime.planning.memory import KVCacheType
from parallama_runtime.planning.model_info import ModelInfo, model_info_from_metadata
from parallama_runtime.planning.planner import Plan, PlanRequest, make_plan

from .builders import pod_labels
from .inventory import node_gpus, planner_nodes, requested_gpus
from .resources import Condition, MemoryStatus, ModelDeploymentSpec, Phase, PlanStatus

__all__ = [
    "GPU_RUNTIME_HOST_BYTES",
    "MAX_EXTRA_RESERVE_FRACTION",
    "compute_plan",
    "host_bytes",
    "model_from_metadata",
    "model_url_refusal",
    "next_extra_reserve",
    "next_host_reserve",
    "parse_url_allowlist",
    "phase_for",
    "plan_hash",
    "plan_request",
    "plan_status",
    "reserve_key",
    "reserves_for",
    "set_condition",
    "user_sets_memory",
]

MiB = 1024 * 1024
GiB = 1024 * MiB
GPU_RUNTIME_HOST_BYTES = 1 * GiB
"""Host memory of a GPU runtime beyond the embedding table: Python, aiohttp, the CUDA runtime's
host-side state and llama.cpp's pinned staging buffers (a CPU replica's plan counts its process in
the plan's overhead)."""
MIN_HOST_RESERVE_STEP = 512 * MiB
MIN_HOST_RESERVE_CAP = 4 * GiB
"""After OOM kills the host reserve grows by a quarter of the estimate (at least 512 MiB) up to
the estimate itself (at least 4 GiB): beyond a doubling the estimate is wrong, not tight."""
MIN_OOM_RESERVE_STEP = 256 * MiB
MAX_EXTRA_RESERVE_FRACTION = 0.5
"""After repeated OOM kills the reserve stops growing at half a GPU: beyond that the model's
estimate is wrong in a way more reserve will not fix, and a human should look."""


def model_from_metadata(spec: ModelDeploymentSpec) -> ModelInfo | None:
    """Explicit metadata replaces the GGUF header entirely (no partial merge: a half-read header
    mixed with hand-written numbers would be harder to reason about than either alone)."""
    if spec.model.metadata is None:
        return None
    values = spec.model.metadata.model_dump(by_alias=True, exclude_none=True)
    return model_info_from_metadata(values, source=spec.model.uri)


def parse_url_allowlist(value: str | None) -> tuple[str, ...]:
    """``PARALLAMA_MODEL_URL_ALLOW``: a comma list of host globs (``huggingface.co``, ``*.hf.co``,
    ``models.internal:8443``); a pattern prefixed ``http://`` also allows plain http for those hosts."""
    return tuple(p.strip().lower() for p in (value or "").split(",") if p.strip())


def model_url_refusal(uri: str, allow: tuple[str, ...]) -> str | None:
    """Why the operator must not fetch ``uri`` itself (None when it may).

    An empty list allows every http(s) URL: then anyone who may create a ModelDeployment makes the
    operator send bounded GET requests to any address its pod can reach (an SSRF risk in clusters
    with internal services). Otherwise the host (or ``host:port`` for a pattern with a port) must
    match a glob; https only, unless the matching pattern starts with ``http://``.
    """
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https"):
        return f"the operator fetches only http(s) model headers, not {scheme}://"
    if not allow:
        return None
    host = (parsed.hostname or "").lower()
    port = parsed.port or (443 if scheme == "https" else 80)
    for pattern in allow:
        pattern_scheme, _, glob = pattern.rpartition("://")
        if pattern_scheme and pattern_scheme not in ("http", "https"):
            continue
        if scheme == "http" and pattern_scheme != "http":
            continue
        target = f"{host}:{port}" if ":" in glob else host
        if fnmatch.fnmatchcase(target, glob):
            return None
    return (
        f"the operator may not fetch the header of {scheme}://{parsed.netloc}: the host is not in its"
        f" model URL allowlist ({', '.join(allow)}); give spec.model.metadata, or ask the cluster admin"
        " to extend PARALLAMA_MODEL_URL_ALLOW"
    )


def plan_request(
    spec: ModelDeploymentSpec, extra_reserve_bytes: int = 0, prefer_product: str | None = None
) -> PlanRequest:
    par = spec.parallelism
    return PlanRequest(
        num_ctx=spec.num_ctx,
        num_parallel=par.num_parallel,
        min_parallel=par.min_parallel,
        max_parallel=par.max_parallel,
        profile=par.profile.value,
        kv_cache_type=KVCacheType(spec.kv_cache_type.value),
        flash_attention=spec.flash_attention,
        swa_full=spec.swa_full,
        headroom=spec.headroom,
        gpus_per_replica=spec.gpu.count,
        gpu_product=spec.gpu.product,
        extra_reserve_bytes=extra_reserve_bytes,
        replicas=spec.replicas,
        prefer_product=prefer_product,
    )


def compute_plan(
    spec: ModelDeploymentSpec,
    model: ModelInfo,
    node_bodies: Iterable[Mapping[str, Any]],
    extra_reserve_bytes: int = 0,
    *,
    pods: Iterable[Mapping[str, Any]] = (),
    owner: tuple[str, str] | None = None,
    prefer_product: str | None = None,
) -> Plan:
    """Plan over Node objects and the pods that hold GPUs on them.

    GPUs are counted by the spec's resource name (MIG and other device plugins advertise different
    names), which is why the index keeps Nodes, not GPU counts. GPUs held by other pods are not
    free; those held by this ModelDeployment's own replicas (``owner`` = namespace, name) are,
    since re-planning it may move them. Taints, nodeSelector and required node affinity decide
    which nodes the pods may use at all.
    """
    inventory = [node_gpus(body, spec.gpu.resource_name) for body in node_bodies]
    requested = requested_gpus(
        pods,
        spec.gpu.resource_name,
        ignore=pod_labels(owner[1]) if owner else None,
        ignore_namespace=owner[0] if owner else None,
    )
    nodes = planner_nodes(
        inventory,
        spec.node_selector,
        requested=requested,
        tolerations=spec.tolerations or [],
        affinity=spec.affinity,
    )
    return make_plan(model, nodes, plan_request(spec, extra_reserve_bytes, prefer_product))


def plan_hash(plan: Plan, spec: ModelDeploymentSpec, memory_limit: int = 0) -> str:
    """Digest of every plan value the pods see; equal hashes mean rolling the pods would change nothing."""
    essence = {
        "fits": plan.fits,
        "num_parallel": plan.num_parallel,
        "num_ctx": plan.num_ctx,
        "gpus": plan.gpus_per_replica,
        "product": plan.gpu_product,
        "kv": plan.kv_cache_type.value,
        "fa": plan.flash_attention,
        "split": plan.tensor_split,
        "engine": spec.engine.value,
    }
    if plan.swa_full:  # only when set, so that existing Deployments keep their hash (and their pods)
        essence["swa_full"] = True
    if memory_limit:
        essence["memory"] = memory_limit
    return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()[:16]


def user_sets_memory(spec: ModelDeploymentSpec) -> bool:
    """Whether ``spec.resources`` sets the container's memory (then the operator sets none)."""
    resources = spec.resources or {}
    return any("memory" in (resources.get(key) or {}) for key in ("requests", "limits"))


def host_bytes(model: ModelInfo, plan: Plan) -> int:
    """Host memory one replica needs (MemoryEstimate's host side): a GPU replica keeps the token
    embeddings in host memory (every layer is offloaded), plus the runtime process; a CPU replica
    holds the whole plan (weights, KV, compute and the process's overhead) in host memory.

    The allowance covers a generative context's output buffer (a row of logits per sequence id: a
    few MiB); an embedding model's holds every token of a batch, ``num_ctx`` rows of logits and
    vectors (a GiB for a 150k vocabulary at 2048 tokens), so its plan's buffer is added."""
    if plan.gpus_per_replica == 0:
        return plan.memory.total_bytes
    outputs = plan.output_buffer_bytes if plan.task == "embed" else 0
    return model.embedding_bytes + GPU_RUNTIME_HOST_BYTES + outputs


def reserve_key(spec: ModelDeploymentSpec) -> str:
    """Digest of what a learned reserve is about: the spec without replicas, autoscaling, Service
    and monitoring. A reserve learned under another key is dropped (see :func:`reserves_for`)."""
    essence = spec.model_dump(mode="json", exclude={"replicas", "autoscaling", "service", "monitoring"})
    return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()[:16]


def reserves_for(status: Mapping[str, Any], spec: ModelDeploymentSpec) -> tuple[int, int]:
    """(GPU reserve, host reserve) that still apply: both reset when the spec they were learned
    under changed (another model, context, cache type, GPU, memory setting...). Scaling replicas
    keeps them. They never decay with time: an OOM under load recurs under the same load."""
    if status.get("reserveKey") not in (None, reserve_key(spec)):
        return 0, 0
    return int(status.get("extraReserveBytes") or 0), int(status.get("hostReserveBytes") or 0)


def plan_status(plan: Plan, spec: ModelDeploymentSpec, *, host: int = 0, host_reserve: int = 0) -> PlanStatus:
    """``host``: :func:`host_bytes` of the plan; the runtime container asks for ``host`` plus the
    learned ``host_reserve`` as its memory request and limit, unless spec.resources sets memory."""
    mem = plan.memory
    memory_limit = host + host_reserve if host and plan.fits and not user_sets_memory(spec) else 0
    return PlanStatus(
        fits=plan.fits,
        task=plan.task,
        pooling=plan.pooling,
        num_parallel=plan.num_parallel,
        num_ctx=plan.num_ctx,
        gpus_per_replica=plan.gpus_per_replica,
        gpu_product=plan.gpu_product,
        gpu_memory_bytes=plan.gpu_memory_bytes,
        kv_cache_type=plan.kv_cache_type.value,
        nodes=list(plan.nodes),
        tensor_split=[f"{x:.4f}" for x in plan.tensor_split],
        memory=MemoryStatus(
            weights_bytes=mem.weights_bytes,
            kv_per_slot_bytes=mem.kv_per_slot_bytes,
            kv_cache_bytes=mem.kv_cache_bytes,
            recurrent_bytes=mem.recurrent_bytes,
            compute_bytes=mem.compute_bytes,
            overhead_bytes=mem.overhead_bytes,
            headroom_bytes=mem.headroom_bytes,
            usable_bytes=mem.usable_bytes,
            total_bytes=mem.total_bytes,
            capacity_bytes=mem.capacity_bytes,
            host_bytes=host,
            output_bytes=plan.output_buffer_bytes,
        ),
        host_memory_bytes=memory_limit,
        shortfall_bytes=plan.shortfall_bytes,
        closest_node=plan.closest_node,
        reason=plan.reason,
        hash=plan_hash(plan, spec, memory_limit),
        placement=dict(plan.placement),
        replicas_placed=plan.replicas_placed,
    )


def next_extra_reserve(current: int, plan: PlanStatus | None) -> int:
    """Reserve to keep per GPU after the pods ran out of memory (or came up with fewer slots).

    One step is one slot's KV cache spread over the replica's GPUs: the smallest change that makes
    the planner give up a slot, which is what an OOM under load usually calls for. The step is at
    least 256 MiB so a model with a tiny KV cache still moves, and the total is capped (see
    :data:`MAX_EXTRA_RESERVE_FRACTION`).
    """
    if plan is None:
        return current + MIN_OOM_RESERVE_STEP
    gpus = max(plan.gpus_per_replica, 1)
    step = max(plan.memory.kv_per_slot_bytes // gpus, MIN_OOM_RESERVE_STEP)
    cap = int((plan.gpu_memory_bytes or 0) * MAX_EXTRA_RESERVE_FRACTION) or current + step
    return min(current + step, cap)


def next_host_reserve(current: int, plan: PlanStatus | None) -> int:
    """Host memory to add to the runtime container's request and limit after an OOM kill: a
    quarter of the estimate per kill (at least 512 MiB), at most the estimate (at least 4 GiB)."""
    base = plan.memory.host_bytes if plan is not None else 0
    step = max(base // 4, MIN_HOST_RESERVE_STEP)
    return min(current + step, max(base, MIN_HOST_RESERVE_CAP))


def phase_for(*, fits: bool, desired: int, ready: int, degraded: bool, placed: int | None = None) -> Phase:
    if not fits:
        return Phase.UNSCHEDULABLE
    if degraded:
        return Phase.DEGRADED
    if desired == 0:
        return Phase.PLANNED
    if placed is not None and placed < desired:
        return Phase.PARTIALLY_SCHEDULED
    if ready >= desired:
        return Phase.READY
    return Phase.DEPLOYING


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    condition: Condition,
    now: str,
) -> list[dict[str, Any]]:
    """Replace the condition of the same type; keep lastTransitionTime when the status did not flip
    (the Kubernetes convention: the time says since when it is so, not when we last looked)."""
    result: list[dict[str, Any]] = []
    replaced = False
    for existing in conditions:
        if existing.get("type") == condition.type:
            transition = (
                existing.get("lastTransitionTime") if existing.get("status") == condition.status else None
            )
            new = condition.model_copy(update={"last_transition_time": transition or now})
            result.append(new.model_dump(by_alias=True, exclude_none=True))
            replaced = True
        else:
            result.append(dict(existing))
    if not replaced:
        new = condition.model_copy(update={"last_transition_time": now})
        result.append(new.model_dump(by_alias=True, exclude_none=True))
    return result
