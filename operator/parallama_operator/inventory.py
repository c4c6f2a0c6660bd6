"""The cluster's GPU inventory, from Node objects as GPU Feature Discovery labels them.

Pure functions: a Node body (a dict) goes in, a :class:`NodeGPUs` comes out; a collection of those
becomes the planner's ``Node`` list. The kopf index in :mod:`parallama_operator.handlers` stores
``NodeGPUs`` per node name, so the planner never sees a raw Node and tests need no cluster.

Rules:

* GPU count is the node's *allocatable* ``<resourceName>`` (what the scheduler can hand out), not
  the ``nvidia.com/gpu.count`` label; the label is a fallback for nodes whose device plugin has not
  reported yet (count 0 allocatable means none usable, so the label is only used when the resource
  is absent altogether).
* memory comes from ``nvidia.com/gpu.memory`` (MiB); without it, from the GPU catalog by product;
  a GPU of unknown size is ignored rather than guessed.
* cordoned (``spec.unschedulable``) and NotReady nodes offer nothing: pods could not land there.
* shared GPUs, as GFD labels them, are not whole GPUs:
  - time-slicing (``nvidia.com/gpu.replicas`` > 1; the product may carry a ``-SHARED`` suffix): the
    device plugin advertises ``replicas`` shares per GPU, all on the same memory with no isolation.
    A share is planned with ``memory / replicas``, the only size that holds when every share is in
    use, and a replica takes one share: two shares of one GPU would be the same GPU twice;
  - MIG, ``single`` strategy (``nvidia.com/mig.strategy=single``): ``nvidia.com/gpu`` counts MIG
    devices and ``nvidia.com/gpu.memory`` is one device's memory; ``mixed`` strategy: each profile
    is its own resource (``nvidia.com/mig-3g.20gb``) with ``nvidia.com/mig-3g.20gb.memory`` and
    ``.count`` labels, planned when the spec asks for that resource. A replica cannot span MIG
    devices (a CUDA process sees one), so MIG replicas take one device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from parallama_runtime.planning.gpu_catalog import lookup_gpu_memory_mib
from parallama_runtime.planning.planner import Node
from pydantic import BaseModel, ConfigDict

__all__ = [
    "GPU_COUNT_LABEL",
    "GPU_MEMORY_LABEL",
    "GPU_PRODUCT_LABEL",
    "NodeGPUs",
    "admits",
    "node_gpus",
    "planner_nodes",
    "requested_gpus",
    "trim_node",
    "trim_pod",
]

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
GPU_REPLICAS_LABEL = "nvidia.com/gpu.replicas"
MIG_STRATEGY_LABEL = "nvidia.com/mig.strategy"
SHARED_SUFFIX = "-SHARED"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
MiB = 1024 * 1024


class NodeGPUs(BaseModel):
    """What one node offers, or why it offers nothing (``excluded``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    resource_name: str = "nvidia.com/gpu"
    product: str | None = None
    gpu_count: int = 0
    gpu_memory_bytes: int = 0
    excluded: str | None = None
    labels: dict[str, str] = {}
    sharing: str = "none"
    """``none`` (whole GPUs), ``time-slicing`` or ``mig``."""
    max_gpus_per_replica: int | None = None
    """1 for shares and MIG devices: a replica cannot combine them."""
    taints: list[dict[str, str]] = []

    @property
    def usable(self) -> bool:
        return (
            self.excluded is None and self.gpu_count > 0 and self.gpu_memory_bytes > 0 and bool(self.product)
        )


def _quantity_int(value: Any) -> int:
    """Extended-resource quantities are plain integers ("8"); anything else counts as none."""
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def _is_ready(status: Mapping[str, Any]) -> bool:
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return str(condition.get("status")) == "True"
    return False


def node_gpus(body: Mapping[str, Any], resource_name: str = "nvidia.com/gpu") -> NodeGPUs:
    """Read one Node object (as the API returns it)."""
    metadata = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    labels: Mapping[str, str] = metadata.get("labels") or {}
    name = str(metadata.get("name", ""))
    product = labels.get(GPU_PRODUCT_LABEL) or None

    allocatable = status.get("allocatable") or {}
    if resource_name in allocatable:
        count = _quantity_int(allocatable[resource_name])
    else:
        count = _quantity_int(labels.get(GPU_COUNT_LABEL, 0))

    memory_mib = _quantity_int(labels.get(GPU_MEMORY_LABEL, 0))
    sharing, max_per_replica = "none", None
    replicas = max(1, _quantity_int(labels.get(GPU_REPLICAS_LABEL, 1)))
    if resource_name.startswith(MIG_RESOURCE_PREFIX):  # mixed strategy: one resource per MIG profile
        profile = resource_name.removeprefix("nvidia.com/")
        memory_mib = _quantity_int(labels.get(f"nvidia.com/{profile}.memory", 0))
        if resource_name not in allocatable:
            count = _quantity_int(labels.get(f"nvidia.com/{profile}.count", 0))
        sharing, max_per_replica = "mig", 1
    elif labels.get(MIG_STRATEGY_LABEL) == "single" and "-MIG-" in (product or ""):
        sharing, max_per_replica = "mig", 1  # gpu.count and gpu.memory already describe MIG devices
    elif replicas > 1:
        base = (product or "").removesuffix(SHARED_SUFFIX)
        if memory_mib <= 0 and base:
            memory_mib = lookup_gpu_memory_mib(base) or 0
        memory_mib //= replicas
        sharing, max_per_replica = "time-slicing", 1
    if memory_mib <= 0 and product and sharing == "none":
        memory_mib = lookup_gpu_memory_mib(product) or 0

    excluded = None
    if spec.get("unschedulable"):
        excluded = "cordoned (spec.unschedulable)"
    elif not _is_ready(status):
        excluded = "not Ready"
    elif count <= 0:
        excluded = f"no allocatable {resource_name}"
    elif not product:
        excluded = f"no {GPU_PRODUCT_LABEL} label"
    elif memory_mib <= 0:
        excluded = f"unknown memory of {product} (no {GPU_MEMORY_LABEL} label, not in the catalog)"

    return NodeGPUs(
        name=name,
        resource_name=resource_name,
        product=product,
        gpu_count=max(count, 0),
        gpu_memory_bytes=max(memory_mib, 0) * MiB,
        excluded=excluded,
        labels=dict(labels),
        sharing=sharing,
        max_gpus_per_replica=max_per_replica,
        taints=[
            {k: str(v) for k, v in taint.items() if k in ("key", "value", "effect")}
            for taint in spec.get("taints") or []
        ],
    )


def planner_nodes(
    inventory: Iterable[NodeGPUs],
    node_selector: Mapping[str, str] | None = None,
    *,
    requested: Mapping[str, int] | None = None,
    tolerations: Iterable[Mapping[str, Any]] = (),
    affinity: Mapping[str, Any] | None = None,
) -> list[Node]:
    """The planner's view: usable GPU nodes that the pods may use, with the GPUs still free.

    A node counts only if the spec's nodeSelector and required node affinity admit it and the pods
    tolerate its NoSchedule/NoExecute taints (planning on a node the pods may not use would promise
    slots that never come); its GPUs are the allocatable ones minus those ``requested`` by other
    pods (:func:`requested_gpus`).
    """
    tolerations = list(tolerations)
    nodes = []
    for item in sorted(inventory, key=lambda n: n.name):
        if not item.usable:
            continue
        if node_selector and any(item.labels.get(k) != v for k, v in node_selector.items()):
            continue
        if not admits(item, tolerations, affinity):
            continue
        free = item.gpu_count - (requested or {}).get(item.name, 0)
        if free <= 0:
            continue
        nodes.append(
            Node(
                name=item.name,
                product=item.product or "unknown",
                gpu_count=free,
                gpu_memory_bytes=item.gpu_memory_bytes,
                max_gpus_per_replica=item.max_gpus_per_replica,
            )
        )
    return nodes


_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


def requested_gpus(
    pods: Iterable[Mapping[str, Any]],
    resource_name: str = "nvidia.com/gpu",
    *,
    ignore: Mapping[str, str] | None = None,
    ignore_namespace: str | None = None,
) -> dict[str, int]:
    """GPUs that scheduled, non-terminal pods hold, per node.

    Extended resources are requested through limits (requests equal them when set), per container;
    init containers run before the others, so a pod holds the larger of its largest init container
    and the sum of its containers, as the scheduler counts it. Pods whose labels include all of
    ``ignore`` (the replicas of the ModelDeployment being planned; in ``ignore_namespace`` when
    given) are left out: their GPUs come back to that deployment when it is re-planned.
    """
    held: dict[str, int] = {}
    for pod in pods:
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        if not node or (pod.get("status") or {}).get("phase") in _TERMINAL_PHASES:
            continue
        metadata = pod.get("metadata") or {}
        labels = metadata.get("labels") or {}
        same_namespace = ignore_namespace is None or metadata.get("namespace") == ignore_namespace
        if ignore and same_namespace and all(labels.get(k) == v for k, v in ignore.items()):
            continue
        containers = sum(_container_gpus(c, resource_name) for c in spec.get("containers") or [])
        init = max((_container_gpus(c, resource_name) for c in spec.get("initContainers") or []), default=0)
        count = max(containers, init)
        if count:
            held[node] = held.get(node, 0) + count
    return held


def _container_gpus(container: Mapping[str, Any], resource_name: str) -> int:
    resources = container.get("resources") or {}
    for kind in ("limits", "requests"):
        value = (resources.get(kind) or {}).get(resource_name)
        if value is not None:
            return _quantity_int(value)
    return 0


def admits(
    node: NodeGPUs, tolerations: Iterable[Mapping[str, Any]], affinity: Mapping[str, Any] | None
) -> bool:
    """Whether a pod with these tolerations and affinity may be scheduled on ``node``."""
    tolerations = list(tolerations)
    for taint in node.taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(
            _tolerates(t, taint) for t in tolerations
        ):
            return False
    required = ((affinity or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []
    return not terms or any(_term_matches(node, term) for term in terms)


def _tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    """Kubernetes' ToleratesTaint: effect (empty = any), key (empty with Exists = any), operator."""
    if toleration.get("effect") and toleration.get("effect") != taint.get("effect"):
        return False
    key = toleration.get("key") or ""
    if key and key != taint.get("key"):
        return False
    if toleration.get("operator", "Equal") == "Exists":
        return True
    return bool(key) and (toleration.get("value") or "") == (taint.get("value") or "")


def _term_matches(node: NodeGPUs, term: Mapping[str, Any]) -> bool:
    """A nodeSelectorTerm: every matchExpression holds on the node's labels (matchFields: name)."""
    for expression in term.get("matchExpressions") or []:
        if not _expression_holds(node.labels.get(expression.get("key", "")), expression):
            return False
    for expression in term.get("matchFields") or []:
        if expression.get("key") == "metadata.name" and not _expression_holds(node.name, expression):
            return False
    return bool(term.get("matchExpressions") or term.get("matchFields"))


def _expression_holds(value: str | None, expression: Mapping[str, Any]) -> bool:
    operator = expression.get("operator")
    values = [str(v) for v in expression.get("values") or []]
    if operator == "In":
        return value is not None and value in values
    if operator == "NotIn":
        return value is None or value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in ("Gt", "Lt") and value is not None and values:
        try:
            left, right = int(value), int(values[0])
        except ValueError:
            return False
        return left > right if operator == "Gt" else left < right
    return False


def trim_node(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Node the planner reads; the index keeps only these (Nodes are large, and
    images or addresses changing must not look like an inventory change)."""
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return {
        "metadata": {"name": metadata.get("name", ""), "labels": dict(metadata.get("labels") or {})},
        "spec": {
            "unschedulable": bool((body.get("spec") or {}).get("unschedulable", False)),
            "taints": [
                {k: v for k, v in taint.items() if k in ("key", "value", "effect")}
                for taint in (body.get("spec") or {}).get("taints") or []
            ],
        },
        "status": {
            "allocatable": dict(status.get("allocatable") or {}),
            "conditions": [{"type": "Ready", "status": str(c.get("status"))} for c in ready],
        },
    }


def trim_pod(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """What :func:`requested_gpus` reads of a pod, or None for a pod that holds no NVIDIA resource
    (the operator keeps every GPU pod of the cluster in memory: this keeps that small)."""
    spec = body.get("spec") or {}
    metadata = body.get("metadata") or {}

    def gpu_resources(container: Mapping[str, Any]) -> dict[str, Any]:
        resources = container.get("resources") or {}
        return {
            kind: {k: v for k, v in (resources.get(kind) or {}).items() if str(k).startswith("nvidia.com/")}
            for kind in ("limits", "requests")
        }

    containers = [{"resources": gpu_resources(c)} for c in spec.get("containers") or []]
    init = [{"resources": gpu_resources(c)} for c in spec.get("initContainers") or []]
    if not any(r["resources"]["limits"] or r["resources"]["requests"] for r in containers + init):
        return None
    return {
        "metadata": {"namespace": metadata.get("namespace"), "labels": dict(metadata.get("labels") or {})},
        "spec": {"nodeName": spec.get("nodeName"), "containers": containers, "initContainers": init},
        "status": {"phase": (body.get("status") or {}).get("phase")},
    }
