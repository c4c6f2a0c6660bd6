"""Shared GPU clusters against the real control plane of ``make e2e`` (skipped elsewhere).

What the emulated suite cannot prove: the real scheduler binds somebody else's GPU pod and our
replicas, the real API server stores what server-side apply sends and drops what it removes, a
Kubernetes 1.20 server has no CEL to catch a bad name, and the audit log counts every write the
operator's own user makes.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from e2e_cluster import OPERATOR_USER, E2ECluster, kubelet_reports, wait_for
from test_cluster import MDS, SMALL, _writes, md

pytestmark = [pytest.mark.e2e]

CHURN_SECONDS = float(os.environ.get("PARALLAMA_E2E_CHURN_SECONDS", "300"))
"""How long GFD rewrites its timestamp label while the operator must stay silent (issue: 5 minutes)."""
CHURN_PERIOD = 10.0


def owned(e2e_cluster: E2ECluster) -> None:
    if not e2e_cluster.owned:
        pytest.skip("creates nodes and writes pod status: only on a control plane from make e2e")


async def bound_pods(kube: Any, namespace: str, selector: str = "") -> list[dict[str, Any]]:
    query = f"?labelSelector={selector}" if selector else ""
    pods = await kube.get(f"/api/v1/namespaces/{namespace}/pods{query}") or {}
    return [p for p in pods.get("items", []) if (p.get("spec") or {}).get("nodeName")]


async def status_of(kube: Any, namespace: str, name: str, **want: Any) -> dict[str, Any] | None:
    status = ((await kube.get(f"{MDS.format(ns=namespace)}/{name}")) or {}).get("status") or {}
    if not status.get("plan") and not status.get("phase"):
        return None
    return status if all(status.get(k) == v for k, v in want.items()) else None


async def test_gpus_other_pods_hold_are_not_planned(
    kube: Any, namespace: str, e2e_cluster: E2ECluster, run_operator: Any, gpu_nodes: Any
) -> None:
    """The only L4 runs a training pod the scheduler placed there: the model goes to the L20s."""
    owned(e2e_cluster)
    l4 = await gpu_nodes(gpus=1, product="NVIDIA-L4", memory_mib=23034)
    l20 = await gpu_nodes(gpus=8, product="NVIDIA-L20", memory_mib=46068)
    trainer = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "trainer", "labels": {"app": "training"}},
        "spec": {
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
            "containers": [
                {"name": "t", "image": "trainer", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
            ],
        },
    }
    await kube.create(f"/api/v1/namespaces/{namespace}/pods", trainer)
    placed = await wait_for(lambda: bound_pods(kube, namespace, "app=training"), what="the trainer bound")
    assert placed[0]["spec"]["nodeName"] == l4["metadata"]["name"]
    async with run_operator():
        await kube.create(
            MDS.format(ns=namespace), md("chat", {"model": {"uri": "pvc://m/a.gguf", "metadata": SMALL}})
        )
        status = await wait_for(lambda: status_of(kube, namespace, "chat"), what="a plan")
    assert status["plan"]["gpuProduct"] == "NVIDIA-L20"
    assert status["plan"]["placement"] == {l20["metadata"]["name"]: 1}


async def test_replicas_over_two_node_shapes(
    kube: Any, namespace: str, e2e_cluster: E2ECluster, run_operator: Any, gpu_nodes: Any, model_claims: Any
) -> None:
    """Three one-GPU replicas over a 1-GPU and a 2-GPU L4 node: placed 1 + 2, and the scheduler binds
    them so; a fourth has no GPU left and the status says so instead of leaving a Pending pod mute."""
    owned(e2e_cluster)
    small = await gpu_nodes(gpus=1, product="NVIDIA-L4", memory_mib=23034)
    large = await gpu_nodes(gpus=2, product="NVIDIA-L4", memory_mib=23034)
    await model_claims(namespace, "m")  # pvc://m/...: the scheduler needs the claim bound
    path = MDS.format(ns=namespace)
    async with run_operator():
        spec = {"replicas": 3, "model": {"uri": "pvc://m/a.gguf", "metadata": SMALL}}
        await kube.create(path, md("trio", spec))
        status = await wait_for(lambda: status_of(kube, namespace, "trio"), what="a plan")
        assert status["plan"]["placement"] == {small["metadata"]["name"]: 1, large["metadata"]["name"]: 2}

        async def three_bound() -> list[dict[str, Any]] | None:
            pods = await bound_pods(kube, namespace, "app.kubernetes.io/instance=trio")
            return pods if len(pods) == 3 else None

        pods = await wait_for(three_bound, within=120, what="three pods bound")
        per_node: dict[str, int] = {}
        for pod in pods:
            per_node[pod["spec"]["nodeName"]] = per_node.get(pod["spec"]["nodeName"], 0) + 1
        assert per_node == status["plan"]["placement"]

        await kube.merge_patch(f"{path}/trio", {"spec": {"replicas": 4}})

        async def four_asked() -> Any:
            status = await status_of(kube, namespace, "trio")
            return status if status and "of 4 replicas" in status.get("message", "") else None

        partial = await wait_for(four_asked, what="a plan for 4 replicas")
    assert partial["plan"]["replicasPlaced"] == 3 and "only 3 of 4 replicas fit" in partial["message"]
    assert partial["phase"] == "PartiallyScheduled", partial


async def test_cordon_of_the_serving_node_keeps_it_serving(
    kube: Any, namespace: str, e2e_cluster: E2ECluster, run_operator: Any, gpu_nodes: Any, model_claims: Any
) -> None:
    owned(e2e_cluster)
    node = await gpu_nodes(gpus=1, product="NVIDIA-L4", memory_mib=23034)
    await model_claims(namespace, "m")
    name = node["metadata"]["name"]
    path = MDS.format(ns=namespace)
    deployment_path = f"/apis/apps/v1/namespaces/{namespace}/deployments/live"
    async with run_operator():
        await kube.create(path, md("live", {"model": {"uri": "pvc://m/a.gguf", "metadata": SMALL}}))
        [pod] = await wait_for(lambda: bound_pods(kube, namespace), within=120, what="a pod bound")
        await kubelet_reports(kube, namespace, pod["metadata"]["name"], ready=True)
        await wait_for(lambda: status_of(kube, namespace, "live", phase="Ready"), what="Ready")
        before = await kube.get(deployment_path)

        await kube.merge_patch(f"/api/v1/nodes/{name}", {"spec": {"unschedulable": True}})  # kubectl cordon
        degraded = await wait_for(
            lambda: status_of(kube, namespace, "live", phase="Degraded"), what="Degraded"
        )
        after = await kube.get(deployment_path)
        still = await kube.get(f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}")
    assert after["spec"]["replicas"] == 1
    assert after["metadata"]["generation"] == before["metadata"]["generation"], "the Deployment was changed"
    assert still is not None and still["spec"]["nodeName"] == name
    reason = {c["type"]: c for c in degraded["conditions"]}["Degraded"]["reason"]
    assert reason == "InventoryChanged"


async def test_removed_fields_disappear_from_the_children(
    kube: Any, namespace: str, e2e_cluster: E2ECluster, run_operator: Any, gpu_nodes: Any
) -> None:
    """Server-side apply: a nodeSelector key removed from the spec leaves the Deployment, and a switch
    from https:// to pvc:// removes the download init container (the pods would never leave Init)."""
    owned(e2e_cluster)
    await gpu_nodes(gpus=1, product="NVIDIA-L4", memory_mib=23034, labels={"pool": "a"})
    path = MDS.format(ns=namespace)
    deployment_path = f"/apis/apps/v1/namespaces/{namespace}/deployments/swap"
    remote = {"uri": "https://models.example/small.gguf", "sha256": "0" * 64, "metadata": SMALL}
    async with run_operator():
        await kube.create(path, md("swap", {"model": remote, "nodeSelector": {"pool": "a"}}))

        async def with_init() -> Any:
            dep = await kube.get(deployment_path)
            pod = ((dep or {}).get("spec") or {}).get("template", {}).get("spec", {})
            return (
                dep if pod.get("initContainers") and pod.get("nodeSelector", {}).get("pool") == "a" else None
            )

        await wait_for(with_init, what="a Deployment with the download init container and pool=a")
        await kube.merge_patch(
            f"{path}/swap",
            {"spec": {"nodeSelector": None, "model": {"uri": "pvc://m/small.gguf", "sha256": None}}},
        )

        async def switched() -> Any:
            dep = await kube.get(deployment_path)
            pod = ((dep or {}).get("spec") or {}).get("template", {}).get("spec", {})
            gone = not pod.get("initContainers") and "pool" not in (pod.get("nodeSelector") or {})
            return dep if gone else None

        await wait_for(switched, what="no init container and no pool selector")


async def test_a_name_that_cannot_be_a_service_is_invalid(
    kube: Any, namespace: str, e2e_cluster: E2ECluster, run_operator: Any
) -> None:
    """``chat.v2`` is a valid custom-resource name but not a Service name; 1.20 has no CEL to refuse
    it at admission, so the operator does: Invalid, and no child is attempted."""
    path = MDS.format(ns=namespace)
    async with run_operator():
        try:
            await kube.create(path, md("chat.v2", {"model": {"uri": "pvc://m/a.gguf", "metadata": SMALL}}))
        except Exception as error:  # a server with CEL refuses it already: that is fine too
            assert "DNS-1035" in str(error) or "422" in str(error)
            return
        status = await wait_for(
            lambda: status_of(kube, namespace, "chat.v2", phase="Invalid"), what="Invalid"
        )
        assert await kube.get(f"/api/v1/namespaces/{namespace}/services/chat.v2") is None
    assert "DNS-1035" in status["message"]


async def test_label_churn_costs_no_writes(
    kube: Any, namespace: str, e2e_cluster: E2ECluster, run_operator: Any, gpu_nodes: Any
) -> None:
    """Three deployed models, and GPU Feature Discovery rewriting its timestamp label every 10 s: the
    audit log shows not one write by the operator's user for ``CHURN_SECONDS`` (5 minutes in CI)."""
    owned(e2e_cluster)
    nodes = [await gpu_nodes(gpus=2, product="NVIDIA-L4", memory_mib=23034) for _ in range(2)]
    path = MDS.format(ns=namespace)
    async with run_operator():
        for name in ("one", "two", "three"):
            await kube.create(path, md(name, {"model": {"uri": "pvc://m/a.gguf", "metadata": SMALL}}))
        for name in ("one", "two", "three"):
            await wait_for(lambda n=name: kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{n}"))
        await asyncio.sleep(5)  # the first plans' status writes settle
        quiet_from = e2e_cluster.audit_offset()
        deadline = time.monotonic() + CHURN_SECONDS
        stamp = int(time.time())
        while time.monotonic() < deadline:
            stamp += int(CHURN_PERIOD)
            for node in nodes:
                await kube.merge_patch(
                    f"/api/v1/nodes/{node['metadata']['name']}",
                    {"metadata": {"labels": {"nvidia.com/gfd.timestamp": str(stamp)}}},
                )
            await asyncio.sleep(min(CHURN_PERIOD, max(0.0, deadline - time.monotonic())))
        writes = _writes(e2e_cluster.audit_events(OPERATOR_USER, since=quiet_from))
    assert not writes, f"label churn made the operator write: {writes[:10]}"


async def test_deletion_collects_children_and_the_namespace_goes(
    kube: Any, e2e_cluster: E2ECluster, run_operator: Any, gpu_nodes: Any
) -> None:
    """No finalizer holds anything: deleting the namespace with a deployed model in it completes."""
    owned(e2e_cluster)
    await gpu_nodes(gpus=1, product="NVIDIA-L4", memory_mib=23034)
    namespace = f"parallama-gone-{int(time.time())}"
    await kube.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
    async with run_operator():
        await kube.create(
            MDS.format(ns=namespace), md("bye", {"model": {"uri": "pvc://m/a.gguf", "metadata": SMALL}})
        )
        await wait_for(
            lambda: kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/bye"), what="a Deployment"
        )
        found = await kube.get(f"{MDS.format(ns=namespace)}/bye")
        assert not (found["metadata"].get("finalizers") or []), found["metadata"].get("finalizers")
    # the operator is down now: deletion must not wait for it
    await kube.delete(f"/api/v1/namespaces/{namespace}")

    async def gone() -> bool:
        return await kube.get(f"/api/v1/namespaces/{namespace}") is None

    await wait_for(gone, within=120, what="the namespace gone")


async def _deployed_pod(kube: Any, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    await kube.create(MDS.format(ns=namespace), md(name, spec))
    pods = await wait_for(lambda: bound_pods(kube, namespace), within=120, what=f"a pod of {name} bound")
    return pods[0]


@pytest.mark.parametrize(
    ("message", "field", "phase"),
    [
        ("parallama: reason=gpu-oom-load slots=4 num_ctx=4096: cudaMalloc failed", "extraReserveBytes", None),
        (
            "parallama: reason=unsupported-model: architecture 'frobnicator' cannot be planned",
            None,
            "Invalid",
        ),
        ("parallama: reason=unreadable-file: /models/a.gguf is not a GGUF file", None, "Invalid"),
    ],
    ids=["gpu-oom-load", "unsupported-model", "unreadable-file"],
)
async def test_each_termination_reason_gets_its_reaction(
    kube: Any,
    namespace: str,
    e2e_cluster: E2ECluster,
    run_operator: Any,
    gpu_nodes: Any,
    model_claims: Any,
    message: str,
    field: str | None,
    phase: str | None,
) -> None:
    """The runtime's termination message, as the kubelet keeps it in lastState.terminated: only a GPU
    out-of-memory raises the GPU reserve; a model the runtime cannot serve is Invalid, no reserve."""
    owned(e2e_cluster)
    await gpu_nodes(gpus=2, product="NVIDIA-L4", memory_mib=23034)
    await model_claims(namespace, "m")
    async with run_operator():
        pod = await _deployed_pod(
            kube, namespace, "dies", {"model": {"uri": "pvc://m/a.gguf", "metadata": SMALL}}
        )
        await kubelet_reports(
            kube, namespace, pod["metadata"]["name"], ready=False, terminated_message=message
        )

        async def reacted() -> Any:
            status = await status_of(kube, namespace, "dies")
            if not status:
                return None
            if field is not None:
                return status if (status.get(field) or 0) > 0 else None
            return status if status.get("phase") == phase else None

        status = await wait_for(reacted, what=f"the reaction to {message.split(':')[1]}")
    if phase == "Invalid":
        assert not status.get("extraReserveBytes") and not status.get("hostReserveBytes")


async def test_time_slicing_and_mig_label_sets(
    kube: Any, namespace: str, e2e_cluster: E2ECluster, run_operator: Any, gpu_nodes: Any, model_claims: Any
) -> None:
    """GFD's label sets: a time-sliced L4 (4 shares) offers a quarter of its memory per share and never
    two shares to one replica; a MIG 3g.40gb device (mixed strategy) is its own resource, requested by
    the pods and bound by the scheduler."""
    owned(e2e_cluster)
    await model_claims(namespace, "m")
    await gpu_nodes(
        gpus=4,
        product="NVIDIA-L4-SHARED",
        memory_mib=23034,
        labels={"nvidia.com/gpu.replicas": "4", "nvidia.com/gpu.sharing-strategy": "time-slicing"},
    )
    mig = await gpu_nodes(
        gpus=1,
        product="NVIDIA-A100-SXM4-80GB",
        memory_mib=81920,
        labels={
            "nvidia.com/mig.strategy": "mixed",
            "nvidia.com/mig-3g.40gb.count": "2",
            "nvidia.com/mig-3g.40gb.memory": "40192",
        },
    )
    mig_name = mig["metadata"]["name"]
    allocatable = {**mig["status"]["allocatable"], "nvidia.com/mig-3g.40gb": "2"}
    await kube.merge_patch(
        f"/api/v1/nodes/{mig_name}/status", {"status": {"allocatable": allocatable, "capacity": allocatable}}
    )
    eight_gb = {**SMALL, "sizeBytes": 8 * 10**9}  # more than a quarter of an L4, less than a 3g.40gb
    path = MDS.format(ns=namespace)
    async with run_operator():
        shared = {
            "model": {"uri": "pvc://m/a.gguf", "metadata": eight_gb},
            "gpu": {"product": "NVIDIA-L4-SHARED"},
        }
        await kube.create(path, md("shared", shared))
        refused = await wait_for(
            lambda: status_of(kube, namespace, "shared", phase="Unschedulable"), what="refused"
        )
        assert refused["plan"]["fits"] is False

        sliced = {
            "model": {"uri": "pvc://m/a.gguf", "metadata": eight_gb},
            "gpu": {"resourceName": "nvidia.com/mig-3g.40gb"},
        }
        await kube.create(path, md("sliced", sliced))
        status = await wait_for(lambda: status_of(kube, namespace, "sliced"), what="a MIG plan")
        assert status["plan"]["fits"] and status["plan"]["placement"] == {mig_name: 1}

        async def mig_pod() -> Any:
            pods = await bound_pods(kube, namespace, "app.kubernetes.io/instance=sliced")
            return pods[0] if pods else None

        pod = await wait_for(mig_pod, within=120, what="the pod bound to the MIG node")
    assert pod["spec"]["nodeName"] == mig_name
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/mig-3g.40gb"] == "1"


async def test_restart_makes_no_duplicate_and_settles(
    kube: Any, namespace: str, e2e_cluster: E2ECluster, run_operator: Any, gpu_nodes: Any
) -> None:
    """A restarted operator adopts what it made: one Deployment, at most one (no-op) apply per child
    while it learns what the server stored, then silence."""
    owned(e2e_cluster)
    await gpu_nodes(gpus=1, product="NVIDIA-L4", memory_mib=23034)
    path = MDS.format(ns=namespace)
    async with run_operator():
        await kube.create(path, md("again", {"model": {"uri": "pvc://m/a.gguf", "metadata": SMALL}}))
        await wait_for(lambda: kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/again"))
        await asyncio.sleep(3)
    restart_from = e2e_cluster.audit_offset()
    async with run_operator():
        await asyncio.sleep(8)  # resume handlers, the first reconcile of every object
        settled_from = e2e_cluster.audit_offset()
        await asyncio.sleep(8)
    mine = f"/namespaces/{namespace}/"
    after_restart = [
        w for w in _writes(e2e_cluster.audit_events(OPERATOR_USER, since=restart_from)) if mine in w
    ]
    later = [w for w in _writes(e2e_cluster.audit_events(OPERATOR_USER, since=settled_from)) if mine in w]
    deployments = await kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments") or {}
    assert len(deployments.get("items", [])) == 1
    assert not [w for w in after_restart if w.startswith("create ")], after_restart
    assert len([w for w in after_restart if "/deployments/" in w]) <= 1, after_restart
    assert not later, f"the restarted operator kept writing: {later}"
