"""The parallelism planner: how many GPUs a replica needs and how many slots fit on them.

Pure: inputs are the model, the nodes (GPU product, count, memory) and the request; the output is
a :class:`Plan` that says whether it fits, with what, and why in a sentence. The operator, the
``parallama plan`` command and ``parallama serve`` (auto parallelism on the local machine) all call
:func:`make_plan`.

Rules, after Ollama's ``OLLAMA_NUM_PARALLEL`` and the seed article:

1. the fewest GPUs per replica that host the model with at least ``min_parallel`` slots;
2. on those, the most slots up to ``max_parallel`` (4 unless a profile or the user says otherwise)
   that keep every GPU within ``(1 - headroom)`` of its memory. Auto steps down 4, 3, 2, 1;
3. an explicit slot count is honoured or refused, never silently reduced; a refusal names the node
   shape that came closest and how many bytes it lacks;
4. a multi-GPU replica splits its layers in proportion to each GPU's usable memory (llama.cpp's
   ``--tensor-split``) and every GPU is checked on its own.

A replica never spans nodes: llama.cpp's layer split runs within one process.

Each trial is the memory model (:mod:`.memory`) over the runtime's own layout: one unified KV pool of
``num_ctx x slots`` cells and the sequence ids the runtime gives the model, so that the bytes a plan
counts are those the pod's llama.cpp allocates (``tests/contracts`` checks that the runtime the
operator configures creates that layout).

An embedding model (a GGUF that pools: :attr:`~.model_info.ModelInfo.task` ``embed``) is planned
the same way over the runtime's embedding context (:meth:`~.memory.MemoryConfig.for_model`): a slot
embeds one input of up to ``num_ctx`` tokens, the slots' inputs decode together, and a whole input
is one micro-batch, so ``n_ubatch`` is ``num_ctx`` whatever the request says.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .memory import (
    DEFAULT_CPU_OVERHEAD_BYTES,
    DEFAULT_GPU_OVERHEAD_BYTES,
    KVCacheType,
    MemoryConfig,
    MemoryEstimate,
    context_refusal,
    estimate_memory,
)
from .model_info import ModelInfo, Task

__all__ = [
    "PROFILE_MAX_PARALLEL",
    "DevicePlan",
    "MemoryBreakdown",
    "Node",
    "Plan",
    "PlanRequest",
    "format_bytes",
    "make_plan",
]

GiB = 1024**3
MiB = 1024**2

PROFILE_MAX_PARALLEL = {"chat": 4, "batch": 16}
"""Chat wants 2-4 slots (latency); batch inference 8 or more (throughput)."""
DEFAULT_MAX_PARALLEL = 4


class Node(BaseModel):
    """One node's accelerators as the planner sees them.

    ``gpu_count == 0`` is a CPU-only node whose ``cpu_memory_bytes`` holds the model. ``gpu_free_bytes``
    (one entry per GPU) is known for the local machine through NVML; in a cluster GPUs are allocated
    whole, so their total memory is what a pod gets.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    product: str = "cpu"
    gpu_count: int = Field(default=0, ge=0)
    gpu_memory_bytes: int = Field(default=0, ge=0)
    gpu_free_bytes: tuple[int, ...] | None = None
    cpu_memory_bytes: int | None = None
    max_gpus_per_replica: int | None = Field(default=None, ge=1)
    """1 for time-sliced shares and MIG devices, which one replica cannot combine."""

    @property
    def shape(self) -> str:
        if self.gpu_count == 0:
            return f"CPU ({format_bytes(self.cpu_memory_bytes or 0)} RAM)"
        return f"{self.gpu_count} x {self.product} ({format_bytes(self.gpu_memory_bytes)})"


class PlanRequest(BaseModel):
    """What the user asked for; ``None`` means auto."""

    model_config = ConfigDict(frozen=True)

    num_ctx: int = Field(default=4096, gt=0)
    num_parallel: int | None = Field(default=None, ge=1)
    min_parallel: int = Field(default=1, ge=1)
    max_parallel: int | None = Field(default=None, ge=1)
    profile: Literal["chat", "batch"] | None = None
    kv_cache_type: KVCacheType = KVCacheType.F16
    flash_attention: bool = True
    headroom: float = Field(default=0.2, ge=0.0, le=0.9)
    gpus_per_replica: int | None = Field(default=None, ge=1)
    gpu_product: str | None = None
    n_ubatch: int = Field(default=512, ge=1)
    gpu_overhead_bytes: int = Field(default=DEFAULT_GPU_OVERHEAD_BYTES, ge=0)
    extra_reserve_bytes: int = Field(default=0, ge=0)
    """Bytes kept free on every device on top of the headroom (the operator raises it after an OOM)."""
    swa_full: bool = False
    """Full-size caches for sliding-window layers (llama.cpp's ``swa_full``); False is llama-server's
    default: a window-sized cache, which lets several times more slots fit."""
    replicas: int = Field(default=1, ge=0)
    """Replicas to place: a GPU shape that hosts them all is preferred to one that hosts fewer."""
    prefer_product: str | None = None
    """The product serving now: kept among equals, so that scaling replicas does not move a
    deployment to another GPU class while its current one still hosts them."""

    @model_validator(mode="after")
    def _bounds(self) -> PlanRequest:
        if self.max_parallel is not None and self.min_parallel > self.max_parallel:
            raise ValueError(f"min_parallel {self.min_parallel} exceeds max_parallel {self.max_parallel}")
        return self

    def slot_bounds(self) -> tuple[int, int]:
        """The slot counts to consider, lowest and highest; equal when the count is explicit."""
        if self.num_parallel is not None:
            return self.num_parallel, self.num_parallel
        high = self.max_parallel or PROFILE_MAX_PARALLEL.get(self.profile or "", DEFAULT_MAX_PARALLEL)
        return min(self.min_parallel, high), high


class DevicePlan(BaseModel):
    device: str
    layers: int
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    overhead_bytes: int
    total_bytes: int
    usable_bytes: int
    capacity_bytes: int
    recurrent_bytes: int = 0
    output_bytes: int = 0
    """The logits buffer, where it is this device's memory (a CPU replica's)."""


class MemoryBreakdown(BaseModel):
    """Bytes of one replica, summed over its devices."""

    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    kv_per_slot_bytes: int = 0
    """Cache bytes one slot adds: its KV cells and, for recurrent layers, its state."""
    recurrent_bytes: int = 0
    """Recurrent state (Mamba, RWKV, hybrid layers): fixed per slot, whatever the context."""
    compute_bytes: int = 0
    output_bytes: int = 0
    """The logits buffer (``n_seq_max x n_vocab`` floats) counted in ``total_bytes``: a CPU replica's;
    beside GPUs it is host memory, like the token embeddings."""
    overhead_bytes: int = 0
    total_bytes: int = 0
    usable_bytes: int = 0
    capacity_bytes: int = 0
    headroom_bytes: int = 0
    headroom_fraction: float = 0.2


class Plan(BaseModel):
    fits: bool
    num_parallel: int
    num_ctx: int
    gpus_per_replica: int
    gpu_product: str | None = None
    gpu_memory_bytes: int | None = None
    kv_cache_type: KVCacheType
    kv_cache_type_v: KVCacheType
    flash_attention: bool
    kv_bytes_per_token: int
    kv_cells_per_slot: int
    """Cells of the KV pool: the runtime's one unified stream holds every slot's ``num_ctx`` (padded
    to 256); the scheduler holds each request to ``num_ctx``."""
    swa_cells_per_slot: int = 0
    """Cells of the sliding-window cache's stream (the windows of every sequence id plus a batch)."""
    n_seq_max: int = 1
    """Sequence ids the runtime's context gets: the slots, plus cached conversations' where they cost
    no cache memory (``planning.memory.sequence_ids``)."""
    swa_full: bool = False
    task: Task = "generate"
    """What the runtime serves with this model: ``embed`` for a GGUF that pools (an embedding model:
    a slot embeds one input of up to ``num_ctx`` tokens, the slots' inputs in one batch), else
    ``generate``."""
    pooling: str | None = None
    """An embedding model's pooling: ``mean``, ``cls`` or ``last``."""
    output_buffer_bytes: int = 0
    """llama.cpp's output buffer (logits, and an embedding context's embeddings, of every output
    row), wherever it lives: host memory beside GPUs, the CPU device's otherwise (then also in
    ``memory.output_bytes``). Small for generation (a row per sequence id), ``n_batch`` rows of
    ``n_vocab + n_embd`` floats for an embedding context."""
    refused: bool = False
    """llama.cpp would refuse these settings for this model whatever the hardware (see ``reason``)."""
    node_shape: str | None = None
    nodes: list[str] = Field(default_factory=list)
    tensor_split: list[float] = Field(default_factory=list)
    layer_split: list[int] = Field(default_factory=list)
    devices: list[DevicePlan] = Field(default_factory=list)
    memory: MemoryBreakdown
    shortfall_bytes: int = 0
    closest_node: str | None = None
    reason: str
    warnings: list[str] = Field(default_factory=list)
    """Things that fit but deserve a look, e.g. a context beyond what the model was trained for."""
    replicas: int = 1
    """Replicas asked for."""
    placement: dict[str, int] = Field(default_factory=dict)
    """Replicas per node, as many as fit: each needs ``gpus_per_replica`` free GPUs of the planned
    product on one node. Fewer than ``replicas`` means the rest would stay Pending."""
    replicas_possible: int = 0
    """Replicas the planned GPU class could host in all, not capped by ``replicas``: how far the
    operator's autoscaler may grow this deployment without leaving pods Pending."""

    @property
    def replicas_placed(self) -> int:
        return sum(self.placement.values())


def format_bytes(value: float) -> str:
    if abs(value) >= GiB:
        return f"{value / GiB:.1f} GiB"
    return f"{value / MiB:.0f} MiB"


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """Nodes that look alike to the planner: same product, GPU count, memory (and free memory)."""

    product: str
    gpu_count: int
    gpu_memory_bytes: int
    gpu_free_bytes: tuple[int, ...] | None
    cpu_memory_bytes: int
    nodes: tuple[str, ...]
    max_gpus_per_replica: int | None = None

    @property
    def is_cpu(self) -> bool:
        return self.gpu_count == 0

    def hosts(self, gpus: int) -> bool:
        """Whether one replica may take ``gpus`` GPUs of this shape."""
        if self.is_cpu:
            return True
        limit = self.gpu_count if self.max_gpus_per_replica is None else self.max_gpus_per_replica
        return gpus <= min(limit, self.gpu_count)

    def describe(self) -> str:
        if self.is_cpu:
            return f"CPU ({format_bytes(self.cpu_memory_bytes)} RAM)"
        return f"{self.gpu_count} x {self.product} ({format_bytes(self.gpu_memory_bytes)})"


@dataclass(frozen=True)
class _Trial:
    shape: _Shape
    gpus: int
    slots: int
    estimate: MemoryEstimate
    capacities: tuple[int, ...]
    usable: tuple[int, ...]

    @property
    def shortfall(self) -> int:
        """Bytes the worst device lacks (<= 0 when everything fits)."""
        return max(d.total_bytes - u for d, u in zip(self.estimate.devices, self.usable, strict=True))

    @property
    def fits(self) -> bool:
        return self.shortfall <= 0


def _group(nodes: Iterable[Node], product: str | None) -> list[_Shape]:
    groups: dict[tuple[object, ...], list[str]] = {}
    specimens: dict[tuple[object, ...], Node] = {}
    for node in nodes:
        if product and node.gpu_count and not _product_matches(node.product, product):
            continue
        if product and not node.gpu_count:
            continue
        if node.gpu_count == 0 and not node.cpu_memory_bytes:
            continue
        key = (
            node.product,
            node.gpu_count,
            node.gpu_memory_bytes,
            node.gpu_free_bytes,
            node.cpu_memory_bytes,
            node.max_gpus_per_replica,
        )
        groups.setdefault(key, []).append(node.name)
        specimens.setdefault(key, node)
    shapes = []
    for group, names in groups.items():
        node = specimens[group]
        shapes.append(
            _Shape(
                product=node.product,
                gpu_count=node.gpu_count,
                gpu_memory_bytes=node.gpu_memory_bytes,
                gpu_free_bytes=node.gpu_free_bytes,
                cpu_memory_bytes=node.cpu_memory_bytes or 0,
                nodes=tuple(sorted(names)),
                max_gpus_per_replica=node.max_gpus_per_replica,
            )
        )
    return shapes


def _product_matches(product: str, wanted: str) -> bool:
    from .gpu_catalog import normalize_product

    return normalize_product(product) == normalize_product(wanted) or product == wanted


def _memory_config(request: PlanRequest, slots: int, split: tuple[float, ...] | None) -> MemoryConfig:
    """The runtime's context settings for ``slots``; ``split`` None means a CPU-only replica. The
    layout is the runtime's: one unified KV pool and its sequence ids (MemoryConfig's defaults)."""
    return MemoryConfig(
        num_ctx=request.num_ctx,
        num_parallel=slots,
        kv_cache_type=request.kv_cache_type,
        flash_attention=request.flash_attention,
        n_ubatch=request.n_ubatch,
        swa_full=request.swa_full,
        gpu_layers=0 if split is None else -1,
        tensor_split=split or (1.0,),
        device_overhead_bytes=DEFAULT_CPU_OVERHEAD_BYTES if split is None else request.gpu_overhead_bytes,
    )


def _trial(model: ModelInfo, request: PlanRequest, shape: _Shape, gpus: int, slots: int) -> _Trial:
    keep = 1.0 - request.headroom
    if shape.is_cpu:
        capacities: tuple[int, ...] = (shape.cpu_memory_bytes,)
        usable: tuple[int, ...] = (int(shape.cpu_memory_bytes * keep) - request.extra_reserve_bytes,)
        config = _memory_config(request, slots, None)
    else:
        # GPUs with the most free memory first (NVML knows it locally; in a cluster GPUs come whole)
        free = sorted(shape.gpu_free_bytes or (shape.gpu_memory_bytes,) * shape.gpu_count, reverse=True)
        capacities = (shape.gpu_memory_bytes,) * gpus
        usable = tuple(
            min(int(shape.gpu_memory_bytes * keep), f) - request.extra_reserve_bytes for f in free[:gpus]
        )
        # the split as the pod gets it (the operator writes four decimals), so that the plan's layer
        # assignment is llama.cpp's: 1/6 and 0.1667 put different layers on some GPUs
        split = tuple(round(max(u, 1) / max(sum(usable), 1), 4) for u in usable)
        config = _memory_config(request, slots, split)
    return _Trial(shape, gpus, slots, estimate_memory(model, config), capacities, usable)


def _best_slots(model: ModelInfo, request: PlanRequest, shape: _Shape, gpus: int) -> _Trial | None:
    """The most slots within bounds that fit ``gpus`` GPUs of ``shape``; memory grows with slots."""
    low, high = request.slot_bounds()
    for slots in range(high, low - 1, -1):
        trial = _trial(model, request, shape, gpus, slots)
        if trial.fits:
            return trial
    return None


def make_plan(model: ModelInfo, nodes: Sequence[Node], request: PlanRequest | None = None) -> Plan:
    """Plan one replica of ``model`` over ``nodes``; see the module docstring for the rules."""
    request = request or PlanRequest()
    refusal = context_refusal(model, _memory_config(request, 1, None))
    if refusal:
        return _empty_plan(model, request, refusal, refused=True)
    shapes = _group(nodes, request.gpu_product)
    gpu_shapes = [s for s in shapes if not s.is_cpu]
    candidates = gpu_shapes or [s for s in shapes if s.is_cpu]
    if not candidates:
        what = (
            f"no node offers {request.gpu_product} GPUs" if request.gpu_product else "no node has GPUs or RAM"
        )
        return _empty_plan(model, request, what)

    max_gpus = min(max(s.gpu_count for s in candidates), model.block_count + 1)
    if not gpu_shapes:
        gpu_counts = [0]
    elif request.gpus_per_replica is not None:
        gpu_counts = [request.gpus_per_replica]
    else:
        gpu_counts = list(range(1, max_gpus + 1))

    for gpus in gpu_counts:
        fitting = [
            trial
            for shape in candidates
            if shape.hosts(gpus)
            if (trial := _best_slots(model, request, shape, gpus)) is not None
        ]
        if fitting:
            # the GPU class (product, memory) that hosts the most of the replicas asked for; then most
            # slots; then the smallest GPU that does it (leave big GPUs to big models); then most nodes
            def room(trial: _Trial, gpus: int = gpus) -> int:
                return min(_capacity(candidates, trial.shape, gpus), request.replicas)

            def moves(trial: _Trial) -> bool:
                return request.prefer_product is not None and trial.shape.product != request.prefer_product

            fitting.sort(
                key=lambda t: (-room(t), moves(t), -t.slots, t.shape.gpu_memory_bytes, -len(t.shape.nodes))
            )
            best = fitting[0]
            hosts = sorted(
                name
                for shape in candidates
                if _same_class(shape, best.shape) and shape.hosts(gpus)
                for name in shape.nodes
            )
            placement = _placement(candidates, best, request.replicas)
            plan = _fitting_plan(model, request, best, placement, hosts)
            return plan.model_copy(update={"replicas_possible": _capacity(candidates, best.shape, gpus)})
    return _refusal(model, request, candidates, gpu_counts)


def _breakdown(trial: _Trial, headroom: float) -> MemoryBreakdown:
    est = trial.estimate
    capacity = sum(trial.capacities)
    return MemoryBreakdown(
        weights_bytes=est.weights_bytes,
        kv_cache_bytes=est.kv_cache_bytes,
        kv_per_slot_bytes=est.kv_bytes_per_slot,
        recurrent_bytes=est.recurrent_bytes,
        compute_bytes=est.compute_bytes,
        output_bytes=sum(d.output_bytes for d in est.devices),
        overhead_bytes=est.overhead_bytes,
        total_bytes=est.total_bytes,
        usable_bytes=sum(trial.usable),
        capacity_bytes=capacity,
        headroom_bytes=capacity - sum(trial.usable),
        headroom_fraction=headroom,
    )


def _devices(trial: _Trial) -> list[DevicePlan]:
    return [
        DevicePlan(
            device=d.device,
            layers=d.layers,
            weights_bytes=d.weights_bytes,
            kv_cache_bytes=d.kv_cache_bytes,
            compute_bytes=d.compute_bytes,
            overhead_bytes=d.overhead_bytes,
            total_bytes=d.total_bytes,
            usable_bytes=u,
            capacity_bytes=c,
            recurrent_bytes=d.recurrent_bytes,
            output_bytes=d.output_bytes,
        )
        for d, u, c in zip(trial.estimate.devices, trial.usable, trial.capacities, strict=True)
    ]


def _warnings(model: ModelInfo, request: PlanRequest) -> list[str]:
    model_ctx = model.context_length
    notes = []
    if request.num_ctx > model_ctx:
        notes.append(
            f"num_ctx {request.num_ctx} exceeds the {model_ctx} tokens the model was trained for; "
            "llama.cpp allows it but quality degrades past the trained context"
        )
    if request.kv_cache_type.is_quantized and not request.flash_attention:
        notes.append(f"a {request.kv_cache_type.value} V cache needs flash attention: V stays f16")
    notes.extend(model.layout.notes)
    return notes


def _plan_from_trial(
    model: ModelInfo,
    request: PlanRequest,
    trial: _Trial,
    *,
    fits: bool,
    reason: str,
    nodes: list[str],
    shortfall: int = 0,
) -> Plan:
    est = trial.estimate
    shape = trial.shape
    return Plan(
        fits=fits,
        num_parallel=trial.slots,
        num_ctx=request.num_ctx,
        gpus_per_replica=trial.gpus,
        gpu_product=None if shape.is_cpu else shape.product,
        gpu_memory_bytes=None if shape.is_cpu else shape.gpu_memory_bytes,
        kv_cache_type=est.config.type_k,
        kv_cache_type_v=est.config.type_v,
        flash_attention=request.flash_attention,
        kv_bytes_per_token=est.kv_bytes_per_token,
        kv_cells_per_slot=est.kv_cells_per_slot,
        swa_cells_per_slot=est.swa_cells_per_slot,
        n_seq_max=est.n_seq_max,
        swa_full=request.swa_full,
        task=model.task,
        pooling=model.pooling,
        output_buffer_bytes=est.output_buffer_bytes,
        node_shape=shape.describe(),
        nodes=nodes,
        tensor_split=[round(x, 4) for x in est.config.tensor_split] if trial.gpus > 1 else [],
        layer_split=[d.layers for d in est.devices] if trial.gpus > 1 else [],
        devices=_devices(trial),
        memory=_breakdown(trial, request.headroom),
        shortfall_bytes=shortfall,
        closest_node=None if fits else shape.describe(),
        reason=reason,
        warnings=_warnings(model, request),
    )


def _same_class(a: _Shape, b: _Shape) -> bool:
    """Nodes a Deployment pinned to ``a``'s product can use for a replica planned on ``a``."""
    return (a.product, a.gpu_memory_bytes, a.is_cpu) == (b.product, b.gpu_memory_bytes, b.is_cpu)


def _capacity(shapes: list[_Shape], planned: _Shape, gpus: int) -> int:
    """Replicas of ``gpus`` GPUs that the nodes of ``planned``'s class can hold in all."""
    if planned.is_cpu:
        return sum(len(s.nodes) for s in shapes if _same_class(s, planned))
    return sum(
        len(s.nodes) * (s.gpu_count // gpus) for s in shapes if _same_class(s, planned) and s.hosts(gpus)
    )


def _placement(shapes: list[_Shape], best: _Trial, replicas: int) -> dict[str, int]:
    """Replicas per node: best fit, the nodes with the fewest spare GPUs first, so that nodes with
    many free GPUs stay whole for models that need them."""
    per_node: list[tuple[int, str]] = []
    for shape in shapes:
        if not _same_class(shape, best.shape) or not shape.hosts(best.gpus):
            continue
        fits = 1 if shape.is_cpu else shape.gpu_count // best.gpus
        per_node.extend((fits, name) for name in shape.nodes)
    placement: dict[str, int] = {}
    left = replicas
    for fits, name in sorted(per_node):
        if left <= 0:
            break
        take = min(fits, left)
        placement[name] = take
        left -= take
    return placement


def _embedding_prefix(model: ModelInfo) -> str:
    """How a plan's sentence starts for an embedding model: its slots embed inputs, not chats."""
    if model.task != "embed":
        return ""
    return f"embedding model ({model.pooling} pooling, a slot embeds one input): "


def _fitting_plan(
    model: ModelInfo, request: PlanRequest, best: _Trial, placement: dict[str, int], hosts: list[str]
) -> Plan:
    _, high = request.slot_bounds()
    where = "CPU memory" if best.shape.is_cpu else f"{best.gpus} x {best.shape.product}"
    used = best.estimate.total_bytes
    sentence = (
        _embedding_prefix(model)
        + f"{best.slots} slot{'s' if best.slots > 1 else ''} of {request.num_ctx} tokens fit on {where}: "
        f"{format_bytes(used)} planned of {format_bytes(sum(best.usable))} usable "
        f"({request.headroom:.0%} headroom)"
    )
    if request.num_parallel is not None:
        sentence += f"; {best.slots} slots as requested"
    elif best.slots >= high:
        sentence += f"; capped at max_parallel {high}"
    else:
        more = _trial(model, request, best.shape, best.gpus, best.slots + 1)
        sentence += f"; a slot more would lack {format_bytes(more.shortfall)}"
    if best.gpus > 1:
        sentence += f"; layers split {'/'.join(str(d.layers) for d in best.estimate.devices)}"
    placed = sum(placement.values())
    if request.replicas > 1 or placed < request.replicas:
        where_placed = ", ".join(f"{name} ({count})" for name, count in sorted(placement.items()))
        if placed >= request.replicas:
            sentence += f"; {request.replicas} replicas on {where_placed}"
        else:
            sentence += (
                f"; only {placed} of {request.replicas} replicas fit"
                + (f" ({where_placed})" if where_placed else "")
                + f": the others lack a node with {best.gpus} free {best.shape.product}"
            )
    plan = _plan_from_trial(model, request, best, fits=True, reason=sentence, nodes=hosts)
    return plan.model_copy(update={"replicas": request.replicas, "placement": placement})


def _refusal(model: ModelInfo, request: PlanRequest, shapes: list[_Shape], gpu_counts: list[int]) -> Plan:
    """Nothing fits: report the attempt that came closest, using all GPUs a shape allows."""
    low, _ = request.slot_bounds()
    attempts = []
    for shape in shapes:
        if shape.is_cpu:
            gpus = 0
        else:
            allowed = [g for g in gpu_counts if shape.hosts(g)]
            if not allowed:
                continue
            gpus = max(allowed)
        attempts.append(_trial(model, request, shape, gpus, low))
    if not attempts:
        wanted = request.gpus_per_replica
        return _empty_plan(
            model,
            request,
            f"no node has {wanted} GPUs for one replica (a time-sliced share or a MIG device counts "
            "as one GPU that a replica cannot combine with another)",
        )
    closest = min(attempts, key=lambda t: t.shortfall)
    worst = max(
        zip(closest.estimate.devices, closest.usable, strict=True),
        key=lambda pair: pair[0].total_bytes - pair[1],
    )
    slots = f"{low} slot{'s' if low > 1 else ''} of {request.num_ctx} tokens"
    where = "CPU memory" if closest.shape.is_cpu else f"{closest.gpus} x {closest.shape.product}"
    reason = (
        f"does not fit: {_embedding_prefix(model)}{slots} need {format_bytes(worst[0].total_bytes)} "
        f"on {worst[0].device} of {where} "
        f"but only {format_bytes(worst[1])} is usable ({request.headroom:.0%} headroom); "
        f"closest node shape {closest.shape.describe()} ({', '.join(closest.shape.nodes)}) "
        f"lacks {format_bytes(closest.shortfall)} ({closest.shortfall} bytes)"
    )
    return _plan_from_trial(
        model, request, closest, fits=False, reason=reason, nodes=[], shortfall=closest.shortfall
    )


def _empty_plan(model: ModelInfo, request: PlanRequest, why: str, *, refused: bool = False) -> Plan:
    low, _ = request.slot_bounds()
    config = _memory_config(request, low, None)
    memory = MemoryBreakdown(headroom_fraction=request.headroom)
    per_token = cells = swa_cells = outputs = 0
    sequences = low
    if not refused:
        est = estimate_memory(model, config)
        per_token, cells, swa_cells = est.kv_bytes_per_token, est.kv_cells_per_slot, est.swa_cells_per_slot
        sequences, outputs = est.n_seq_max, est.output_buffer_bytes
        memory = MemoryBreakdown(
            weights_bytes=est.weights_bytes,
            kv_cache_bytes=est.kv_cache_bytes,
            kv_per_slot_bytes=est.kv_bytes_per_slot,
            recurrent_bytes=est.recurrent_bytes,
            compute_bytes=est.compute_bytes,
            output_bytes=sum(d.output_bytes for d in est.devices),
            total_bytes=est.total_bytes,
            headroom_fraction=request.headroom,
        )
    return Plan(
        fits=False,
        refused=refused,
        num_parallel=low,
        num_ctx=request.num_ctx,
        gpus_per_replica=request.gpus_per_replica or 0,
        kv_cache_type=config.type_k,
        kv_cache_type_v=config.type_v,
        flash_attention=request.flash_attention,
        kv_bytes_per_token=per_token,
        kv_cells_per_slot=cells,
        swa_cells_per_slot=swa_cells,
        n_seq_max=sequences,
        swa_full=request.swa_full,
        task=model.task,
        pooling=model.pooling,
        output_buffer_bytes=outputs,
        memory=memory,
        reason=f"{'refused' if refused else 'does not fit'}: {why}",
        warnings=_warnings(model, request),
    )
