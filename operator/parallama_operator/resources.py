"""The ModelDeployment resource: spec and status as pydantic models, the source of truth of the CRD.

The CRD YAML in ``crds/`` is generated from these classes by :mod:`parallama_operator.crd`, and a test
regenerates it and compares, so the schema the API server enforces and the one the operator parses
cannot drift apart. Field names are Python snake_case with camelCase aliases (the Kubernetes style);
``CEL`` rules that the API server evaluates ride along in ``json_schema_extra`` so they live next to
the field they guard.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "parallama.dev"
VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["mdep"]
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_PORT = 11434
MODEL_URI_SCHEMES = ("http", "https", "pvc", "file")
"""Schemes the operator understands. http(s) models are downloaded by an init container (and their
header read over HTTP Range requests for planning); pvc:// and file:// models are already in the pod,
so the operator cannot read them and needs ``model.metadata``."""


def _cel(
    rule: str, message: str, *, field_path: str | None = None, reason: str | None = None
) -> dict[str, str]:
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def _validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""A ModelDeployment's name names its Service, so it must be a DNS-1035 label (what a Service name
is): lower case letters, digits and '-', starting with a letter, at most 63 characters. The CRD
refuses other names (``chat.v2``, ``1chat``) with the same rule; children never get derived names."""
NAME_RULES = [
    _cel(
        "self.metadata.name.size() <= 63",
        "the name must have at most 63 characters: it names the Service and the pods",
        reason="FieldValueInvalid",
    ),
    _cel(
        f"self.metadata.name.matches('{NAME_PATTERN}')",
        "the name must be a DNS-1035 label (lower case letters, digits and '-', starting with a letter,"
        " like a Service name): it names the Service",
        reason="FieldValueInvalid",
    ),
]
"""The CEL rules at the top of the CRD's schema (only there can CEL see ``metadata.name``)."""


def name_error(name: str) -> str | None:
    """The CEL name rules again, for the operator (an old CRD or an emulator may not run them)."""
    if len(name) > 63:
        return f"invalid name {name!r}: {NAME_RULES[0]['message']}"
    if not re.match(NAME_PATTERN, name):
        return f"invalid name {name!r}: {NAME_RULES[1]['message']}"
    return None


_PRESERVE: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}
_PVC_URI = r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.+"


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# --------------------------------------------------------------------------------------------------
# spec


class ModelMetadata(_Camel):
    """The GGUF header facts the planner needs, for models whose header the operator cannot read."""

    architecture: str = Field(min_length=1)
    size_bytes: int = Field(gt=0, description="Bytes of all tensors (about the file size).")
    block_count: int = Field(gt=0)
    embedding_length: int = Field(gt=0)
    head_count: int = Field(gt=0)
    head_count_kv: int | None = Field(default=None, gt=0)
    key_length: int | None = Field(default=None, gt=0)
    value_length: int | None = Field(default=None, ge=0)
    context_length: int = Field(gt=0)
    vocab_size: int | None = Field(default=None, gt=0)
    feed_forward_length: int | None = Field(default=None, gt=0)
    expert_count: int | None = Field(default=None, ge=0)
    expert_used_count: int | None = Field(default=None, ge=0)
    sliding_window: int | None = Field(default=None, gt=0)
    kv_lora_rank: int | None = Field(
        default=None, gt=0, description="Multi-head latent attention (DeepSeek)."
    )
    rope_dimension_count: int | None = Field(default=None, gt=0)
    key_length_mla: int | None = Field(
        default=None,
        gt=0,
        description="Set by DeepSeek conversions since llama.cpp's MLA change (April 2025): the cache "
        "then holds one latent row per token; without it llama.cpp caches full per-head K and V.",
    )
    value_length_mla: int | None = Field(default=None, gt=0)
    pooling_type: Literal["none", "mean", "cls", "last"] | None = Field(
        default=None,
        description="The GGUF's pooling_type: mean, cls or last make an embedding model (the runtime "
        "then serves embeddings only; a slot embeds one input); none or absent, a generative one.",
    )
    gguf: dict[str, Any] | None = Field(
        default=None,
        description="Further GGUF key/values llama.cpp reads, without the architecture prefix "
        "(e.g. attention.sliding_window_pattern, ssm.state_size), for what the fields above do not cover.",
    )
    name: str | None = None


class ModelSource(_Camel):
    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel(
                "self.uri.matches('^(https?|pvc|file)://.+')",
                "model.uri must start with http://, https://, pvc:// or file://",
                field_path=".uri",
            ),
            _cel(
                "!self.uri.startsWith('pvc://') || self.uri.matches('^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.+')",
                "a pvc:// model URI is pvc://<claim>/<path inside the claim>",
                field_path=".uri",
            ),
            _cel(
                "!self.uri.startsWith('http://') || has(self.sha256)",
                "an http:// model needs model.sha256 (nothing else proves what was downloaded); or use https://",
                field_path=".sha256",
            ),
            _cel(
                "self.uri.matches('^https?://') || has(self.metadata)",
                "pvc:// and file:// models need model.metadata: the operator cannot read their GGUF header",
                field_path=".metadata",
            ),
        )
    )

    uri: str = Field(min_length=1, max_length=2048)
    sha256: str | None = Field(default=None, pattern=r"^[a-f0-9]{64}$")
    metadata: ModelMetadata | None = Field(
        default=None, description="Replaces reading the GGUF header (required for pvc:// and file://)."
    )

    @model_validator(mode="after")
    def _mirror_cel(self) -> ModelSource:
        """The CEL rules again: the operator must not trust that the API server enforced them
        (an older CRD may be installed, or a test emulator that validates nothing)."""
        if not re.match(r"^(https?|pvc|file)://.+", self.uri):
            raise ValueError("model.uri must start with http://, https://, pvc:// or file://")
        if self.uri.startswith("pvc://") and not re.match(
            r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.+", self.uri
        ):
            raise ValueError("a pvc:// model URI is pvc://<claim>/<path inside the claim>")
        if self.uri.startswith("http://") and not self.sha256:
            raise ValueError(
                "an http:// model needs model.sha256 (nothing else proves what was downloaded); or use https://"
            )
        if not re.match(r"^https?://", self.uri) and self.metadata is None:
            raise ValueError(
                "pvc:// and file:// models need model.metadata: the operator cannot read their GGUF header"
            )
        return self


class Engine(StrEnum):
    PARALLAMA = "parallama"
    OLLAMA = "ollama"


AUTOSCALING_ENGINE_MESSAGE = (
    "autoscaling reads the slot metrics of the parallama runtime; the ollama engine exports none"
)


class Profile(StrEnum):
    CHAT = "chat"
    BATCH = "batch"


class KVCache(StrEnum):
    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"


class Parallelism(_Camel):
    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel(
                "!has(self.maxParallel) || self.minParallel <= self.maxParallel",
                "minParallel must not exceed maxParallel",
                field_path=".minParallel",
            ),
            _cel(
                "!has(self.numParallel) || (self.numParallel >= self.minParallel"
                " && (!has(self.maxParallel) || self.numParallel <= self.maxParallel))",
                "numParallel must lie within [minParallel, maxParallel]",
                field_path=".numParallel",
            ),
        )
    )

    num_parallel: int | None = Field(default=None, ge=1, le=256, description="Explicit slots; unset = auto.")
    min_parallel: int = Field(default=1, ge=1, le=256)
    max_parallel: int | None = Field(default=None, ge=1, le=256)
    profile: Profile = Profile.CHAT

    @model_validator(mode="after")
    def _mirror_cel(self) -> Parallelism:
        if self.max_parallel is not None and self.min_parallel > self.max_parallel:
            raise ValueError("minParallel must not exceed maxParallel")
        if self.num_parallel is not None and (
            self.num_parallel < self.min_parallel
            or (self.max_parallel is not None and self.num_parallel > self.max_parallel)
        ):
            raise ValueError("numParallel must lie within [minParallel, maxParallel]")
        return self


class GPU(_Camel):
    count: int | None = Field(default=None, ge=1, le=16, description="GPUs per replica; unset = fewest.")
    product: str | None = Field(default=None, description="GPU product (GFD label value), e.g. NVIDIA-L4.")
    resource_name: str = Field(default="nvidia.com/gpu", min_length=1)


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class ServiceSpec(_Camel):
    type: ServiceType = ServiceType.CLUSTER_IP
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)


class Monitoring(_Camel):
    service_monitor: bool = False
    interval: str = Field(default="30s", pattern=r"^[0-9]+(ms|s|m|h)$")


class VolumeKind(StrEnum):
    EMPTY_DIR = "emptyDir"
    PVC = "persistentVolumeClaim"


class Storage(_Camel):
    """Where an http(s) model is downloaded to; pvc:// models are mounted from their claim instead."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel(
                "self.volume != 'persistentVolumeClaim' || has(self.claimName)",
                "storage.claimName is required when storage.volume is persistentVolumeClaim",
                field_path=".claimName",
            ),
        )
    )

    volume: VolumeKind = VolumeKind.EMPTY_DIR
    claim_name: str | None = Field(default=None, min_length=1)
    size_limit: str | None = Field(default=None, description="emptyDir size limit, e.g. 300Gi.")
    download_image: str = "docker.io/curlimages/curl:8.11.0"

    @model_validator(mode="after")
    def _mirror_cel(self) -> Storage:
        if self.volume == VolumeKind.PVC and not self.claim_name:
            raise ValueError("storage.claimName is required when storage.volume is persistentVolumeClaim")
        return self


class Autoscaling(_Camel):
    """Replicas from the runtimes' own slot load, as far as the cluster's free GPUs allow. Off by
    default: spec.replicas then belongs to the user, or to an HPA or KEDA driving the scale
    subresource, and the operator never writes it."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel(
                "!self.enabled || has(self.maxReplicas)",
                "autoscaling.maxReplicas is required when autoscaling is enabled",
                field_path=".maxReplicas",
            ),
            _cel(
                "!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
                "autoscaling.minReplicas must not exceed maxReplicas",
                field_path=".minReplicas",
            ),
            _cel(
                "self.targetUtilization > 0.0 && self.targetUtilization <= 1.0",
                "autoscaling.targetUtilization must lie in (0, 1]",
                field_path=".targetUtilization",
            ),
        )
    )

    enabled: bool = False
    min_replicas: int = Field(default=1, ge=1, le=1000)
    max_replicas: int | None = Field(default=None, ge=1, le=1000)
    target_utilization: float = Field(
        default=0.8,
        gt=0.0,
        le=1.0,
        description="Share of every replica's slots the autoscaler aims to keep busy (queued requests"
        " count as load).",
    )
    scale_up_stabilization_seconds: int = Field(
        default=0, ge=0, le=3600, description="A higher load must last this long before replicas are added."
    )
    scale_down_stabilization_seconds: int = Field(
        default=300,
        ge=0,
        le=3600,
        description="A lower load must last this long before replicas are removed.",
    )

    @model_validator(mode="after")
    def _mirror_cel(self) -> Autoscaling:
        if self.enabled and self.max_replicas is None:
            raise ValueError("autoscaling.maxReplicas is required when autoscaling is enabled")
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.minReplicas must not exceed maxReplicas")
        return self


class ModelDeploymentSpec(_Camel):
    model_config = ConfigDict(
        json_schema_extra=_validations(
            _cel(
                "self.headroom >= 0.0 && self.headroom <= 0.9",
                "headroom must lie in [0, 0.9]",
                field_path=".headroom",
            ),
            _cel(
                "self.kvCacheType == 'f16' || self.flashAttention",
                "a quantized kvCacheType needs flashAttention (llama.cpp keeps V in f16 otherwise)",
                field_path=".kvCacheType",
            ),
            _cel(
                "!has(self.storage.claimName) || !self.model.uri.startsWith('pvc://')",
                "storage is for downloaded models; a pvc:// model is mounted from its own claim",
                field_path=".storage.claimName",
            ),
            _cel(
                "!self.autoscaling.enabled || self.engine == 'parallama'",
                AUTOSCALING_ENGINE_MESSAGE,
                field_path=".autoscaling.enabled",
            ),
        )
    )

    model: ModelSource
    engine: Engine = Engine.PARALLAMA
    num_ctx: int = Field(default=4096, ge=256, le=1048576, description="Tokens per slot.")
    parallelism: Parallelism = Field(default_factory=Parallelism)
    kv_cache_type: KVCache = KVCache.F16
    flash_attention: bool = True
    swa_full: bool = Field(
        default=False,
        description="Full-size KV caches for sliding-window layers (llama.cpp's swa_full). Off, like"
        " llama-server: those layers keep only their window, so several times more slots fit.",
    )
    headroom: float = Field(default=0.2, ge=0.0, le=0.9, description="Share of GPU memory kept free.")
    gpu: GPU = Field(default_factory=GPU)
    replicas: int = Field(default=1, ge=0, le=1000)
    resources: dict[str, Any] | None = Field(
        default=None, json_schema_extra=_PRESERVE, description="Container resources besides GPUs."
    )
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    affinity: dict[str, Any] | None = Field(default=None, json_schema_extra=_PRESERVE)
    image: str | None = Field(default=None, description="Runtime image; the operator's default if unset.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    storage: Storage = Field(default_factory=Storage)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)

    @model_validator(mode="after")
    def _mirror_cel(self) -> ModelDeploymentSpec:
        if self.kv_cache_type != KVCache.F16 and not self.flash_attention:
            raise ValueError(
                "a quantized kvCacheType needs flashAttention (llama.cpp keeps V in f16 otherwise)"
            )
        if self.storage.claim_name and self.model.uri.startswith("pvc://"):
            raise ValueError("storage is for downloaded models; a pvc:// model is mounted from its own claim")
        if self.autoscaling.enabled and self.engine != Engine.PARALLAMA:
            raise ValueError(AUTOSCALING_ENGINE_MESSAGE)
        return self


# --------------------------------------------------------------------------------------------------
# status


class Phase(StrEnum):
    PENDING = "Pending"
    PLANNED = "Planned"
    DEPLOYING = "Deploying"
    READY = "Ready"
    DEGRADED = "Degraded"
    UNSCHEDULABLE = "Unschedulable"
    PARTIALLY_SCHEDULED = "PartiallyScheduled"
    INVALID = "Invalid"


class MemoryStatus(_Camel):
    weights_bytes: int = 0
    kv_per_slot_bytes: int = 0
    kv_cache_bytes: int = 0
    recurrent_bytes: int = 0
    """Recurrent state of Mamba/RWKV-style layers: fixed per slot (0 for attention-only models)."""
    compute_bytes: int = 0
    overhead_bytes: int = 0
    headroom_bytes: int = 0
    usable_bytes: int = 0
    total_bytes: int = 0
    capacity_bytes: int = 0
    host_bytes: int = Field(
        default=0,
        description="Host memory one replica needs: embeddings (all of a CPU replica), the runtime process, "
        "and an embedding model's output buffer.",
    )
    output_bytes: int = Field(
        default=0,
        description="llama.cpp's output buffer: logits (and an embedding model's vectors) of every output "
        "row; host memory beside GPUs. An embedding model outputs every token of a batch of numCtx tokens.",
    )


class PlanStatus(_Camel):
    fits: bool
    task: Literal["generate", "embed"] = Field(
        default="generate",
        description="What the runtime serves: embed for a model that pools (an embedding model: a slot "
        "embeds one input of up to numCtx tokens), generate otherwise.",
    )
    pooling: str | None = Field(default=None, description="An embedding model's pooling: mean, cls or last.")
    num_parallel: int
    num_ctx: int
    gpus_per_replica: int
    gpu_product: str | None = None
    gpu_memory_bytes: int | None = None
    kv_cache_type: str
    nodes: list[str] = Field(default_factory=list)
    tensor_split: list[str] = Field(default_factory=list, description="Fractions, as decimal strings.")
    memory: MemoryStatus
    shortfall_bytes: int = 0
    closest_node: str | None = None
    reason: str
    hash: str = Field(description="Digest of what the pods depend on; a change rolls the Deployment.")
    placement: dict[str, int] = Field(
        default_factory=dict, description="Replicas per node, as many as the free GPUs allow."
    )
    replicas_placed: int = 0
    host_memory_bytes: int = Field(
        default=0,
        description="Memory request and limit of the runtime container: memory.hostBytes plus "
        "status.hostReserveBytes; 0 when spec.resources sets the memory.",
    )


class RuntimeFailure(_Camel):
    reason: str = Field(description="unsupported-model or unreadable-file, as the runtime wrote it.")
    message: str = ""
    generation: int | None = Field(default=None, description="The spec generation it was seen for.")


class Condition(_Camel):
    type: Literal["Planned", "Available", "Progressing", "Degraded"]
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class ObservedLoad(_Camel):
    """The last scrape of the ready replicas' /metrics."""

    busy: int = Field(default=0, description="Slots busy, summed over the replicas that reported.")
    queued: int = Field(default=0, description="Requests waiting for a slot, summed likewise.")
    slots_per_replica: int = 0
    reporting: int = Field(default=0, description="Ready replicas whose /metrics were read.")
    missing: int = Field(
        default=0,
        description="Ready replicas whose /metrics could not be read: idle for a scale-up, fully busy "
        "for a scale-down.",
    )


class AutoscalingStatus(_Camel):
    observed: ObservedLoad = Field(default_factory=ObservedLoad)
    desired: int = Field(
        description="Replicas the load asks for after stabilisation, before maxReplicas and capacity."
    )
    current: int = Field(description="Replicas the autoscaler set (spec.replicas).")
    limited_by: Literal["", "max", "capacity"] = Field(
        default="", description="What held the replicas below desired: maxReplicas or the cluster's capacity."
    )
    capacity: int | None = Field(
        default=None,
        description="Replicas the GPU class the deployment runs on can host in all (its own replicas"
        " counted).",
    )
    closest_node: str | None = Field(
        default=None,
        description="When limited by capacity: the node shape that came closest to another replica.",
    )
    shortfall_bytes: int = Field(default=0, description="What that node shape lacks for another replica.")
    message: str = ""
    last_scale_time: str | None = None


class ModelDeploymentStatus(_Camel):
    phase: Phase = Phase.PENDING
    observed_generation: int | None = None
    message: str | None = None
    plan: PlanStatus | None = None
    replicas: int = 0
    ready_replicas: int = 0
    endpoint: str | None = None
    selector: str | None = Field(default=None, description="Label selector of the pods (scale subresource).")
    extra_reserve_bytes: int = Field(
        default=0,
        ge=0,
        description="Bytes kept free per GPU on top of headroom, raised when the runtime ran out of it.",
    )
    host_reserve_bytes: int = Field(
        default=0,
        ge=0,
        description="Host memory added to the runtime container's request, raised after OOMKilled.",
    )
    reserve_key: str | None = Field(
        default=None,
        description="Digest of the spec the reserves were learned under; another spec resets them.",
    )
    runtime_failure: RuntimeFailure | None = Field(
        default=None,
        description="A failure no plan can cure, reported by the runtime; cleared by a spec change.",
    )
    oom_kills: int = 0
    troubles: list[str] = Field(
        default_factory=list, description="Signatures of the OOM kills and slot shortfalls already acted on."
    )
    conditions: list[Condition] = Field(default_factory=list)
    autoscaling: AutoscalingStatus | None = Field(
        default=None, description="What the autoscaler saw and did (spec.autoscaling.enabled)."
    )
