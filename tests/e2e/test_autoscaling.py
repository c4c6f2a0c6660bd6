"""Autoscaling against the real control plane of ``make e2e`` (skipped elsewhere).

The real controller-manager makes the ReplicaSet and its pods, the real scheduler binds them to GPU
nodes and refuses what does not fit; the test plays the kubelet (status Running and Ready) and the
runtimes: each pod's ``status.podIP`` is a loopback address (127.0.0.2, 127.0.0.3, ...) where the
test serves fake ``/metrics`` (tests/support/fake_runtime.py), so the operator reads them exactly as
it reads real runtimes, as its least-privilege user.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from e2e_cluster import OPERATOR_USER, E2ECluster, kubelet_reports, wait_for
from support.fake_runtime import FakeRuntimes
from test_cluster import MDS, SMALL, md
from test_shared_cluster import bound_pods, owned

pytestmark = [pytest.mark.e2e]

PERIOD = 0.5
WINDOW = 4
"""The scale-down stabilisation window of the scenario, seconds."""


@pytest_asyncio.fixture(autouse=True)
async def leave_nothing_behind(kube: Any, namespace: str) -> AsyncIterator[None]:
    """Delete the ModelDeployment and force-delete its pods before the namespace goes: without a
    kubelet, deleted pods stay Terminating and keep the namespace (and the ModelDeployment in it)
    alive, and the next test's operator would find and reconcile it there."""
    yield
    path = f"{MDS.format(ns=namespace)}/chat"
    with contextlib.suppress(Exception):
        await kube.delete(path)
    with contextlib.suppress(Exception):
        await wait_for(lambda: _gone(kube, path), within=30, what="the ModelDeployment deleted")

    async def no_pods() -> bool:
        pods = (await kube.get(f"/api/v1/namespaces/{namespace}/pods") or {}).get("items") or []
        for pod in pods:
            with contextlib.suppress(Exception):  # gone meanwhile
                await kube.request(
                    "DELETE",
                    f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}",
                    {"gracePeriodSeconds": 0},
                )
        return not pods

    with contextlib.suppress(Exception):
        await wait_for(no_pods, within=60, what="the pods deleted")


async def _gone(kube: Any, path: str) -> bool:
    return await kube.get(path) is None


class Kubelet:
    """Reports every bound, not yet reported pod of ``instance`` Running and Ready at the next free
    fake runtime address; remembers which pod got which."""

    def __init__(self, kube: Any, namespace: str, instance: str, fakes: FakeRuntimes) -> None:
        self.kube, self.namespace, self.instance, self.fakes = kube, namespace, instance, fakes
        self.addresses: dict[str, str] = {}

    async def run(self) -> None:
        while True:
            pods = await bound_pods(self.kube, self.namespace, f"app.kubernetes.io/instance={self.instance}")
            for pod in pods:
                name = pod["metadata"]["name"]
                if name in self.addresses or pod["metadata"].get("deletionTimestamp"):
                    continue
                free = [a for a in self.fakes.addresses if a not in self.addresses.values()]
                self.addresses[name] = free[0]
                await kubelet_reports(self.kube, self.namespace, name, pod_ip=free[0])
            await asyncio.sleep(0.3)


@contextlib.asynccontextmanager
async def kubelet(kube: Any, namespace: str, instance: str, fakes: FakeRuntimes) -> AsyncIterator[Kubelet]:
    playing = Kubelet(kube, namespace, instance, fakes)
    task = asyncio.create_task(playing.run())
    try:
        yield playing
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def md_of(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    return (await kube.get(f"{MDS.format(ns=namespace)}/{name}")) or {}


async def autoscaling_of(kube: Any, namespace: str, name: str, **want: Any) -> dict[str, Any] | None:
    status = ((await md_of(kube, namespace, name)).get("status") or {}).get("autoscaling") or {}
    if not status or any(status.get(k) != v for k, v in want.items()):
        return None
    return dict(status)


async def events_of(kube: Any, namespace: str, name: str, reason: str) -> list[dict[str, Any]]:
    events = await kube.get(f"/api/v1/namespaces/{namespace}/events") or {}
    return [
        e
        for e in events.get("items", [])
        if e.get("reason") == reason and (e.get("involvedObject") or {}).get("name") == name
    ]


async def ready_replicas(kube: Any, namespace: str, name: str, count: int) -> bool:
    dep = await kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}") or {}
    return (dep.get("status") or {}).get("readyReplicas") == count and dep["spec"]["replicas"] == count


async def test_load_scales_to_capacity_then_down_after_the_window_without_a_storm(
    kube: Any,
    namespace: str,
    e2e_cluster: E2ECluster,
    run_operator: Any,
    gpu_nodes: Any,
    model_claims: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two L4 GPUs host two replicas; a 1 GiB GPU elsewhere holds none. Rising load scales 1 -> 2,
    then asks for more and is told capacity holds it (status, one Warning); an unreachable replica
    holds a falling load's scale-down; once it answers again, the lull scales down after the window."""
    owned(e2e_cluster)
    audit_from = e2e_cluster.audit_offset()
    monkeypatch.setenv("PARALLAMA_AUTOSCALE_INTERVAL_SECONDS", str(PERIOD))
    monkeypatch.setenv("PARALLAMA_AUTOSCALE_SCRAPE_TIMEOUT_SECONDS", "1")
    await gpu_nodes(gpus=2, product="NVIDIA-L4", memory_mib=23034)
    await gpu_nodes(gpus=1, product="NVIDIA-T4", memory_mib=1024)
    await model_claims(namespace, "m")
    async with FakeRuntimes(4) as fakes, run_operator(), kubelet(kube, namespace, "chat", fakes) as playing:
        spec = {
            "model": {"uri": "pvc://m/a.gguf", "metadata": SMALL},
            "service": {"port": fakes.port},
            "autoscaling": {
                "enabled": True,
                "maxReplicas": 6,
                "scaleDownStabilizationSeconds": WINDOW,
            },
        }
        await kube.create(MDS.format(ns=namespace), md("chat", spec))
        await wait_for(
            lambda: ready_replicas(kube, namespace, "chat", 1), within=120, what="one ready replica"
        )
        slots = (await md_of(kube, namespace, "chat"))["status"]["plan"]["numParallel"]
        (first,) = playing.addresses.values()

        # rising load: 2 x slots of load want 1 more replica at 80 % of slots (ceil(2 / 0.8) = 3 needs
        # capacity for 3; first a load that 2 replicas serve)
        fakes.set(first, busy=slots, queued=slots // 2)
        await wait_for(
            lambda: ready_replicas(kube, namespace, "chat", 2), within=120, what="two ready replicas"
        )
        scaled = await autoscaling_of(kube, namespace, "chat")
        assert scaled is not None and scaled["current"] == 2 and scaled["limitedBy"] == ""

        fakes.set_all(busy=slots, queued=2 * slots)  # 6 x slots over two replicas: 8 wanted, 6 allowed
        capped = await wait_for(
            lambda: autoscaling_of(kube, namespace, "chat", limitedBy="capacity"), what="limited by capacity"
        )
        assert capped["current"] == 2 and capped["desired"] == 8 and capped["capacity"] == 2
        assert capped["closestNode"] == "1 x NVIDIA-T4 (1.0 GiB)" and capped["shortfallBytes"] > 0
        await asyncio.sleep(6 * PERIOD)  # more rounds at capacity: no third pod, one warning
        assert (await md_of(kube, namespace, "chat"))["spec"]["replicas"] == 2
        pods = await kube.get(
            f"/api/v1/namespaces/{namespace}/pods?labelSelector=app.kubernetes.io/instance=chat"
        )
        assert len(pods["items"]) == 2, "no Pending pod beyond capacity"
        (warning,) = await events_of(kube, namespace, "chat", "AutoscalingAtCapacity")
        assert warning["type"] == "Warning" and "NVIDIA-T4" in warning["message"]

        # falling load, but one replica cannot be read: counted as fully busy, it holds both replicas
        second = next(a for a in playing.addresses.values() if a != first)
        fakes.set_all(busy=0, queued=0)
        await fakes.stop(second)
        await wait_for(
            lambda: autoscaling_of(kube, namespace, "chat", limitedBy=""), what="the load fall observed"
        )
        await asyncio.sleep(WINDOW + 4 * PERIOD)
        held = await autoscaling_of(kube, namespace, "chat")
        assert held is not None and held["observed"]["missing"] == 1 and held["current"] == 2
        assert (await md_of(kube, namespace, "chat"))["spec"]["replicas"] == 2
        unavailable = await events_of(kube, namespace, "chat", "ReplicaMetricsUnavailable")
        assert len(unavailable) == 1

        # it answers again, idle: the lull scales down once it has lasted the window
        await fakes.start(second)
        answered = time.monotonic()
        await wait_for(
            lambda: autoscaling_of(kube, namespace, "chat", current=1), within=WINDOW + 30, what="scaled to 1"
        )
        waited = time.monotonic() - answered
    assert waited >= WINDOW - 2 * PERIOD, waited
    scaled_events = await events_of(kube, namespace, "chat", "Scaled")
    messages = sorted(e["message"].split(":")[0] for e in scaled_events)
    assert messages == ["scaled from 1 to 2 replicas", "scaled from 2 to 1 replicas"]
    verbs = {
        (e["verb"], (e.get("objectRef") or {}).get("resource"))
        for e in e2e_cluster.audit_events(since=audit_from)
    }
    assert ("list", "pods") in verbs and ("patch", "modeldeployments") in verbs
    forbidden = [
        e["requestURI"]
        for e in e2e_cluster.audit_events(OPERATOR_USER, audit_from)
        if e["responseStatus"]["code"] == 403
    ]
    assert forbidden == [], "the autoscaler needs no rule beyond the chart's ClusterRole"


async def test_without_autoscaling_the_scale_subresource_is_left_to_others(
    kube: Any,
    namespace: str,
    e2e_cluster: E2ECluster,
    run_operator: Any,
    gpu_nodes: Any,
    model_claims: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What an HPA or KEDA does: write replicas through the scale subresource. The operator scales
    the Deployment to it and never writes spec.replicas back, nor reads the replicas' load."""
    owned(e2e_cluster)
    monkeypatch.setenv("PARALLAMA_AUTOSCALE_INTERVAL_SECONDS", str(PERIOD))
    await gpu_nodes(gpus=2, product="NVIDIA-L4", memory_mib=23034)
    await model_claims(namespace, "m")
    path = f"{MDS.format(ns=namespace)}/chat"
    async with FakeRuntimes(2) as fakes, run_operator(), kubelet(kube, namespace, "chat", fakes):
        fakes.set_all(busy=4, queued=40)
        spec = {"model": {"uri": "pvc://m/a.gguf", "metadata": SMALL}, "service": {"port": fakes.port}}
        await kube.create(MDS.format(ns=namespace), md("chat", spec))
        await wait_for(
            lambda: ready_replicas(kube, namespace, "chat", 1), within=120, what="one ready replica"
        )
        scale = await kube.get(f"{path}/scale")
        assert scale["spec"]["replicas"] == 1 and scale["status"]["replicas"] == 1
        await kube.merge_patch(f"{path}/scale", {"spec": {"replicas": 2}})
        await wait_for(
            lambda: ready_replicas(kube, namespace, "chat", 2), within=120, what="two ready replicas"
        )
        generation = (await md_of(kube, namespace, "chat"))["metadata"]["generation"]
        await asyncio.sleep(8 * PERIOD)
        after = await md_of(kube, namespace, "chat")
    assert after["spec"]["replicas"] == 2
    assert after["metadata"]["generation"] == generation, "somebody else wrote the spec"
    assert "autoscaling" not in (after.get("status") or {})
    assert sum(fakes.requests.values()) == 0
