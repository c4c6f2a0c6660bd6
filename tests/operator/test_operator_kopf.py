"""The real kopf operator against the emulated cluster (kmock + harness): end-to-end scenarios."""

from __future__ import annotations

import asyncio
from typing import Any

from harness import Cluster, gfd_node, running_operator
from prometheus_client import REGISTRY

MD = "parallama.dev/v1alpha1/modeldeployments"
DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
CHILDREN = ("deployments", "services", "poddisruptionbudgets", "servicemonitors")
WRITES = ("POST", "PUT", "PATCH", "DELETE")
MD_PATH = "/apis/parallama.dev/v1alpha1/namespaces/default/modeldeployments"
BIG = {
    "architecture": "llama",
    "sizeBytes": 900 * 10**9,
    "blockCount": 80,
    "embeddingLength": 8192,
    "headCount": 64,
    "headCountKv": 8,
    "contextLength": 131072,
}
LLAMA_8B = {**BIG, "sizeBytes": 4_920_734_720, "blockCount": 32, "embeddingLength": 4096, "headCount": 32}


async def add_gpu_nodes(cluster: Cluster) -> None:
    await cluster.add_node(gfd_node("gpu-l4", "NVIDIA-L4", 1, 23034))
    await cluster.add_node(gfd_node("gpu-l20", "NVIDIA-L20", 8, 46068))


def planned(cluster: Cluster, name: str, phase: str | None = None) -> dict[str, Any] | None:
    status = cluster.md(name).get("status") or {}
    if not status.get("plan") or (phase and status.get("phase") != phase):
        return None
    return status


def deployment(cluster: Cluster, name: str) -> dict[str, Any] | None:
    return cluster.get(DEPLOYMENTS, name)


def env(dep: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def reasons(cluster: Cluster, name: str) -> list[str]:
    return [e.get("reason", "") for e in cluster.events(name)]


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


async def test_plans_from_gguf_header_over_http_and_deploys(cluster: Cluster, model_server: Any) -> None:
    ok_before = sample("parallama_operator_reconcile_total", result="ok")
    model = model_server.source
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("chat", {"model": model})
        await cluster.create_md("chat-too", {"model": model})
        await cluster.wait_for(lambda: planned(cluster, "chat-too"), what="a plan for the second one")
        status = await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
        dep = await cluster.wait_for(lambda: deployment(cluster, "chat"), what="the Deployment")
        await cluster.wait_for(lambda: "Planned" in reasons(cluster, "chat"), what="a Planned event")

    plan = status["plan"]
    assert status["phase"] == "Deploying" and plan["fits"]
    assert plan["gpuProduct"] == "NVIDIA-L4"  # the smallest GPU that holds 4 slots
    assert env(dep)["OLLAMA_NUM_PARALLEL"] == str(plan["numParallel"])
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == str(plan["gpusPerReplica"])
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == plan["gpuProduct"]
    assert plan["memory"]["weightsBytes"] > 0 and plan["memory"]["kvPerSlotBytes"] > 0
    uid = cluster.md("chat")["metadata"]["uid"]
    for child in (dep, cluster.get(SERVICES, "chat")):
        assert child is not None and child["metadata"]["ownerReferences"][0]["uid"] == uid
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Planned"]["status"] == "True" and conditions["Progressing"]["status"] == "True"
    assert status["endpoint"] == "http://chat.default.svc:11434"
    assert sample("parallama_operator_reconcile_total", result="ok") > ok_before
    # only the header was read, with Range requests, once for both resources (cached by URI + sha256)
    assert model_server.ranges and all(r and r.startswith("bytes=0-") for r in model_server.ranges)
    assert len(model_server.ranges) == 1
    assert sample("parallama_operator_planned_slots", namespace="default", name="chat") == plan["numParallel"]


async def test_too_big_model_is_unschedulable_without_pods(cluster: Cluster) -> None:
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("huge", {"model": {"uri": "pvc://models/huge.gguf", "metadata": BIG}})
        status = await cluster.wait_for(
            lambda: planned(cluster, "huge", "Unschedulable"), what="Unschedulable"
        )
        await cluster.wait_for(lambda: "Unschedulable" in reasons(cluster, "huge"), what="an event")
        assert status["plan"]["shortfallBytes"] > 0 and not status["plan"]["fits"]
        assert "lacks" in status["message"] and "8 x NVIDIA-L20" in status["message"]
        assert status["replicas"] == 0
        assert deployment(cluster, "huge") is None
        (event,) = [e for e in cluster.events("huge") if e.get("reason") == "Unschedulable"]
        assert event["type"] == "Warning" and "lacks" in event["message"]

        # a node big enough joins: the model is planned and deployed there
        await cluster.add_node(gfd_node("gpu-b200", "NVIDIA-B200", 8, 183359))
        dep = await cluster.wait_for(
            lambda: deployment(cluster, "huge"), what="a Deployment on the B200 node"
        )
    status = cluster.md("huge")["status"]
    assert status["plan"]["fits"] and status["plan"]["gpuProduct"] == "NVIDIA-B200"
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == str(
        status["plan"]["gpusPerReplica"]
    )


async def test_invalid_spec_is_reported_and_the_operator_keeps_working(
    cluster: Cluster, model: dict[str, str]
) -> None:
    await add_gpu_nodes(cluster)
    async with running_operator():
        # the emulator runs no admission (a real API server would refuse this spec)
        await cluster.create_md("bad", {"model": model, "parallelism": {"minParallel": 5, "maxParallel": 2}})
        await cluster.create_md(
            "missing", {"model": {**model, "uri": model["uri"].replace("demo.gguf", "nope.gguf")}}
        )
        await cluster.wait_for(
            lambda: cluster.md("bad").get("status", {}).get("phase") == "Invalid", what="Invalid"
        )
        await cluster.wait_for(
            lambda: cluster.md("missing").get("status", {}).get("phase") == "Invalid",
            what="Invalid for an unreadable model",
        )
        await cluster.create_md("good", {"model": model})
        await cluster.wait_for(lambda: planned(cluster, "good"), what="the next resource to be planned")
        await cluster.wait_for(lambda: "InvalidSpec" in reasons(cluster, "bad"), what="an InvalidSpec event")
    bad = cluster.md("bad")["status"]
    (condition,) = [c for c in bad["conditions"] if c["type"] == "Planned"]
    assert condition["status"] == "False" and condition["reason"] == "InvalidSpec"
    assert "minParallel" in condition["message"]
    missing = cluster.md("missing")["status"]
    assert "404" in missing["message"]
    assert deployment(cluster, "bad") is None and deployment(cluster, "missing") is None


async def test_node_changes_replan_and_roll_only_on_a_new_plan(
    cluster: Cluster, model: dict[str, str]
) -> None:
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("chat", {"model": model})
        await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
        first = await cluster.wait_for(lambda: deployment(cluster, "chat"), what="the Deployment")
        assert first["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-L4"

        # a change the planner does not read: no new plan, the Deployment is left alone
        await cluster.patch("/api/v1/nodes/gpu-l20", {"metadata": {"labels": {"team": "research"}}})
        await asyncio.sleep(1.0)
        assert (
            deployment(cluster, "chat")["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        )

        await cluster.delete_node("gpu-l4")
        status = await cluster.wait_for(
            lambda: (s := planned(cluster, "chat")) and s["plan"]["gpuProduct"] == "NVIDIA-L20" and s,
            what="a plan on the L20 node",
        )
        await cluster.wait_for(lambda: "Replanned" in reasons(cluster, "chat"), what="a Replanned event")
        dep = deployment(cluster, "chat")
        assert dep is not None
        assert dep["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-L20"
        assert env(dep)["OLLAMA_NUM_PARALLEL"] == str(status["plan"]["numParallel"])

        # cordon the last GPU node: nothing fits any more, the pods go away
        await cluster.patch("/api/v1/nodes/gpu-l20", {"spec": {"unschedulable": True}})
        await cluster.wait_for(lambda: planned(cluster, "chat", "Unschedulable"), what="Unschedulable")
        await cluster.wait_for(
            lambda: deployment(cluster, "chat")["spec"]["replicas"] == 0, what="zero replicas"
        )


async def test_restart_creates_no_duplicates(cluster: Cluster, model: dict[str, str]) -> None:
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("chat", {"model": model, "replicas": 2})
        await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
        await cluster.wait_for(lambda: cluster.get("policy/v1/poddisruptionbudgets", "chat"), what="a PDB")
        # kopf posts events in the background: let the first one land before this operator stops
        await cluster.wait_for(lambda: "Planned" in reasons(cluster, "chat"), what="the Planned event")
    hash_before = cluster.md("chat")["status"]["plan"]["hash"]
    before = len(cluster.emulator.requests_made())
    async with running_operator():
        await asyncio.sleep(1.5)  # resume handlers run on start
    resumed = cluster.emulator.requests_made()[before:]
    assert any(r.method == "GET" and r.resource and r.resource.plural == "deployments" for r in resumed)
    # the children were applied once (server-side apply creates them) and not written again
    child_writes = [
        str(r.url) for r in resumed if r.method != "GET" and r.resource and r.resource.plural in CHILDREN
    ]
    assert child_writes == []
    assert len(cluster.emulator.objects_of(DEPLOYMENTS)) == 1
    assert len(cluster.emulator.objects_of(SERVICES)) == 1
    assert cluster.md("chat")["status"]["plan"]["hash"] == hash_before
    assert reasons(cluster, "chat").count("Planned") == 1


async def test_deleting_leaves_owned_children_for_the_garbage_collector(
    cluster: Cluster, model: dict[str, str]
) -> None:
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("chat", {"model": model})
        await cluster.wait_for(lambda: deployment(cluster, "chat"), what="the Deployment")
        uid = cluster.md("chat")["metadata"]["uid"]
        await cluster.delete(f"{MD_PATH}/chat")
        await cluster.wait_for(lambda: cluster.get(MD, "chat") is None, what="the ModelDeployment to go")
    for resource in (DEPLOYMENTS, SERVICES):
        child = cluster.get(resource, "chat")
        assert child is not None
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == uid and ref["blockOwnerDeletion"] is True


async def test_oom_kill_degrades_and_replans_with_more_reserve(cluster: Cluster) -> None:
    await cluster.add_node(gfd_node("gpu-l4", "NVIDIA-L4", 1, 23034))
    spec = {
        "model": {"uri": "pvc://models/llama.gguf", "metadata": LLAMA_8B},
        "numCtx": 24576,
    }  # 4 slots, just fitting
    async with running_operator():
        await cluster.create_md("chat", spec)
        before = (await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan"))["plan"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "chat-abc",
                "namespace": "default",
                "labels": {
                    "app.kubernetes.io/managed-by": "parallama-operator",
                    "parallama.dev/model-deployment": "chat",
                },
            },
            "spec": {"containers": [{"name": "runtime", "image": "x"}]},
            "status": {
                "containerStatuses": [
                    {
                        "name": "runtime",
                        "restartCount": 1,
                        "state": {"running": {}},
                        "lastState": {"terminated": {"reason": "OOMKilled"}},
                    }
                ]
            },
        }
        await cluster.request("POST", "/api/v1/namespaces/default/pods", pod)
        after = await cluster.wait_for(
            lambda: (s := planned(cluster, "chat")) and s.get("extraReserveBytes") and s, what="extra reserve"
        )
        await cluster.wait_for(lambda: "OOMKilled" in reasons(cluster, "chat"), what="an OOMKilled event")
        await cluster.wait_for(lambda: "Replanned" in reasons(cluster, "chat"), what="a Replanned event")
        # the same kill seen again (a pod update, an operator restart) is not counted twice
        await cluster.patch("/api/v1/namespaces/default/pods/chat-abc", {"metadata": {"labels": {"x": "y"}}})
        await asyncio.sleep(0.5)
    status = cluster.md("chat")["status"]
    assert status["oomKills"] == 1 and after["extraReserveBytes"] > 0
    assert status["plan"]["numParallel"] < before["numParallel"]
    assert env(deployment(cluster, "chat") or {})["OLLAMA_NUM_PARALLEL"] == str(status["plan"]["numParallel"])


async def test_deployment_readiness_is_mirrored(cluster: Cluster, model: dict[str, str]) -> None:
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("chat", {"model": model})
        await cluster.wait_for(lambda: deployment(cluster, "chat"), what="the Deployment")
        # the emulator has no controllers: play the Deployment controller's part
        await cluster.patch(
            "/apis/apps/v1/namespaces/default/deployments/chat/status",
            {"status": {"replicas": 1, "readyReplicas": 1}},
        )
        status = await cluster.wait_for(lambda: planned(cluster, "chat", "Ready"), what="Ready")
        # someone deletes the Deployment: the operator puts it back
        uid = deployment(cluster, "chat")["metadata"]["uid"]
        await cluster.delete("/apis/apps/v1/namespaces/default/deployments/chat")
        await cluster.wait_for(
            lambda: deployment(cluster, "chat")["metadata"]["uid"] != uid, what="a new one"
        )
    assert status["readyReplicas"] == 1 and status["replicas"] == 1
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Available"] == "True" and conditions["Progressing"] == "False"


async def test_service_monitor_only_when_its_crd_is_served(cluster: Cluster, model: dict[str, str]) -> None:
    await add_gpu_nodes(cluster)
    spec = {"model": model, "monitoring": {"serviceMonitor": True}}
    async with running_operator():
        await cluster.create_md("without", spec)
        await cluster.wait_for(lambda: deployment(cluster, "without"), what="the Deployment")
        assert cluster.get("monitoring.coreos.com/v1/servicemonitors", "without") is None
        cluster.emulator.declare_service_monitors()  # the Prometheus operator gets installed
        await cluster.create_md("with", spec)
        monitor = await cluster.wait_for(
            lambda: cluster.get("monitoring.coreos.com/v1/servicemonitors", "with"), what="a ServiceMonitor"
        )
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["ownerReferences"][0]["uid"] == cluster.md("with")["metadata"]["uid"]


async def test_spec_changes_are_applied(cluster: Cluster, model: dict[str, str]) -> None:
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("chat", {"model": model})
        await cluster.wait_for(lambda: deployment(cluster, "chat"), what="the Deployment")
        await cluster.patch(f"{MD_PATH}/chat", {"spec": {"parallelism": {"numParallel": 2}, "replicas": 3}})
        dep = await cluster.wait_for(
            lambda: (d := deployment(cluster, "chat")) and env(d)["OLLAMA_NUM_PARALLEL"] == "2" and d,
            what="two slots",
        )
        await cluster.wait_for(lambda: cluster.get("policy/v1/poddisruptionbudgets", "chat"), what="a PDB")
        status = await cluster.wait_for(
            lambda: (s := planned(cluster, "chat")) and s.get("observedGeneration") == 2 and s,
            what="generation 2",
        )
        # back to one replica: the PDB goes (one pod cannot tolerate a disruption anyway)
        await cluster.patch(f"{MD_PATH}/chat", {"spec": {"replicas": 1}})
        await cluster.wait_for(
            lambda: cluster.get("policy/v1/poddisruptionbudgets", "chat") is None, what="no PDB"
        )
    assert dep["spec"]["replicas"] == 3
    assert status["plan"]["numParallel"] == 2 and "as requested" in status["plan"]["reason"]
    assert reasons(cluster, "chat").count("Planned") == 2  # the first plan and the changed one
