"""Server-side apply of the children, zero writes when nothing changed, refusals that end in Invalid
instead of a retry loop, the model URL allowlist, and the object's life cycle (no finalizer, gauges
forgotten): the real operator against the emulated cluster (kmock + harness, whose minimal apply is
described in harness.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from harness import Cluster, gfd_node, running_operator
from parallama_operator.planning import model_url_refusal, parse_url_allowlist
from prometheus_client import REGISTRY

MD = "parallama.dev/v1alpha1/modeldeployments"
DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
MD_PATH = "/apis/parallama.dev/v1alpha1/namespaces/default/modeldeployments"
CHILDREN = ("deployments", "services", "poddisruptionbudgets", "servicemonitors")
WRITES = ("POST", "PUT", "PATCH", "DELETE")
LLAMA_8B = {
    "architecture": "llama",
    "sizeBytes": 4_920_734_720,
    "blockCount": 32,
    "embeddingLength": 4096,
    "headCount": 32,
    "headCountKv": 8,
    "contextLength": 131072,
}


async def add_gpu_nodes(cluster: Cluster) -> None:
    await cluster.add_node(gfd_node("gpu-l4", "NVIDIA-L4", 1, 23034))
    await cluster.add_node(gfd_node("gpu-l20", "NVIDIA-L20", 8, 46068))


def status_of(cluster: Cluster, name: str) -> dict[str, Any]:
    return cluster.md(name).get("status") or {}


def pod_spec(cluster: Cluster, name: str) -> dict[str, Any]:
    dep = cluster.get(DEPLOYMENTS, name)
    assert dep is not None
    spec: dict[str, Any] = dep["spec"]["template"]["spec"]
    return spec


def env(cluster: Cluster, name: str) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod_spec(cluster, name)["containers"][0]["env"]}


def events(cluster: Cluster, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in cluster.events(name) if e.get("reason") == reason]


def writes_since(cluster: Cluster, index: int) -> list[str]:
    return [
        f"{r.method.value} {r.url.path}"
        for r in cluster.emulator.requests_made()[index:]
        if r.method in WRITES and r.resource is not None
    ]


async def test_apply_removes_dropped_fields_and_uses_the_parallama_field_manager(
    cluster: Cluster, model: dict[str, str]
) -> None:
    await add_gpu_nodes(cluster)
    affinity = {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [{"key": "zone", "operator": "Exists"}]}}
            ]
        }
    }
    spec = {"model": model, "nodeSelector": {"nvidia.com/gpu.present": "true"}, "affinity": affinity}
    async with running_operator():
        await cluster.create_md("chat", spec)
        await cluster.wait_for(lambda: cluster.get(DEPLOYMENTS, "chat"), what="the Deployment")
        pod = pod_spec(cluster, "chat")
        assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true" and pod["affinity"] == affinity
        assert [c["name"] for c in pod["initContainers"]] == ["fetch-model"]
        # no empty env value anywhere (the API server would drop it, and every comparison would differ)
        for container in [*pod["containers"], *pod["initContainers"]]:
            assert all(e.get("value") != "" for e in container["env"]), container["env"]
        assert "PARALLAMA_TENSOR_SPLIT" not in env(cluster, "chat")

        # the nodeSelector key and the affinity go away
        await cluster.patch(f"{MD_PATH}/chat", {"spec": {"nodeSelector": None, "affinity": None}})
        await cluster.wait_for(
            lambda: "nvidia.com/gpu.present" not in pod_spec(cluster, "chat")["nodeSelector"],
            what="the nodeSelector key to be removed",
        )
        assert "affinity" not in pod_spec(cluster, "chat")

        # https -> pvc: the download init container and its volume go away
        pvc_model = {"uri": "pvc://models/llama.gguf", "sha256": None, "metadata": LLAMA_8B}
        await cluster.patch(f"{MD_PATH}/chat", {"spec": {"model": pvc_model}})
        await cluster.wait_for(
            lambda: "initContainers" not in pod_spec(cluster, "chat"), what="the init container to go"
        )
    pod = pod_spec(cluster, "chat")
    (volume,) = [v for v in pod["volumes"] if v["name"].startswith("model-")]
    assert volume["persistentVolumeClaim"]["claimName"] == "models"
    assert "emptyDir" not in volume
    dep = cluster.get(DEPLOYMENTS, "chat")
    assert dep is not None
    assert any(
        f["manager"] == "parallama" and f["operation"] == "Apply" for f in dep["metadata"]["managedFields"]
    )
    applies = [
        r
        for r in cluster.emulator.requests_made()
        if r.method == "PATCH" and r.resource is not None and r.resource.plural in CHILDREN
    ]
    assert applies
    for request in applies:
        assert request.headers["Content-Type"].startswith("application/apply-patch+yaml")
        assert request.params == {"fieldManager": "parallama", "force": "true"}
        assert request.headers["User-Agent"].startswith("parallama-operator/")


async def test_a_reconcile_with_nothing_changed_writes_nothing(
    cluster: Cluster, model: dict[str, str]
) -> None:
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("chat", {"model": model, "replicas": 2})
        await cluster.wait_for(lambda: cluster.get("policy/v1/poddisruptionbudgets", "chat"), what="a PDB")
        await cluster.wait_for(lambda: events(cluster, "chat", "Planned"), what="the Planned event")
        await asyncio.sleep(0.5)  # let the Deployment's own watch event settle
        index = len(cluster.emulator.requests_made())
        # an inventory change that changes no plan: every ModelDeployment is reconciled again
        await cluster.add_node(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": "cpu-1", "labels": {"kubernetes.io/hostname": "cpu-1"}},
                "status": {"allocatable": {"cpu": "8"}, "conditions": [{"type": "Ready", "status": "True"}]},
            }
        )
        await cluster.wait_for(
            lambda: any(
                r.method == "GET" and r.resource is not None and r.resource.plural == "poddisruptionbudgets"
                for r in cluster.emulator.requests_made()[index:]
            ),
            what="a reconcile after the node change",
        )
        await asyncio.sleep(0.5)
    assert writes_since(cluster, index) == ["POST /api/v1/nodes"]


async def test_a_name_that_cannot_name_a_service_is_refused(cluster: Cluster, model: dict[str, str]) -> None:
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("chat.v2", {"model": model})  # the emulator runs no CEL
        status = await cluster.wait_for(
            lambda: (s := status_of(cluster, "chat.v2")).get("phase") == "Invalid" and s, what="Invalid"
        )
        await cluster.wait_for(lambda: events(cluster, "chat.v2", "InvalidName"), what="an InvalidName event")
    assert "DNS-1035" in status["message"] and "chat.v2" in status["message"]
    assert cluster.get(DEPLOYMENTS, "chat.v2") is None and cluster.get(SERVICES, "chat.v2") is None


def service_patches(cluster: Cluster) -> int:
    return sum(
        1
        for r in cluster.emulator.requests_made()
        if r.method == "PATCH" and r.resource is not None and r.resource.plural == "services"
    )


async def test_a_refused_child_gives_invalid_and_an_event_not_a_retry_loop(
    cluster: Cluster, model: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARALLAMA_RETRY_SECONDS", "0.2")
    await add_gpu_nodes(cluster)
    message = (
        'Service "chat" is invalid: spec.ports[0].nodePort: Invalid value: 80: provided port is not in range'
    )
    cluster.emulator.refuse("services", "chat", 422, message)
    async with running_operator():
        await cluster.create_md("chat", {"model": model})
        status = await cluster.wait_for(
            lambda: (s := status_of(cluster, "chat")).get("phase") == "Invalid" and s, what="Invalid"
        )
        (event,) = await cluster.wait_for(lambda: events(cluster, "chat", "ChildRefused"), what="an event")
        await asyncio.sleep(0.6)  # the startup inventory re-plan (debounced) may try once more
        before = service_patches(cluster)
        await asyncio.sleep(1.5)  # several retry periods: nothing is retried
        assert service_patches(cluster) == before
        assert len(events(cluster, "chat", "ChildRefused")) == 1

        # the spec is fixed (here: the refusal lifted and the spec touched): served again
        cluster.emulator.allow("services", "chat")
        await cluster.patch(f"{MD_PATH}/chat", {"spec": {"numCtx": 8192}})
        await cluster.wait_for(lambda: cluster.get(SERVICES, "chat"), what="the Service")
        await cluster.wait_for(
            lambda: status_of(cluster, "chat").get("phase") == "Deploying", what="Deploying"
        )
    (condition,) = [c for c in status["conditions"] if c["type"] == "Planned"]
    assert condition["status"] == "False" and condition["reason"] == "ChildRefused"
    for text in (condition["message"], event["message"]):
        assert "Service chat" in text and "422" in text and "nodePort" in text
        assert "PATCH /api/v1/namespaces/default/services/chat" in text
    assert event["type"] == "Warning"


async def test_a_spec_reverted_while_a_retry_is_pending_is_applied(
    cluster: Cluster, model: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARALLAMA_RETRY_SECONDS", "0.3")
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("chat", {"model": model})
        await cluster.wait_for(lambda: cluster.get(SERVICES, "chat"), what="the Service")
        # the Service fails transiently: the Deployment gets the new spec, the Service does not
        cluster.emulator.refuse("services", "chat", 503, "etcd is having a moment")
        await cluster.patch(f"{MD_PATH}/chat", {"spec": {"numCtx": 8192}})
        await cluster.wait_for(lambda: env(cluster, "chat")["OLLAMA_CONTEXT_LENGTH"] == "8192", what="8192")
        await cluster.patch(f"{MD_PATH}/chat", {"spec": {"numCtx": 4096}})  # reverted
        await asyncio.sleep(0.5)
        cluster.emulator.allow("services", "chat")
        status = await cluster.wait_for(
            lambda: (
                (s := status_of(cluster, "chat")).get("observedGeneration") == 3
                and env(cluster, "chat")["OLLAMA_CONTEXT_LENGTH"] == "4096"
                and s
            ),
            what="the reverted spec applied",
        )
    assert status["plan"]["numCtx"] == 4096 and status["phase"] != "Invalid"


async def test_http_without_sha256_is_refused(cluster: Cluster, model: dict[str, str]) -> None:
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("plain", {"model": {"uri": model["uri"]}})
        status = await cluster.wait_for(
            lambda: (s := status_of(cluster, "plain")).get("phase") == "Invalid" and s, what="Invalid"
        )
    assert "sha256" in status["message"] and cluster.get(DEPLOYMENTS, "plain") is None


async def test_the_url_allowlist_refuses_other_hosts_before_fetching(
    cluster: Cluster, model_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARALLAMA_MODEL_URL_ALLOW", "huggingface.co,*.hf.co")
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("chat", {"model": model_server.source})
        status = await cluster.wait_for(
            lambda: (s := status_of(cluster, "chat")).get("phase") == "Invalid" and s, what="Invalid"
        )
        await cluster.wait_for(lambda: events(cluster, "chat", "ModelURLRefused"), what="an event")
    assert "allowlist" in status["message"] and "127.0.0.1" in status["message"]
    assert model_server.ranges == []  # nothing was fetched


@pytest.mark.parametrize(
    ("uri", "allow", "allowed"),
    [
        ("https://huggingface.co/x.gguf", "", True),
        ("http://10.0.0.1/x.gguf", "", True),  # empty: everything (the documented risk)
        ("https://huggingface.co/x.gguf", "huggingface.co", True),
        ("https://cdn.hf.co/x.gguf", "huggingface.co, *.hf.co", True),
        ("https://evil.example/x.gguf", "huggingface.co,*.hf.co", False),
        ("http://huggingface.co/x.gguf", "huggingface.co", False),  # https only unless http is listed
        ("http://models.internal/x.gguf", "http://models.internal", True),
        ("https://models.internal:8443/x.gguf", "models.internal:8443", True),
        ("https://models.internal:9443/x.gguf", "models.internal:8443", False),
        ("https://HuggingFace.co/x.gguf", "huggingface.co", True),
        ("https://huggingface.co.evil.example/x.gguf", "huggingface.co", False),
    ],
)
def test_model_url_allowlist(uri: str, allow: str, allowed: bool) -> None:
    assert (model_url_refusal(uri, parse_url_allowlist(allow)) is None) is allowed


async def test_no_finalizer_and_gauges_go_with_the_object(cluster: Cluster, model: dict[str, str]) -> None:
    await add_gpu_nodes(cluster)
    async with running_operator():
        await cluster.create_md("chat", {"model": model})
        await cluster.create_md("other", {"model": model})
        await cluster.wait_for(lambda: status_of(cluster, "chat").get("plan"), what="a plan")
        await cluster.wait_for(lambda: status_of(cluster, "other").get("plan"), what="a plan")
        assert not cluster.md("chat")["metadata"].get("finalizers")
        labels = {"namespace": "default", "name": "chat"}
        assert REGISTRY.get_sample_value("parallama_operator_planned_slots", labels)
        await cluster.delete(f"{MD_PATH}/chat")
        await cluster.wait_for(
            lambda: REGISTRY.get_sample_value("parallama_operator_planned_slots", labels) is None,
            what="the gauge to go",
        )
        assert REGISTRY.get_sample_value("parallama_operator_planned_gpus_per_replica", labels) is None
    # with the operator down, a delete does not wait for it
    await cluster.delete(f"{MD_PATH}/other")
    assert cluster.get(MD, "other") is None
