"""Where the end-to-end tests find their cluster, and the helpers a cluster without kubelets needs.

Two ways to point the suite at a cluster:

* ``KUBECONFIG``: any real cluster. The tests and the in-process operator share its credentials;
  nothing cluster-wide is created (no fake nodes), so node-shaping tests skip.
* ``PARALLAMA_E2E_DIR`` (with ``KUBECONFIG`` unset): a control plane started by
  ``scripts/k8s-control-plane.sh start DIR`` (``make e2e`` does both). The tests' own setup (CRD,
  namespaces, GPU-shaped Nodes, pod status a kubelet would write) runs as the admin of
  ``DIR/admin.kubeconfig``; the operator under test runs as the user ``parallama-operator`` of
  ``DIR/operator.kubeconfig``, bound to exactly the chart's ClusterRole (rendered from
  ``parallama_operator.rbac.CLUSTER_RULES``), and every request lands in ``DIR/audit.log``.

No kubelet runs in that control plane: Nodes are plain objects (created Ready, without the
``node.kubernetes.io/not-ready`` taint the API server adds), the scheduler binds pods to them, and a
test that needs a pod Running/Ready/OOMKilled writes its status itself (:func:`kubelet_reports`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from e2e_cluster import (
    CLUSTER,
    E2ECluster,
    apply_crd,
    client_for,
    create_bound_claim,
    create_gpu_node,
    pin_kubeconfig,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CLUSTER is not None:
        return
    skip = pytest.mark.skip(
        reason="needs a real cluster: set KUBECONFIG, or PARALLAMA_E2E_DIR to a directory started by "
        "scripts/k8s-control-plane.sh (make e2e does it)"
    )
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def e2e_cluster() -> E2ECluster:
    assert CLUSTER is not None  # the collection hook skips every test otherwise
    return CLUSTER


@pytest_asyncio.fixture()
async def kube(e2e_cluster: E2ECluster) -> AsyncIterator[Any]:
    """The test's own client (the admin on an owned cluster), with the CRD applied and Established."""
    client = client_for(e2e_cluster.admin_kubeconfig)
    try:
        await apply_crd(client)
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture()
async def namespace(kube: Any) -> AsyncIterator[str]:
    name = f"parallama-e2e-{uuid.uuid4().hex[:6]}"
    await kube.create("/api/v1/namespaces", {"metadata": {"name": name}})
    yield name
    await kube.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture()
def run_operator(
    e2e_cluster: E2ECluster, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], contextlib.AbstractAsyncContextManager[None]]:
    """The real operator (every handler) in this event loop, as the operator's least-privilege user."""

    @contextlib.asynccontextmanager
    async def running() -> AsyncIterator[None]:
        import kopf
        import parallama_operator.handlers  # noqa: F401

        pin_kubeconfig(monkeypatch, e2e_cluster.operator_kubeconfig)
        monkeypatch.setenv("PARALLAMA_REPLAN_DEBOUNCE_SECONDS", "0.5")
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(
            kopf.operator(clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready)
        )
        try:
            await asyncio.wait_for(ready.wait(), 60)
            yield
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(task, 30)

    return running


@pytest_asyncio.fixture()
async def gpu_nodes(
    e2e_cluster: E2ECluster, kube: Any
) -> AsyncIterator[Callable[..., Awaitable[dict[str, Any]]]]:
    """A factory of GPU-shaped Nodes (``await gpu_nodes(gpus=2, product="NVIDIA-A100-SXM4-80GB",
    memory_mib=81920)``), deleted after the test; a call skips the test on a cluster that is not ours."""
    created: list[str] = []

    async def make(name: str | None = None, **shape: Any) -> dict[str, Any]:
        if not e2e_cluster.owned:
            pytest.skip("creates fake GPU nodes: only on a control plane from scripts/k8s-control-plane.sh")
        name = name or f"gpu-{uuid.uuid4().hex[:6]}"
        created.append(name)
        return await create_gpu_node(kube, name, **shape)

    yield make
    for name in created:  # the pod GC controller then removes the pods bound to it
        with contextlib.suppress(Exception):
            await kube.delete(f"/api/v1/nodes/{name}")


@pytest_asyncio.fixture()
async def model_claims(
    e2e_cluster: E2ECluster, kube: Any
) -> AsyncIterator[Callable[..., Awaitable[dict[str, Any]]]]:
    """A factory of bound claims for pvc:// models (``await model_claims(namespace, "models")``);
    their hostPath PersistentVolumes are deleted after the test."""
    volumes: list[str] = []

    async def make(namespace: str, claim: str) -> dict[str, Any]:
        if not e2e_cluster.owned:
            pytest.skip(
                "creates PersistentVolumes: only on a control plane from scripts/k8s-control-plane.sh"
            )
        volume = f"parallama-e2e-{uuid.uuid4().hex[:6]}"
        volumes.append(volume)
        return await create_bound_claim(kube, namespace, claim, volume)

    yield make
    for volume in volumes:
        with contextlib.suppress(Exception):
            await kube.delete(f"/api/v1/persistentvolumes/{volume}")
