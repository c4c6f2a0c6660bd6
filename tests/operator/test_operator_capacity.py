"""Capacity in a shared cluster, against the emulated API server: GPUs other pods hold are not
free, replicas are placed (or the shortfall said), and inventory churn never takes a serving model
down. The same scenarios are meant to run against the real control plane in tests/e2e."""

from __future__ import annotations

import asyncio
from typing import Any

from harness import Cluster, gfd_node, running_operator
from test_operator_kopf import deployment, planned, reasons

DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"


def gpu_pod(name: str, node: str, gpus: int) -> dict[str, Any]:
    """Somebody else's workload, already bound to ``node`` by the scheduler."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "training"}},
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "train", "image": "trainer", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
            ],
        },
        "status": {"phase": "Running"},
    }


async def test_gpus_held_by_other_pods_are_not_planned(cluster: Cluster, model: dict[str, str]) -> None:
    """The only L4 runs somebody's training pod: the model goes to the L20 node instead of being
    planned onto a GPU the scheduler cannot give it."""
    await cluster.add_node(gfd_node("gpu-l4", "NVIDIA-L4", 1, 23034))
    await cluster.add_node(gfd_node("gpu-l20", "NVIDIA-L20", 8, 46068))
    await cluster.request("POST", "/api/v1/namespaces/default/pods", gpu_pod("trainer", "gpu-l4", 1))
    async with running_operator():
        await asyncio.sleep(0.5)  # the pod watch lists the training pod
        await cluster.create_md("chat", {"model": model})
        status = await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
    assert status["plan"]["gpuProduct"] == "NVIDIA-L20"
    assert status["plan"]["placement"] == {"gpu-l20": 1}
    assert "gpu-l4" not in status["plan"]["nodes"]


async def test_replicas_that_do_not_all_fit_are_reported(cluster: Cluster, model: dict[str, str]) -> None:
    await cluster.add_node(gfd_node("gpu-a", "NVIDIA-L4", 1, 23034))
    await cluster.add_node(gfd_node("gpu-b", "NVIDIA-L4", 1, 23034))
    async with running_operator():
        await cluster.create_md("chat", {"model": model, "replicas": 3})
        status = await cluster.wait_for(
            lambda: planned(cluster, "chat", "PartiallyScheduled"), what="partial"
        )
        await cluster.wait_for(lambda: "PartiallyScheduled" in reasons(cluster, "chat"), what="an event")
    assert status["plan"]["replicasPlaced"] == 2
    assert status["plan"]["placement"] == {"gpu-a": 1, "gpu-b": 1}
    assert "only 2 of 3 replicas fit" in status["message"]


async def test_a_cordon_never_takes_a_serving_model_down(cluster: Cluster, model: dict[str, str]) -> None:
    await cluster.add_node(gfd_node("gpu-l4", "NVIDIA-L4", 1, 23034))
    async with running_operator():
        await cluster.create_md("chat", {"model": model})
        await cluster.wait_for(lambda: deployment(cluster, "chat"), what="the Deployment")
        # the emulator has no controllers: play the Deployment controller's part
        await cluster.patch(f"{DEPLOYMENTS}/chat/status", {"status": {"replicas": 1, "readyReplicas": 1}})
        await cluster.wait_for(lambda: planned(cluster, "chat", "Ready"), what="Ready")
        before = deployment(cluster, "chat")
        assert before is not None

        # kubectl cordon, the first step of every drain: nothing else fits, yet the model keeps serving
        await cluster.patch("/api/v1/nodes/gpu-l4", {"spec": {"unschedulable": True}})
        status = await cluster.wait_for(lambda: planned(cluster, "chat", "Degraded"), what="Degraded")
        await cluster.wait_for(lambda: "InventoryChanged" in reasons(cluster, "chat"), what="an event")
        after = deployment(cluster, "chat")
        assert after is not None
        assert after["spec"]["replicas"] == 1
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
        assert status["plan"]["fits"] and status["plan"]["gpuProduct"] == "NVIDIA-L4"
        degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "InventoryChanged"
        assert "would not fit" in degraded["message"]

        # a spec change does re-plan: now nothing fits and the pods go
        await cluster.patch(
            "/apis/parallama.dev/v1alpha1/namespaces/default/modeldeployments/chat",
            {"spec": {"numCtx": 8192}},
        )
        await cluster.wait_for(lambda: planned(cluster, "chat", "Unschedulable"), what="Unschedulable")
        await cluster.wait_for(lambda: deployment(cluster, "chat")["spec"]["replicas"] == 0, what="no pods")


async def test_no_pdb_loop_where_policy_v1_is_not_served(cluster: Cluster, model: dict[str, str]) -> None:
    """Kubernetes 1.20 has no policy/v1: two replicas get no PodDisruptionBudget, one event says
    why, and nothing is refused over and over."""
    cluster.emulator.forget_policy_v1()
    await cluster.add_node(gfd_node("gpu-l20", "NVIDIA-L20", 8, 46068))
    async with running_operator():
        await cluster.create_md("chat", {"model": model, "replicas": 2})
        await cluster.wait_for(lambda: deployment(cluster, "chat"), what="the Deployment")
        await cluster.wait_for(lambda: "NoPodDisruptionBudget" in reasons(cluster, "chat"), what="the event")
        status = await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
    assert status["phase"] != "Invalid"
    pdb_writes = [
        r
        for r in cluster.emulator.requests_made()
        if "poddisruptionbudgets" in str(r.url) and r.method != "GET"
    ]
    assert pdb_writes == []
    assert reasons(cluster, "chat").count("NoPodDisruptionBudget") == 1


async def test_a_pending_pod_the_scheduler_cannot_place_is_reported(
    cluster: Cluster, model: dict[str, str]
) -> None:
    await cluster.add_node(gfd_node("gpu-l4", "NVIDIA-L4", 1, 23034))
    async with running_operator():
        await cluster.create_md("chat", {"model": model})
        dep = await cluster.wait_for(lambda: deployment(cluster, "chat"), what="the Deployment")
        labels = dep["spec"]["template"]["metadata"]["labels"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "chat-abc", "namespace": "default", "labels": labels},
            "spec": {"containers": [{"name": "runtime", "image": "x"}]},
        }
        await cluster.request("POST", "/api/v1/namespaces/default/pods", pod)
        why = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
        status = {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why}
            ],
        }
        await cluster.patch("/api/v1/namespaces/default/pods/chat-abc/status", {"status": status})
        await cluster.wait_for(lambda: "PodUnschedulable" in reasons(cluster, "chat"), what="the event")

        def progressing() -> dict[str, Any] | None:
            conditions = (cluster.md("chat").get("status") or {}).get("conditions") or []
            found = [
                c for c in conditions if c["type"] == "Progressing" and c["reason"] == "PodUnschedulable"
            ]
            return found[0] if found else None

        condition = await cluster.wait_for(progressing, what="Progressing PodUnschedulable")
    assert "Insufficient nvidia.com/gpu" in condition["message"]
    assert reasons(cluster, "chat").count("PodUnschedulable") == 1
