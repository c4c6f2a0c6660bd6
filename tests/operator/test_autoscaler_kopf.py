"""The autoscaler in the real operator against the emulated API server, reading fake runtime /metrics
on loopback addresses (tests/support/fake_runtime.py) written into the pods' status.

The emulator runs no controllers: the tests create the replica pods a ReplicaSet would, Running and
Ready, and check what the operator writes (spec.replicas, the Deployment, status.autoscaling, events).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from harness import Cluster, gfd_node, running_operator
from parallama_operator.builders import common_labels
from prometheus_client import REGISTRY
from support.fake_runtime import FakeRuntimes
from test_operator_kopf import deployment, planned, reasons

PERIOD = 0.2
PODS = "/api/v1/namespaces/default/pods"
MD_PATH = "/apis/parallama.dev/v1alpha1/namespaces/default/modeldeployments"


@pytest.fixture(autouse=True)
def fast_autoscaler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARALLAMA_AUTOSCALE_INTERVAL_SECONDS", str(PERIOD))
    monkeypatch.setenv("PARALLAMA_AUTOSCALE_SCRAPE_TIMEOUT_SECONDS", "1")


@pytest_asyncio.fixture()
async def fakes() -> AsyncIterator[FakeRuntimes]:
    async with FakeRuntimes(3) as runtimes:
        yield runtimes


def autoscaled(model: dict[str, str], port: int, replicas: int = 1, **autoscaling: Any) -> dict[str, Any]:
    return {
        "model": model,
        "replicas": replicas,
        "service": {"port": port},
        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4, **autoscaling},
    }


async def add_replica(cluster: Cluster, md: str, index: int, address: str, node: str = "gpu-a") -> None:
    """A replica pod as the ReplicaSet creates it and the kubelet reports it: bound, Running, Ready."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{md}-{index}", "namespace": "default", "labels": common_labels(md)},
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "runtime", "image": "runtime", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": address,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    await cluster.request("POST", PODS, pod)


def replicas(cluster: Cluster, name: str = "chat") -> int:
    return int(cluster.md(name)["spec"].get("replicas", 1))


def autoscaling_status(cluster: Cluster, name: str = "chat", **want: Any) -> dict[str, Any] | None:
    status = (cluster.md(name).get("status") or {}).get("autoscaling")
    if not status or any(status.get(k) != v for k, v in want.items()):
        return None
    return dict(status)


def deployment_replicas(cluster: Cluster, name: str = "chat") -> int | None:
    dep = deployment(cluster, name)
    return None if dep is None else int(dep["spec"]["replicas"])


def events_of(cluster: Cluster, reason: str, name: str = "chat") -> list[dict[str, Any]]:
    return [e for e in cluster.events(name) if e.get("reason") == reason]


def gauge(metric: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(metric, labels)


async def test_load_scales_up_and_the_reconcile_scales_the_deployment(
    cluster: Cluster, model: dict[str, str], fakes: FakeRuntimes
) -> None:
    await cluster.add_node(gfd_node("gpu-a", "NVIDIA-L4", 4, 23034))
    async with running_operator():
        await cluster.create_md("chat", autoscaled(model, fakes.port))
        status = await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
        slots = status["plan"]["numParallel"]
        # every slot busy and as many requests queued: 2 x slots at 80 % of slots per replica -> 3
        fakes.set(fakes.addresses[0], busy=slots, queued=slots)
        await add_replica(cluster, "chat", 0, fakes.addresses[0])
        auto = await cluster.wait_for(
            lambda: autoscaling_status(cluster, current=3), what="status.autoscaling at 3 replicas"
        )
        await cluster.wait_for(lambda: deployment_replicas(cluster) == 3, what="the Deployment at 3")
        await cluster.wait_for(lambda: events_of(cluster, "Scaled"), what="a Scaled event")
    assert replicas(cluster) == 3
    assert auto["desired"] == 3 and auto["limitedBy"] == "" and auto["capacity"] == 4
    assert auto["observed"] == {
        "busy": slots,
        "queued": slots,
        "slotsPerReplica": slots,
        "reporting": 1,
        "missing": 0,
    }
    assert auto["lastScaleTime"]
    (event,) = events_of(cluster, "Scaled")
    assert event["type"] == "Normal" and "from 1 to 3" in event["message"]
    assert gauge("parallama_operator_autoscaling_desired_replicas", namespace="default", name="chat") == 3
    assert gauge("parallama_operator_autoscaling_replicas", namespace="default", name="chat") == 3
    assert gauge(
        "parallama_operator_autoscaling_observed", namespace="default", name="chat", signal="queued"
    ) == (slots)


async def test_capacity_limits_the_scale_up_and_says_where_another_replica_came_closest(
    cluster: Cluster, model: dict[str, str], fakes: FakeRuntimes
) -> None:
    """Two L4 GPUs host two replicas; the load asks for five. The only other GPU (256 MiB) cannot
    hold one: the status names it and its shortfall, one Warning event says so, and no third pod
    is asked for (it would stay Pending)."""
    await cluster.add_node(gfd_node("gpu-a", "NVIDIA-L4", 2, 23034))
    await cluster.add_node(gfd_node("gpu-t4", "NVIDIA-T4", 1, 256))
    async with running_operator():
        await cluster.create_md("chat", autoscaled(model, fakes.port, maxReplicas=8))
        status = await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
        slots = status["plan"]["numParallel"]
        fakes.set(fakes.addresses[0], busy=slots, queued=3 * slots)  # 4 x slots: 5 replicas at 80 %
        await add_replica(cluster, "chat", 0, fakes.addresses[0])
        auto = await cluster.wait_for(
            lambda: autoscaling_status(cluster, limitedBy="capacity", current=2), what="limited by capacity"
        )
        await cluster.wait_for(lambda: deployment_replicas(cluster) == 2, what="the Deployment at 2")
        await add_replica(cluster, "chat", 1, fakes.addresses[1])
        fakes.set(fakes.addresses[1], busy=slots, queued=3 * slots)
        await asyncio.sleep(8 * PERIOD)  # more rounds at capacity: no more replicas, no more events
        held = autoscaling_status(cluster, limitedBy="capacity")
    assert replicas(cluster) == 2 and deployment_replicas(cluster) == 2
    assert auto["desired"] == 5 and auto["capacity"] == 2
    assert auto["closestNode"] == "1 x NVIDIA-T4 (256 MiB)" and auto["shortfallBytes"] > 0
    assert "lacks" in auto["message"] and "NVIDIA-T4" in auto["message"]
    assert held is not None and held["desired"] == 10 and held["current"] == 2  # 8 x slots of load now
    (warning,) = events_of(cluster, "AutoscalingAtCapacity")
    assert warning["type"] == "Warning" and "capacity" in warning["message"]
    labels = {"namespace": "default", "name": "chat"}
    assert gauge("parallama_operator_autoscaling_limited", **labels, reason="capacity") == 1
    assert gauge("parallama_operator_autoscaling_limited", **labels, reason="max") == 0


async def test_max_replicas_limits_and_says_so(
    cluster: Cluster, model: dict[str, str], fakes: FakeRuntimes
) -> None:
    await cluster.add_node(gfd_node("gpu-a", "NVIDIA-L4", 4, 23034))
    async with running_operator():
        await cluster.create_md("chat", autoscaled(model, fakes.port, maxReplicas=2))
        status = await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
        fakes.set(fakes.addresses[0], busy=status["plan"]["numParallel"], queued=20)
        await add_replica(cluster, "chat", 0, fakes.addresses[0])
        auto = await cluster.wait_for(lambda: autoscaling_status(cluster, limitedBy="max"), what="max")
    assert auto["current"] == 2 and auto["desired"] > 2 and replicas(cluster) == 2
    assert events_of(cluster, "AutoscalingAtCapacity") == []


async def test_a_lull_scales_down_only_after_the_window_and_in_one_step(
    cluster: Cluster, model: dict[str, str], fakes: FakeRuntimes
) -> None:
    window = 2
    await cluster.add_node(gfd_node("gpu-a", "NVIDIA-L4", 4, 23034))
    async with running_operator():
        spec = autoscaled(model, fakes.port, replicas=3, maxReplicas=3, scaleDownStabilizationSeconds=window)
        await cluster.create_md("chat", spec)
        status = await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
        slots = status["plan"]["numParallel"]
        fakes.set_all(busy=slots - 1, queued=0)  # 3 x (slots - 1) needs 3 replicas at 80 %
        for index, address in enumerate(fakes.addresses):
            await add_replica(cluster, "chat", index, address)
        await cluster.wait_for(
            lambda: (autoscaling_status(cluster) or {}).get("observed", {}).get("reporting") == 3,
            what="three replicas reporting",
        )
        await asyncio.sleep(window + 4 * PERIOD)  # a whole window of the steady load
        assert replicas(cluster) == 3
        fakes.set_all(busy=0, queued=0)
        idle_since = time.monotonic()
        await cluster.wait_for(lambda: replicas(cluster) == 1, within=window + 10, what="a scale-down to 1")
        waited = time.monotonic() - idle_since
        await cluster.wait_for(lambda: deployment_replicas(cluster) == 1, what="the Deployment at 1")
    assert waited >= window - PERIOD, f"scaled down {waited:.2f} s after the lull began"
    (event,) = events_of(cluster, "Scaled")
    assert "from 3 to 1" in event["message"]


async def test_unreachable_replicas_hold_the_scale_down_and_are_reported_once(
    cluster: Cluster, model: dict[str, str], fakes: FakeRuntimes
) -> None:
    """Of three idle replicas one answers, one refuses connections and one answers without slot
    gauges. Counted as fully busy, the two keep all three replicas (no scale-down storm), each is
    reported by one event however many rounds fail; once they answer, the lull scales down."""
    await cluster.add_node(gfd_node("gpu-a", "NVIDIA-L4", 4, 23034))
    _reachable, refused, garbled = fakes.addresses
    await fakes.stop(refused)
    fakes.garble(garbled)
    failures_before = gauge("parallama_operator_autoscaling_scrape_failures_total") or 0.0
    async with running_operator():
        spec = autoscaled(model, fakes.port, replicas=3, maxReplicas=3, scaleDownStabilizationSeconds=0)
        await cluster.create_md("chat", spec)
        await cluster.wait_for(lambda: planned(cluster, "chat"), what="a plan")
        for index, address in enumerate(fakes.addresses):
            await add_replica(cluster, "chat", index, address)
        auto = await cluster.wait_for(
            lambda: autoscaling_status(cluster, current=3), what="an autoscaling status"
        )
        await asyncio.sleep(10 * PERIOD)
        held = autoscaling_status(cluster)
        assert replicas(cluster) == 3
        warnings = events_of(cluster, "ReplicaMetricsUnavailable")
        await fakes.start(refused)
        fakes.garbled.clear()
        await cluster.wait_for(lambda: replicas(cluster) == 1, what="the scale-down once every replica reads")
    assert held is not None and held["observed"]["reporting"] == 1 and held["observed"]["missing"] == 2
    assert auto["desired"] == 3 and "not reporting" in held["message"]
    assert sorted(w["message"].split(" (")[0] for w in warnings) == [
        "cannot read the load of ready pod chat-1",
        "cannot read the load of ready pod chat-2",
    ]
    assert all(w["type"] == "Warning" for w in warnings)
    assert (gauge("parallama_operator_autoscaling_scrape_failures_total") or 0.0) - failures_before >= 10


async def test_without_autoscaling_an_external_scaler_owns_the_replicas(
    cluster: Cluster, model: dict[str, str], fakes: FakeRuntimes
) -> None:
    """With spec.autoscaling off, an HPA or KEDA drives spec.replicas (through the scale
    subresource); the operator follows it and never writes spec.replicas itself, whatever load
    the replicas report."""
    await cluster.add_node(gfd_node("gpu-a", "NVIDIA-L4", 4, 23034))
    async with running_operator():
        await cluster.create_md("chat", {"model": model, "service": {"port": fakes.port}})
        await cluster.wait_for(lambda: deployment(cluster, "chat"), what="the Deployment")
        fakes.set_all(busy=4, queued=40)
        await add_replica(cluster, "chat", 0, fakes.addresses[0])
        await cluster.patch(f"{MD_PATH}/chat", {"spec": {"replicas": 3}})  # what an HPA does
        await cluster.wait_for(lambda: deployment_replicas(cluster) == 3, what="the Deployment at 3")
        await asyncio.sleep(10 * PERIOD)
        assert replicas(cluster) == 3 and deployment_replicas(cluster) == 3
        assert "autoscaling" not in (cluster.md("chat").get("status") or {})
    operator_spec_writes = [
        r
        for r in cluster.emulator.requests_made()
        if r.method == "PATCH"
        and r.resource is not None
        and r.resource.plural == "modeldeployments"
        and r.subresource is None
        and isinstance(r.data, dict)
        and "spec" in r.data
        and not r.headers.get("User-Agent", "").startswith("Python")
    ]
    assert operator_spec_writes == []
    assert sum(fakes.requests.values()) == 0, "nobody reads the replicas' load"
    assert "Scaled" not in reasons(cluster, "chat")


async def test_turning_autoscaling_off_clears_its_status_and_leaves_the_replicas(
    cluster: Cluster, model: dict[str, str], fakes: FakeRuntimes
) -> None:
    await cluster.add_node(gfd_node("gpu-a", "NVIDIA-L4", 4, 23034))
    async with running_operator():
        await cluster.create_md("chat", autoscaled(model, fakes.port, minReplicas=2))
        await cluster.wait_for(lambda: autoscaling_status(cluster, current=2), what="minReplicas applied")
        await cluster.patch(f"{MD_PATH}/chat", {"spec": {"autoscaling": {"enabled": False}}})
        await cluster.wait_for(
            lambda: "autoscaling" not in (cluster.md("chat").get("status") or {}), what="the status cleared"
        )
        await cluster.patch(f"{MD_PATH}/chat", {"spec": {"replicas": 1}})
        await cluster.wait_for(lambda: deployment_replicas(cluster) == 1, what="the Deployment at 1")
        await asyncio.sleep(5 * PERIOD)
    assert replicas(cluster) == 1
    assert gauge("parallama_operator_autoscaling_replicas", namespace="default", name="chat") is None
