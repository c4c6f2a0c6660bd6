"""Manifests of a ModelDeployment's children: plan + spec -> plain dicts (pure, no API calls).

Every builder returns the full desired object; the handlers server-side apply it (field manager
``parallama``), so a field absent here is removed from the child. The env contract of the runtime
(``OLLAMA_*``/``PARALLAMA_*``, see /work/shared/design.md) is written here and nowhere else.

No builder emits an empty env ``value``: the API server drops it, so the stored object would never
equal the desired one. No user string reaches a shell: the download script is a constant that reads
the URI, digest and paths from its environment.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from .inventory import GPU_PRODUCT_LABEL
from .resources import API_VERSION, KIND, Engine, ModelDeploymentSpec, PlanStatus, VolumeKind

__all__ = [
    "APPLIED_HASH_ANNOTATION",
    "ASSUMED_LOAD_BYTES_PER_SECOND",
    "DEFAULT_OLLAMA_IMAGE",
    "DEFAULT_RUNTIME_IMAGE",
    "DOWNLOAD_SCRIPT",
    "INSTANCE_LABEL",
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "MODEL_DEPLOYMENT_LABEL",
    "PLAN_HASH_ANNOTATION",
    "Owner",
    "applied_hash",
    "build_all",
    "build_deployment",
    "build_pdb",
    "build_service",
    "build_service_monitor",
    "model_path",
    "pod_labels",
    "runtime_env",
    "selector_string",
    "startup_failure_threshold",
    "with_applied_hash",
]

DEFAULT_RUNTIME_IMAGE = "ghcr.io/parallama/parallama-runtime:0.1.0"
"""The chart's runtime image at its appVersion; the chart passes its own as PARALLAMA_RUNTIME_IMAGE."""
DEFAULT_OLLAMA_IMAGE = "docker.io/ollama/ollama:0.12.3"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "parallama-operator"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MODEL_DEPLOYMENT_LABEL = "parallama.dev/model-deployment"
PLAN_HASH_ANNOTATION = "parallama.dev/plan-hash"
APPLIED_HASH_ANNOTATION = "parallama.dev/applied-hash"
"""Digest of the desired object the operator last applied to a child (see :func:`applied_hash`)."""

ASSUMED_LOAD_BYTES_PER_SECOND = 200 * 1024 * 1024
"""A pessimistic read speed (network volume, cold page cache) for sizing the startup probe: a 200 GB
model then gets about 17 minutes before the kubelet gives up, a 2 GB one 70 s."""
STARTUP_BASE_SECONDS = 60
STARTUP_PERIOD_SECONDS = 10
RUN_AS_USER = 10001
MODEL_MOUNT = "/models"


@dataclass(frozen=True)
class Owner:
    """The ModelDeployment the children belong to (for names, labels and ownerReferences)."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, extra_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "labels": {**common_labels(self.name), **(extra_labels or {})},
            "ownerReferences": [self.reference()],
        }


def common_labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "parallama",
        INSTANCE_LABEL: name,
        "app.kubernetes.io/component": "model-server",
        MANAGED_BY_LABEL: MANAGED_BY,
        MODEL_DEPLOYMENT_LABEL: name,
    }


def pod_labels(name: str) -> dict[str, str]:
    """The selector labels: stable forever, because a Deployment's selector is immutable."""
    return {"app.kubernetes.io/name": "parallama", INSTANCE_LABEL: name, MODEL_DEPLOYMENT_LABEL: name}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(pod_labels(name).items()))


def model_path(spec: ModelDeploymentSpec) -> str:
    """Where the GGUF file is inside the pod."""
    uri = urlparse(spec.model.uri)
    if uri.scheme == "file":
        return uri.path
    if uri.scheme == "pvc":
        return posixpath.join(MODEL_MOUNT, posixpath.basename(uri.path))
    return posixpath.join(MODEL_MOUNT, posixpath.basename(uri.path) or "model.gguf")


def runtime_env(spec: ModelDeploymentSpec, plan: PlanStatus) -> list[dict[str, str]]:
    env = {
        "OLLAMA_NUM_PARALLEL": str(plan.num_parallel),
        "OLLAMA_CONTEXT_LENGTH": str(plan.num_ctx),
        "OLLAMA_KV_CACHE_TYPE": plan.kv_cache_type,
        "OLLAMA_FLASH_ATTENTION": "1" if spec.flash_attention else "0",
        "OLLAMA_HOST": f"0.0.0.0:{spec.service.port}",
        "PARALLAMA_GPU_LAYERS": "-1",
        "PARALLAMA_MODEL": model_path(spec),
        "PARALLAMA_SWA_FULL": "1" if spec.swa_full else "0",
    }
    if plan.gpus_per_replica > 1 and plan.tensor_split:  # one GPU: nothing to split, no empty value
        env["PARALLAMA_TENSOR_SPLIT"] = ",".join(plan.tensor_split)
    if spec.engine == Engine.OLLAMA:
        env |= {"OLLAMA_MODELS": "/data/ollama", "HOME": "/tmp", "OLLAMA_KEEP_ALIVE": "-1"}
    return [{"name": k, "value": v} for k, v in env.items()]


def startup_failure_threshold(weights_bytes: int) -> int:
    """Probe periods the kubelet waits for the model to load; a download happens in the init
    container, so it does not count here, but a page-cache-cold read of the weights does."""
    seconds = STARTUP_BASE_SECONDS + weights_bytes / ASSUMED_LOAD_BYTES_PER_SECOND
    return max(6, math.ceil(seconds / STARTUP_PERIOD_SECONDS))


def model_volume_name(spec: ModelDeploymentSpec) -> str:
    """The model volume's name says its source: server-side apply merges list items by name, and on
    Kubernetes 1.20 it keeps a dropped source next to the new one (emptyDir and persistentVolumeClaim
    in one volume: 422). A new name for a new source makes the old item disappear whole."""
    uri = urlparse(spec.model.uri)
    if uri.scheme == "pvc":
        return "model-claim"
    return "model-store" if spec.storage.volume == VolumeKind.PVC else "model-cache"


def _volumes(spec: ModelDeploymentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts of the runtime container)."""
    name = model_volume_name(spec)
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    uri = urlparse(spec.model.uri)
    if uri.scheme == "pvc":
        sub = posixpath.dirname(uri.path.lstrip("/"))
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": uri.netloc, "readOnly": True}})
        mount: dict[str, Any] = {"name": name, "mountPath": MODEL_MOUNT, "readOnly": True}
        if sub:
            mount["subPath"] = sub
        mounts.append(mount)
    elif uri.scheme in ("http", "https"):
        if spec.storage.volume == VolumeKind.PVC:
            volumes.append({"name": name, "persistentVolumeClaim": {"claimName": spec.storage.claim_name}})
        else:
            empty: dict[str, Any] = {}
            if spec.storage.size_limit:
                empty["sizeLimit"] = spec.storage.size_limit
            volumes.append({"name": name, "emptyDir": empty})
        mounts.append({"name": name, "mountPath": MODEL_MOUNT, "readOnly": True})
    if spec.engine == Engine.OLLAMA:
        volumes.append({"name": "data", "emptyDir": {}})
        mounts.append({"name": "data", "mountPath": "/data"})
    return volumes, mounts


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


DOWNLOAD_SCRIPT = """\
set -eu
if [ -s "$MODEL_PATH" ]; then
  if [ -z "${MODEL_SHA256:-}" ] || echo "$MODEL_SHA256  $MODEL_PATH" | sha256sum -c -; then
    echo "model present"; exit 0
  fi
  echo "the present model does not match sha256: downloading it again"
fi
part="$MODEL_PATH.part.$POD_NAME"
curl -fSL --retry 5 --retry-delay 5 -C - -o "$part" --url "$MODEL_URI"
if [ -n "${MODEL_SHA256:-}" ] && ! echo "$MODEL_SHA256  $part" | sha256sum -c -; then
  echo "sha256 mismatch"; rm -f "$part"; exit 1
fi
mv -f "$part" "$MODEL_PATH"
"""
"""The init container's whole script: a constant. The URI, digest and paths arrive as environment
variables and are only ever expanded inside double quotes, so a URI with quotes, ``$(...)`` or
``;`` is inert data. Each pod downloads to its own ``.part.<pod name>`` file (replicas sharing a PVC
never write the same file; a restarted pod resumes its own), checks the digest, then renames it
into place atomically."""


def _download_container(spec: ModelDeploymentSpec) -> dict[str, Any]:
    """Fetch the model once (a PVC keeps it across restarts) and refuse a file whose digest differs:
    a truncated or swapped model would otherwise load as garbage or crash llama.cpp."""
    env: list[dict[str, Any]] = [
        {"name": "MODEL_URI", "value": spec.model.uri},
        {"name": "MODEL_PATH", "value": model_path(spec)},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    if spec.model.sha256:
        env.append({"name": "MODEL_SHA256", "value": spec.model.sha256})
    return {
        "name": "fetch-model",
        "image": spec.storage.download_image,
        "command": ["sh", "-c", DOWNLOAD_SCRIPT],
        "env": env,
        "volumeMounts": [{"name": model_volume_name(spec), "mountPath": MODEL_MOUNT}],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": _container_security(),
    }


def _probes(spec: ModelDeploymentSpec, plan: PlanStatus) -> dict[str, Any]:
    threshold = startup_failure_threshold(plan.memory.weights_bytes)
    if spec.engine == Engine.OLLAMA:
        # Ollama has no /readyz; the model is "ready" once `ollama create` registered it.
        return {
            "startupProbe": {
                "httpGet": {"path": "/", "port": "http"},
                "periodSeconds": STARTUP_PERIOD_SECONDS,
                "failureThreshold": threshold,
            },
            "readinessProbe": {"exec": {"command": ["ollama", "show", "model"]}, "periodSeconds": 10},
            "livenessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 20},
        }
    return {
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": STARTUP_PERIOD_SECONDS,
            "failureThreshold": threshold,
        },
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 20,
            "failureThreshold": 3,
        },
    }


_OLLAMA_SCRIPT = (
    "ollama serve & pid=$!; until ollama list >/dev/null 2>&1; do sleep 1; done; "
    'printf "FROM %s\\nPARAMETER num_ctx %s\\n" "$PARALLAMA_MODEL" "$OLLAMA_CONTEXT_LENGTH"'
    " > /tmp/Modelfile; "
    "ollama create model -f /tmp/Modelfile && ollama run model '' >/dev/null; wait $pid"
)


def build_deployment(
    owner: Owner,
    spec: ModelDeploymentSpec,
    plan: PlanStatus,
    *,
    default_image: str = DEFAULT_RUNTIME_IMAGE,
    default_pull_policy: str | None = None,
    replicas: int | None = None,
) -> dict[str, Any]:
    """The runtime pods. GPUs per pod = the plan's GPUs per replica, pinned to the planned product."""
    gpu_resource = spec.gpu.resource_name
    resources: dict[str, Any] = {
        "requests": dict((spec.resources or {}).get("requests") or {}),
        "limits": dict((spec.resources or {}).get("limits") or {}),
    }
    if plan.gpus_per_replica > 0:
        resources["limits"][gpu_resource] = str(plan.gpus_per_replica)
        resources["requests"].pop(gpu_resource, None)
    if plan.host_memory_bytes > 0:  # 0 when spec.resources sets the memory (see planning.plan_status)
        # request = limit: an OOM kill then means the estimate was short, never a busy node
        memory = f"{-(-plan.host_memory_bytes // (1024 * 1024))}Mi"
        resources["requests"]["memory"] = memory
        resources["limits"]["memory"] = memory
    resources = {k: v for k, v in resources.items() if v}

    node_selector = dict(spec.node_selector or {})
    if plan.gpu_product:
        node_selector[GPU_PRODUCT_LABEL] = plan.gpu_product

    volumes, mounts = _volumes(spec)
    image = spec.image or (DEFAULT_OLLAMA_IMAGE if spec.engine == Engine.OLLAMA else default_image)
    container: dict[str, Any] = {
        "name": "runtime",
        "image": image,
        "ports": [{"name": "http", "containerPort": spec.service.port, "protocol": "TCP"}],
        "env": runtime_env(spec, plan),
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": _container_security(),
        **_probes(spec, plan),
    }
    # the operator's default policy (from the chart) only applies to the operator's default image
    pull_policy = spec.image_pull_policy or (None if spec.image else default_pull_policy)
    if pull_policy:
        container["imagePullPolicy"] = pull_policy
    if spec.engine == Engine.OLLAMA:
        container["command"] = ["/bin/sh", "-c", _OLLAMA_SCRIPT]

    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
    }
    if urlparse(spec.model.uri).scheme in ("http", "https"):
        pod_spec["initContainers"] = [_download_container(spec)]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = [dict(t) for t in spec.tolerations or []]
    if plan.gpus_per_replica > 0 and not any(t.get("key") == gpu_resource for t in tolerations):
        # GPU node pools are commonly tainted with the GPU resource name; pods that asked for GPUs
        # are exactly the ones meant to land there
        tolerations.append({"key": gpu_resource, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.affinity:
        pod_spec["affinity"] = dict(spec.affinity)

    labels = pod_labels(owner.name)
    annotations = {PLAN_HASH_ANNOTATION: plan.hash}
    metadata = owner.metadata()
    metadata["annotations"] = dict(annotations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "selector": {"matchLabels": labels},
            # GPUs are scarce: surging would need spare GPUs the plan never counted on
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {**common_labels(owner.name)}, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def build_service(owner: Owner, spec: ModelDeploymentSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owner.metadata(),
        "spec": {
            "type": spec.service.type.value,
            "selector": pod_labels(owner.name),
            "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_service_monitor(owner: Owner, spec: ModelDeploymentSpec) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": owner.metadata(),
        "spec": {
            "selector": {"matchLabels": pod_labels(owner.name)},
            "namespaceSelector": {"matchNames": [owner.namespace]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": spec.monitoring.interval}],
        },
    }


def build_pdb(owner: Owner) -> dict[str, Any]:
    """One pod at a time may be evicted: a drain then never takes every replica of a model down."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": owner.metadata(),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": pod_labels(owner.name)}},
    }


def applied_hash(obj: Mapping[str, Any]) -> str:
    """Digest of a desired object (its own hash annotation left out), in canonical JSON."""
    meta = dict(obj.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != APPLIED_HASH_ANNOTATION}
    meta["annotations"] = annotations
    canonical = json.dumps({**obj, "metadata": meta}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def with_applied_hash(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The object with its :func:`applied_hash` in the ``parallama.dev/applied-hash`` annotation."""
    meta = dict(obj.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}), APPLIED_HASH_ANNOTATION: applied_hash(obj)}
    return {**obj, "metadata": meta}


def build_all(
    owner: Owner,
    spec: ModelDeploymentSpec,
    plan: PlanStatus,
    *,
    service_monitor_available: bool,
    pdb_available: bool = True,
    default_image: str = DEFAULT_RUNTIME_IMAGE,
    default_pull_policy: str | None = None,
) -> list[dict[str, Any]]:
    """Every child a fitting plan needs (an unschedulable plan gets none: see the handlers).

    ``pdb_available`` is False on API servers without ``policy/v1`` (Kubernetes < 1.21): then there
    is no PodDisruptionBudget rather than one that would be refused on every reconcile."""
    children = [
        build_deployment(
            owner, spec, plan, default_image=default_image, default_pull_policy=default_pull_policy
        ),
        build_service(owner, spec),
    ]
    if spec.monitoring.service_monitor and service_monitor_available:
        children.append(build_service_monitor(owner, spec))
    if spec.replicas > 1 and pdb_available:
        children.append(build_pdb(owner))
    return children
