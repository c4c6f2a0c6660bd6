"""The operator scenario on a real cluster; skipped without one (see conftest.py: KUBECONFIG, or
PARALLAMA_E2E_DIR from ``make e2e``).

The operator runs in this process as its own least-privilege user (on a cluster started by
scripts/k8s-control-plane.sh: exactly the chart's ClusterRole), the CRD is applied from crds/, and
everything is created in a throw-away namespace. What a cluster adds over the emulated suite: real
admission (schema, and CEL where the server has it), real defaulting, real RBAC, real garbage
collection, a real scheduler.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from e2e_cluster import (
    OPERATOR_USER,
    E2ECluster,
    kubelet_reports,
    require_crd_validation_rules,
    require_group_version,
    wait_for,
)

pytestmark = [pytest.mark.e2e]

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


def md(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "parallama.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }


async def test_admission_refuses_schema_violations(kube: Any, namespace: str) -> None:
    """The OpenAPI schema (types, minimums, enums) is enforced by every supported server."""
    from parallama_operator.kube import ApiError

    bad = md(
        "bad",
        {"model": {"uri": "pvc://models/m.gguf", "metadata": SMALL}, "parallelism": {"minParallel": 0}},
    )
    with pytest.raises(ApiError) as error:
        await kube.create(MDS.format(ns=namespace), bad)
    assert error.value.status == 422 and "minParallel" in str(error.value)


async def test_admission_refuses_invalid_specs(kube: Any, namespace: str) -> None:
    """The CRD's CEL rules (x-kubernetes-validations) need Kubernetes 1.25+."""
    from parallama_operator.kube import ApiError

    await require_crd_validation_rules(kube, "minParallel <= maxParallel is a CEL rule")
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


async def test_operator_user_has_exactly_the_chart_rules(kube: Any, e2e_cluster: E2ECluster) -> None:
    """What the scenario proves holds only if the operator ran with the chart's rules and no more."""
    from parallama_operator.rbac import CLUSTER_RULES

    if not e2e_cluster.owned:
        pytest.skip(
            "the operator's user and binding exist only on a control plane from scripts/k8s-control-plane.sh"
        )
    role = await kube.get("/apis/rbac.authorization.k8s.io/v1/clusterroles/parallama-operator")
    binding = await kube.get("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/parallama-operator")
    assert role is not None and binding is not None
    assert role["rules"] == CLUSTER_RULES
    assert binding["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR_USER}
    ]
    bindings = await kube.get("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings") or {}
    bound = [b["metadata"]["name"] for b in bindings["items"] if OPERATOR_USER in str(b.get("subjects"))]
    assert bound == ["parallama-operator"]


async def test_scenario(
    kube: Any, namespace: str, e2e_cluster: E2ECluster, run_operator: Any, gpu_nodes: Any
) -> None:
    path = MDS.format(ns=namespace)
    audit_from = e2e_cluster.audit_offset()
    if e2e_cluster.owned:  # our control plane has no nodes: one L4, as GPU Feature Discovery labels it
        await gpu_nodes(gpus=1, product="NVIDIA-L4", memory_mib=23034)
    async with run_operator():
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

            await wait_for(collected, within=120, what="the Deployment garbage-collected")
        else:
            assert not e2e_cluster.owned, "the L4 node was created: the small model must fit"
            assert small["phase"] == "Unschedulable" and deployment is None
    forbidden = [
        f"{e['verb']} {e['requestURI']}"
        for e in e2e_cluster.audit_events(OPERATOR_USER, since=audit_from)
        if e.get("responseStatus", {}).get("code") == 403
    ]
    assert not forbidden, f"the operator made calls outside the chart's ClusterRole: {forbidden}"


def _writes(events: list[dict[str, Any]]) -> list[str]:
    """The operator's writes, Events excluded (kopf posts them as it logs)."""
    return [
        f"{e['verb']} {e['requestURI']}"
        for e in events
        if e["verb"] in ("create", "update", "patch", "delete")
        and e.get("objectRef", {}).get("resource") != "events"
    ]


async def test_children_settle(
    kube: Any, namespace: str, e2e_cluster: E2ECluster, run_operator: Any, gpu_nodes: Any
) -> None:
    """Once a fitting model is deployed, the operator stops writing: what it applies must compare equal
    to what the API server stored (defaults filled in, empty values dropped), or it patches forever."""
    if not e2e_cluster.owned:
        pytest.skip("counts the operator's requests in the audit log of a control plane from make e2e")
    path = MDS.format(ns=namespace)
    await gpu_nodes(gpus=1, product="NVIDIA-L4", memory_mib=23034)
    async with run_operator():
        await kube.create(
            path, md("settle", {"model": {"uri": "pvc://models/small.gguf", "metadata": SMALL}})
        )

        async def deployed() -> Any:
            return await kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/settle")

        await wait_for(deployed, what="the Deployment")
        await asyncio.sleep(5)  # kopf's own bookkeeping (progress annotations, status) finishes
        quiet_from = e2e_cluster.audit_offset()
        await asyncio.sleep(10)
        writes = _writes(e2e_cluster.audit_events(OPERATOR_USER, since=quiet_from))
    assert not writes, f"the operator kept writing with nothing changed: {writes}"


async def test_pods_ready_then_oom_killed(
    kube: Any, namespace: str, e2e_cluster: E2ECluster, run_operator: Any, gpu_nodes: Any, model_claims: Any
) -> None:
    """The scheduler places the pod on the GPU node; readiness reaches the status; an OOM kill the
    kubelet reports raises the container's memory limit (a host reserve), not the GPU reserve."""
    if not e2e_cluster.owned:
        pytest.skip("writes pod status as a kubelet: only on a control plane from make e2e")
    path = MDS.format(ns=namespace)
    node = await gpu_nodes(gpus=1, product="NVIDIA-L4", memory_mib=23034)
    await model_claims(namespace, "models")  # pvc://models/...: the scheduler needs the claim bound
    async with run_operator():
        await kube.create(path, md("live", {"model": {"uri": "pvc://models/small.gguf", "metadata": SMALL}}))

        async def bound_pod() -> Any:
            pods = await kube.get(f"/api/v1/namespaces/{namespace}/pods") or {}
            placed = [p for p in pods.get("items", []) if (p.get("spec") or {}).get("nodeName")]
            return placed[0] if placed else None

        pod = await wait_for(bound_pod, within=120, what="a pod scheduled on the GPU node")
        assert pod["spec"]["nodeName"] == node["metadata"]["name"]
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        await kubelet_reports(kube, namespace, pod["metadata"]["name"], ready=True)

        async def status_is(**want: Any) -> Any:
            status = ((await kube.get(f"{path}/live")) or {}).get("status") or {}
            return status if all(status.get(k) == v for k, v in want.items()) else None

        await wait_for(lambda: status_is(phase="Ready", readyReplicas=1), what="phase Ready")
        await kubelet_reports(kube, namespace, pod["metadata"]["name"], oom_killed=True)

        async def host_reserve() -> Any:
            status = ((await kube.get(f"{path}/live")) or {}).get("status") or {}
            return status if (status.get("hostReserveBytes") or 0) > 0 else None

        # host memory, not GPU memory: the container's memory limit grows, the GPU reserve does not
        raised = await wait_for(host_reserve, what="a host reserve after the OOM kill")
        assert raised["oomKills"] >= 1 and not raised.get("extraReserveBytes")


async def test_replicas_get_a_disruption_budget(
    kube: Any, namespace: str, e2e_cluster: E2ECluster, run_operator: Any, gpu_nodes: Any
) -> None:
    """Two replicas get a policy/v1 PodDisruptionBudget (Kubernetes 1.21+)."""
    await require_group_version(kube, "policy/v1", "the operator writes policy/v1 PodDisruptionBudgets")
    path = MDS.format(ns=namespace)
    if e2e_cluster.owned:
        await gpu_nodes(gpus=1, product="NVIDIA-L4", memory_mib=23034)
        await gpu_nodes(gpus=1, product="NVIDIA-L4", memory_mib=23034)
    async with run_operator():
        spec = {"replicas": 2, "model": {"uri": "pvc://models/small.gguf", "metadata": SMALL}}
        await kube.create(path, md("pair", spec))

        async def pdb() -> Any:
            return await kube.get(f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets/pair")

        budget = await wait_for(pdb, what="the PodDisruptionBudget")
        assert budget["metadata"]["ownerReferences"][0]["name"] == "pair"
