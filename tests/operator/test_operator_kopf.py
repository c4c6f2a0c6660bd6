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


FITTING = {"model": {"uri": "pvc://models/llama.gguf", "metadata": LLAMA_8B}, "numCtx": 24576}
"""4 slots, just fitting one L4."""
PODS = "/api/v1/namespaces/default/pods"


def runtime_pod(name: str, plan_hash: str, restarts: int, terminated: dict[str, Any]) -> dict[str, Any]:
    """A runtime pod as the kubelet reports it after its container ended (restarted or not)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {
                "app.kubernetes.io/managed-by": "parallama-operator",
                "parallama.dev/model-deployment": "chat",
            },
            "annotations": {"parallama.dev/plan-hash": plan_hash},
        },
        "spec": {"containers": [{"name": "runtime", "image": "x"}]},
        "status": {
            "containerStatuses": [
                {
                    "name": "runtime",
                    "restartCount": restarts,
                    "state": {"running": {}},
                    "lastState": {"terminated": terminated},
                }
            ]
        },
    }


def memory(dep: dict[str, Any] | None) -> tuple[str, str]:
    resources = (dep or {})["spec"]["template"]["spec"]["containers"][0]["resources"]
    return resources["requests"]["memory"], resources["limits"]["memory"]


def mib(quantity: str) -> int:
    assert quantity.endswith("Mi"), quantity
    return int(quantity[:-2])


def gpu_oom(slots: int, reason: str = "gpu-oom-load") -> dict[str, Any]:
    message = f"parallama: reason={reason} slots={slots} num_ctx=24576: cudaMalloc failed: out of memory"
    return {"reason": "Error", "exitCode": 1, "message": message}


async def test_oom_killed_raises_host_memory_not_the_gpu_reserve(cluster: Cluster) -> None:
    await cluster.add_node(gfd_node("gpu-l4", "NVIDIA-L4", 1, 23034))
    async with running_operator():
        await cluster.create_md("chat", FITTING)
        before = await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
        dep = await cluster.wait_for(lambda: deployment(cluster, "chat"), what="the Deployment")
        request, limit = memory(dep)
        assert request == limit and mib(limit) * 1024 * 1024 >= before["plan"]["memory"]["hostBytes"]
        pod = runtime_pod("chat-abc", before["plan"]["hash"], 1, {"reason": "OOMKilled", "exitCode": 137})
        await cluster.request("POST", PODS, pod)
        after = await cluster.wait_for(
            lambda: (s := planned(cluster, "chat")) and s.get("hostReserveBytes") and s, what="host reserve"
        )
        await cluster.wait_for(lambda: "OOMKilled" in reasons(cluster, "chat"), what="an OOMKilled event")
        await cluster.wait_for(
            lambda: mib(memory(deployment(cluster, "chat"))[1]) > mib(limit), what="a higher memory limit"
        )
        # the same kill seen again (a pod update, an operator restart) is not counted twice
        await cluster.patch(f"{PODS}/chat-abc", {"metadata": {"labels": {"x": "y"}}})
        await asyncio.sleep(0.5)
    status = cluster.md("chat")["status"]
    assert status["oomKills"] == 1 and not status.get("extraReserveBytes")
    assert status["plan"]["numParallel"] == before["plan"]["numParallel"]  # the GPUs were never short
    raised = mib(memory(deployment(cluster, "chat"))[1])
    assert raised * 1024 * 1024 >= before["plan"]["memory"]["hostBytes"] + after["hostReserveBytes"]
    assert status["phase"] != "Degraded"  # the new limit answered it


async def test_gpu_oom_raises_the_bounded_gpu_reserve_and_a_spec_change_recovers(cluster: Cluster) -> None:
    await cluster.add_node(gfd_node("gpu-l4", "NVIDIA-L4", 1, 23034))
    async with running_operator():
        await cluster.create_md("chat", FITTING)
        before = await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
        limit = memory(await cluster.wait_for(lambda: deployment(cluster, "chat"), what="the Deployment"))[1]
        slots = before["plan"]["numParallel"]
        await cluster.request("POST", PODS, runtime_pod("chat-a", before["plan"]["hash"], 1, gpu_oom(slots)))
        after = await cluster.wait_for(
            lambda: (s := planned(cluster, "chat")) and s.get("extraReserveBytes") and s, what="GPU reserve"
        )
        await cluster.wait_for(lambda: "GPUOutOfMemory" in reasons(cluster, "chat"), what="the event")
        await cluster.wait_for(lambda: "Replanned" in reasons(cluster, "chat"), what="a Replanned event")
        replanned = await cluster.wait_for(
            lambda: (s := planned(cluster, "chat")) and s["plan"]["numParallel"] < slots and s,
            what="fewer slots",
        )
        assert not replanned.get("hostReserveBytes") and memory(deployment(cluster, "chat"))[1] == limit
        # a pod of the old plan failing again (it crash-loops until replaced) adds nothing
        await cluster.request("POST", PODS, runtime_pod("chat-b", before["plan"]["hash"], 2, gpu_oom(slots)))
        # while serving, a pod of the new plan: the reserve grows again, never beyond its cap
        cap = int(before["plan"]["gpuMemoryBytes"] * 0.5)
        for restarts in range(1, 12):
            current = planned(cluster, "chat") or {}
            pod = runtime_pod(
                f"chat-c{restarts}", current["plan"]["hash"], restarts, gpu_oom(1, "gpu-oom-serving")
            )
            await cluster.request("POST", PODS, pod)
            await cluster.wait_for(
                lambda n=2 + restarts: len(cluster.md("chat")["status"].get("troubles") or []) >= n,
                what="the failure recorded",
            )
        capped = cluster.md("chat")["status"]
        assert after["extraReserveBytes"] < capped["extraReserveBytes"] == cap, capped
        # a spec change (another context) starts from the plain estimate again
        await cluster.patch(f"{MD_PATH}/chat", {"spec": {"numCtx": 16384}})
        fresh = await cluster.wait_for(
            lambda: (s := planned(cluster, "chat")) and s["plan"]["numCtx"] == 16384 and s, what="a new plan"
        )
    assert not fresh.get("extraReserveBytes") and not fresh.get("reserveKey")


async def test_unsupported_model_and_unreadable_file_are_invalid_without_replanning(cluster: Cluster) -> None:
    await cluster.add_node(gfd_node("gpu-l4", "NVIDIA-L4", 1, 23034))
    async with running_operator():
        await cluster.create_md("chat", FITTING)
        before = await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
        dep = await cluster.wait_for(lambda: deployment(cluster, "chat"), what="the Deployment")
        message = "parallama: reason=unsupported-model: frob.gguf: architecture 'frobnicator' has no rules"
        terminated = {"reason": "Error", "exitCode": 2, "message": message}
        await cluster.request("POST", PODS, runtime_pod("chat-a", before["plan"]["hash"], 1, terminated))
        invalid = await cluster.wait_for(lambda: planned(cluster, "chat", "Invalid"), what="phase Invalid")
        await cluster.wait_for(lambda: "UnsupportedModel" in reasons(cluster, "chat"), what="the event")
        # the Deployment's readiness and the resync do not take the verdict back
        await cluster.patch(
            "/apis/apps/v1/namespaces/default/deployments/chat/status",
            {"status": {"replicas": 1, "readyReplicas": 0}},
        )
        await asyncio.sleep(0.5)
        assert cluster.md("chat")["status"]["phase"] == "Invalid"
        # a new spec gives the runtime another chance
        await cluster.patch(f"{MD_PATH}/chat", {"spec": {"numCtx": 16384}})
        await cluster.wait_for(
            lambda: (s := planned(cluster, "chat")) and s["phase"] != "Invalid" and s, what="a new plan"
        )
        unreadable = {
            "reason": "Error",
            "exitCode": 2,
            "message": "parallama: reason=unreadable-file: bad magic",
        }
        current = planned(cluster, "chat") or {}
        await cluster.request("POST", PODS, runtime_pod("chat-b", current["plan"]["hash"], 1, unreadable))
        await cluster.wait_for(lambda: planned(cluster, "chat", "Invalid"), what="Invalid again")
        await cluster.wait_for(lambda: "ModelUnreadable" in reasons(cluster, "chat"), what="the event")
    assert invalid["plan"]["numParallel"] == before["plan"]["numParallel"]
    status = cluster.md("chat")["status"]
    assert not status.get("extraReserveBytes") and not status.get("hostReserveBytes")
    assert status["runtimeFailure"]["reason"] == "unreadable-file"
    assert (deployment(cluster, "chat") or {})["spec"]["replicas"] == dep["spec"]["replicas"]
    assert reasons(cluster, "chat").count("UnsupportedModel") == 1


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
