"""The operator scenario on a real cluster (KUBECONFIG set); skipped otherwise.

The operator runs in this process against the cluster the kubeconfig points at, the CRD is
applied from crds/, and everything is created in a throw-away namespace. What a cluster adds over
the emulated suite: real admission (schema + CEL), real defaulting, real garbage collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="needs a real cluster (set KUBECONFIG)"),
]

ROOT = Path(__file__).resolve().parents[2]
MDS = "/apis/parallama.dev/v1alpha1/namespaces/{ns}/modeldeployments"
HUGE = {
    "architecture": "llama",
    "sizeBytes": 900 * 10**12,
    "blockCount": 80,
    "embeddingLength": 8192,
    "headCount": 64,
    "contextLength": 8192,
}
SMALL = {**HUGE, "sizeBytes": 2 * 10**9, "blockCount": 16, "embeddingLength": 2048, "headCount": 16}


@pytest.fixture()
async def kube() -> AsyncIterator[Any]:
    from parallama_operator.kube import ApiError, KubeClient

    client = KubeClient.from_environment()
    crd = yaml.safe_load((ROOT / "crds" / "modeldeployments.parallama.dev.yaml").read_text())
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    try:
        await client.create(base, crd)
    except ApiError as error:
        if error.status != 409:
            raise
        await client.merge_patch(f"{base}/{crd['metadata']['name']}", {"spec": crd["spec"]})
    await asyncio.sleep(3)  # the CRD becomes established
    yield client
    await client.close()


@pytest.fixture()
async def namespace(kube: Any) -> AsyncIterator[str]:
    name = f"parallama-e2e-{uuid.uuid4().hex[:6]}"
    await kube.create("/api/v1/namespaces", {"metadata": {"name": name}})
    yield name
    await kube.delete(f"/api/v1/namespaces/{name}")


@contextlib.asynccontextmanager
async def operator() -> AsyncIterator[None]:
    import kopf
    import parallama_operator.handlers  # noqa: F401

    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready)
    )
    await asyncio.wait_for(ready.wait(), 60)
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def wait_for(fn: Any, within: float = 90) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        result = await fn()
        if result:
            return result
        await asyncio.sleep(1)
    raise AssertionError("timed out")


def md(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "parallama.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }


async def test_admission_refuses_invalid_specs(kube: Any, namespace: str) -> None:
    from parallama_operator.kube import ApiError

    bad = md(
        "bad",
        {
            "model": {"uri": "pvc://models/m.gguf", "metadata": SMALL},
            "parallelism": {"minParallel": 5, "maxParallel": 2},
        },
    )
    with pytest.raises(ApiError) as error:
        await kube.create(MDS.format(ns=namespace), bad)
    assert error.value.status == 422 and "minParallel" in str(error.value)


async def test_scenario(kube: Any, namespace: str) -> None:
    path = MDS.format(ns=namespace)
    async with operator():
        await kube.create(path, md("huge", {"model": {"uri": "pvc://models/huge.gguf", "metadata": HUGE}}))
        await kube.create(path, md("small", {"model": {"uri": "pvc://models/small.gguf", "metadata": SMALL}}))

        async def status_of(name: str) -> dict[str, Any] | None:
            obj = await kube.get(f"{path}/{name}")
            status = (obj or {}).get("status") or {}
            return status if status.get("plan") else None

        huge = await wait_for(lambda: status_of("huge"))
        assert huge["phase"] == "Unschedulable" and huge["plan"]["shortfallBytes"] > 0
        assert await kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/huge") is None

        small = await wait_for(lambda: status_of("small"))
        deployment = await kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/small")
        if small["plan"]["fits"]:  # the cluster has GPUs
            assert deployment is not None
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["OLLAMA_NUM_PARALLEL"] == str(small["plan"]["numParallel"])
            assert container["resources"]["limits"]["nvidia.com/gpu"] == str(small["plan"]["gpusPerReplica"])
            uid = (await kube.get(f"{path}/small"))["metadata"]["uid"]
            assert deployment["metadata"]["ownerReferences"][0]["uid"] == uid
            await kube.delete(f"{path}/small")

            async def collected() -> bool:
                return await kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/small") is None

            await wait_for(collected, within=120)
        else:
            assert small["phase"] == "Unschedulable" and deployment is None
