"""Helpers for the end-to-end suite (see conftest.py for where the cluster comes from)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "modeldeployments.parallama.dev.yaml"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
OPERATOR_USER = "parallama-operator"


@dataclass(frozen=True)
class E2ECluster:
    admin_kubeconfig: Path
    operator_kubeconfig: Path
    directory: Path | None  # set when the cluster is ours (started by scripts/k8s-control-plane.sh)

    @property
    def owned(self) -> bool:
        return self.directory is not None

    @property
    def audit_log(self) -> Path | None:
        return self.directory / "audit.log" if self.directory else None

    def audit_offset(self) -> int:
        """Where the audit log ends now: pass it to :meth:`audit_events` to see only later requests."""
        log = self.audit_log
        return log.stat().st_size if log is not None and log.exists() else 0

    def audit_events(self, user: str = OPERATOR_USER, since: int = 0) -> list[dict[str, Any]]:
        """Every audited request (Metadata level) this user made after byte offset ``since``."""
        if self.audit_log is None or not self.audit_log.exists():
            return []
        with self.audit_log.open("rb") as handle:
            handle.seek(since)
            lines = handle.read().decode().splitlines()
        events = []
        for line in lines:
            event = json.loads(line)
            if event.get("user", {}).get("username") == user:
                events.append(event)
        return events


def find_cluster() -> E2ECluster | None:
    if os.environ.get("KUBECONFIG"):
        path = Path(os.environ["KUBECONFIG"])
        return E2ECluster(path, path, None)
    if os.environ.get("PARALLAMA_E2E_DIR"):
        directory = Path(os.environ["PARALLAMA_E2E_DIR"]).resolve()
        admin, operator = directory / "admin.kubeconfig", directory / "operator.kubeconfig"
        if not (admin.exists() and operator.exists()):
            raise pytest.UsageError(
                f"PARALLAMA_E2E_DIR={directory} has no admin.kubeconfig/operator.kubeconfig: "
                "start it with scripts/k8s-control-plane.sh start DIR"
            )
        return E2ECluster(admin, operator, directory)
    return None


CLUSTER = find_cluster()


def pin_kubeconfig(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Make every credential lookup in this process read ``path``: KubeClient.from_environment reads
    KUBECONFIG, kopf's login reads the kubernetes package's default location (fixed at its import)."""
    import kubernetes.config.kube_config

    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))


def client_for(kubeconfig: Path) -> Any:
    from parallama_operator.kube import KubeClient

    with pytest.MonkeyPatch.context() as patch:
        pin_kubeconfig(patch, kubeconfig)
        return KubeClient.from_environment()


async def apply_crd(client: Any) -> None:
    from parallama_operator.kube import ApiError

    crd = yaml.safe_load(CRD_PATH.read_text())
    name = crd["metadata"]["name"]
    try:
        await client.create(CRDS, crd)
    except ApiError as error:
        if error.status != 409:
            raise
        await client.merge_patch(f"{CRDS}/{name}", {"spec": crd["spec"]})

    async def established() -> bool:
        obj = await client.get(f"{CRDS}/{name}") or {}
        conditions = (obj.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

    await wait_for(established, within=30, what=f"CRD {name} Established")


async def wait_for(fn: Callable[[], Awaitable[Any]], within: float = 90, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await fn()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.5)


# ---------------------------------------------------------------------------------------------------
# What newer API servers have (detected through discovery, never assumed from a version string alone)
# ---------------------------------------------------------------------------------------------------


async def has_group_version(kube: Any, group_version: str) -> bool:
    """Whether discovery lists ``group_version`` (``"v1"`` or ``"policy/v1"``)."""
    if group_version == "v1":
        return True
    groups = await kube.get("/apis") or {}
    return any(
        v.get("groupVersion") == group_version
        for g in groups.get("groups", [])
        for v in g.get("versions", [])
    )


async def server_minor(kube: Any) -> tuple[int, int]:
    version = await kube.get("/version") or {}
    major = int("".join(ch for ch in str(version.get("major", "0")) if ch.isdigit()) or 0)
    minor = int("".join(ch for ch in str(version.get("minor", "0")) if ch.isdigit()) or 0)
    return major, minor


async def has_crd_validation_rules(kube: Any) -> bool:
    """Whether the server enforces CRD ``x-kubernetes-validations`` (CEL): 1.25+ (beta, on by default).
    Older servers drop the field from the stored CRD, which is what is checked first."""
    crd = await kube.get(f"{CRDS}/{yaml.safe_load(CRD_PATH.read_text())['metadata']['name']}") or {}
    stored = json.dumps(crd.get("spec", {}))
    return "x-kubernetes-validations" in stored and await server_minor(kube) >= (1, 25)


async def require_group_version(kube: Any, group_version: str, why: str) -> None:
    if not await has_group_version(kube, group_version):
        version = await kube.get("/version") or {}
        pytest.skip(
            f"{why}: the API server ({version.get('gitVersion', '?')}) does not serve {group_version}"
        )


async def require_crd_validation_rules(kube: Any, why: str) -> None:
    if not await has_crd_validation_rules(kube):
        version = await kube.get("/version") or {}
        pytest.skip(
            f"{why}: the API server ({version.get('gitVersion', '?')}) does not enforce CRD "
            "x-kubernetes-validations (CEL, Kubernetes 1.25+)"
        )


# ---------------------------------------------------------------------------------------------------
# Nodes and pods without kubelets (owned clusters only)
# ---------------------------------------------------------------------------------------------------


def gpu_node(
    name: str,
    *,
    gpus: int = 1,
    product: str = "NVIDIA-L4",
    memory_mib: int = 23034,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Node as a kubelet with NVIDIA's device plugin and GPU Feature Discovery would report it."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.memory": str(memory_mib),
                "nvidia.com/gpu.count": str(gpus),
                **(labels or {}),
            },
        },
        "spec": {},
        "status": {
            "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": str(gpus)},
            "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": str(gpus)},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "written by the parallama e2e suite (no kubelet runs)",
                }
            ],
        },
    }


async def create_gpu_node(kube: Any, name: str, **shape: Any) -> dict[str, Any]:
    """Create a GPU-shaped Node, write its status (Ready, allocatable GPUs) and lift the
    ``node.kubernetes.io/not-ready`` taint the API server's admission adds to every new node."""
    body = gpu_node(name, **shape)
    await kube.create("/api/v1/nodes", body)
    path = f"/api/v1/nodes/{name}"
    await kube.merge_patch(f"{path}/status", {"status": body["status"]})
    node = await kube.get(path) or {}
    taints = [
        t
        for t in (node.get("spec") or {}).get("taints") or []
        if t.get("key") != "node.kubernetes.io/not-ready"
    ]
    await kube.merge_patch(path, {"spec": {"taints": taints or None}})
    return await kube.get(path) or {}


async def kubelet_reports(
    kube: Any,
    namespace: str,
    pod: str,
    *,
    ready: bool = True,
    oom_killed: bool = False,
    terminated_message: str | None = None,
    pod_ip: str = "10.244.0.10",
) -> dict[str, Any]:
    """Write a pod's status as its kubelet would: Running (and Ready), or its container terminated by
    the OOM killer and waiting in CrashLoopBackOff. ``pod_ip`` may be a loopback address a test
    serves on (the autoscaler reads ``http://<podIP>:<port>/metrics``)."""
    path = f"/api/v1/namespaces/{namespace}/pods/{pod}"
    body = await kube.get(path) or {}
    now = "2024-01-01T00:00:00Z"
    containers = []
    for container in body["spec"]["containers"]:
        state: dict[str, Any]
        last: dict[str, Any] = {}
        if oom_killed:
            state = {"waiting": {"reason": "CrashLoopBackOff"}}
            last = {
                "terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": now, "finishedAt": now}
            }
        elif terminated_message is not None:  # the runtime exited and wrote /dev/termination-log
            state = {"waiting": {"reason": "CrashLoopBackOff"}}
            last = {
                "terminated": {
                    "exitCode": 2,
                    "reason": "Error",
                    "message": terminated_message,
                    "startedAt": now,
                    "finishedAt": now,
                }
            }
        else:
            state = {"running": {"startedAt": now}}
        containers.append(
            {
                "name": container["name"],
                "image": container.get("image", ""),
                "imageID": "",
                "ready": ready and not oom_killed and terminated_message is None,
                "restartCount": 1 if oom_killed or terminated_message is not None else 0,
                "started": not oom_killed and terminated_message is None,
                "state": state,
                "lastState": last,
            }
        )
    ok = "True" if ready and not oom_killed and terminated_message is None else "False"
    status = {
        "phase": "Running",
        "startTime": now,
        "podIP": pod_ip,
        "hostIP": "10.0.0.10",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": ok},
            {"type": "Ready", "status": ok},
        ],
        "containerStatuses": containers,
    }
    await kube.merge_patch(f"{path}/status", {"status": status})
    return await kube.get(path) or {}


async def create_bound_claim(kube: Any, namespace: str, claim: str, volume: str) -> dict[str, Any]:
    """A PersistentVolumeClaim already bound to a hostPath PersistentVolume, as a pvc:// model needs:
    the scheduler places no pod whose claim is unbound, and no provisioner runs here. The volume
    controller binds the pair because each names the other."""
    await kube.create(
        "/api/v1/persistentvolumes",
        {
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany", "ReadWriteOnce"],
                "hostPath": {"path": f"/var/lib/parallama-e2e/{volume}"},
                "storageClassName": "",
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
    )
    path = f"/api/v1/namespaces/{namespace}/persistentvolumeclaims"
    await kube.create(
        path,
        {
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "resources": {"requests": {"storage": "1Gi"}},
                "storageClassName": "",
                "volumeName": volume,
            },
        },
    )

    async def bound() -> Any:
        obj = await kube.get(f"{path}/{claim}") or {}
        return obj if (obj.get("status") or {}).get("phase") == "Bound" else None

    return await wait_for(bound, within=60, what=f"claim {claim} Bound")
