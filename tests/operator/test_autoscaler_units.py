"""The autoscaler's pieces without a cluster: the scraper against real HTTP servers, the parser, the
ready-pod filter, the history's window, and a decision that waits for a whole window."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import aiohttp.web
import pytest
from harness import gfd_node
from hypothesis import given, settings
from hypothesis import strategies as st
from parallama_operator.autoscaler import Memory, policy_of
from parallama_operator.autoscaling import Observation, Policy, Recommendation, decide, recommend
from parallama_operator.builders import pod_labels
from parallama_operator.planning import compute_plan, model_from_metadata
from parallama_operator.replica_load import (
    ReplicaLoad,
    Scrape,
    is_ready,
    metrics_url,
    observation,
    parse_metrics,
    ready_targets,
    scrape,
)
from parallama_operator.resources import ModelDeploymentSpec
from parallama_runtime.planning.presets import PRESETS
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from support.fake_runtime import FakeRuntimes


def exposition(slots: float, busy: float, queued: float) -> str:
    """What prometheus-client itself writes for the runtime's three gauges (and look-alikes)."""
    registry = CollectorRegistry()
    for name, value in (
        ("parallama_slots_total", slots),
        ("parallama_slots_busy", busy),
        ("parallama_slots_busy_max", 99),
        ("parallama_queue_depth", queued),
        ("parallama_queue_depth_max", 99),
    ):
        Gauge(name, name, registry=registry).set(value)
    return generate_latest(registry).decode()


def test_parse_reads_the_three_gauges_and_not_their_look_alikes() -> None:
    assert parse_metrics(exposition(4, 3, 7)) == ReplicaLoad(slots=4, busy=3, queued=7)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "up 1\n",
        exposition(4, 3, 7).replace("parallama_queue_depth ", "parallama_queue_depth_other "),
        "parallama_slots_total{ 4\n",
    ],
)
def test_parse_refuses_text_without_the_gauges(text: str) -> None:
    with pytest.raises(ValueError):
        parse_metrics(text)


def pod(name: str, ip: str | None = "10.0.0.1", *, ready: str = "True", **extra: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running", "conditions": [{"type": "Ready", "status": ready}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": {"name": name, **extra}, "status": status}


def test_only_ready_running_pods_with_an_address_are_read() -> None:
    pods = [
        pod("ok", "10.0.0.1"),
        pod("loading", "10.0.0.2", ready="False"),
        pod("no-ip", None),
        pod("leaving", "10.0.0.3", deletionTimestamp="2024-01-01T00:00:00Z"),
        {"metadata": {"name": "pending"}, "status": {"phase": "Pending"}},
        pod("v6", "fd00::5"),
    ]
    assert [p["metadata"]["name"] for p in pods if is_ready(p)] == ["ok", "v6"]
    assert ready_targets(pods, 11434) == {
        "ok": "http://10.0.0.1:11434/metrics",
        "v6": "http://[fd00::5]:11434/metrics",
    }
    assert metrics_url("127.0.0.2", 8080) == "http://127.0.0.2:8080/metrics"


def test_observation_sums_the_reporting_and_counts_the_missing() -> None:
    result = Scrape(
        loads={"a": ReplicaLoad(4, 4, 2), "b": ReplicaLoad(4, 1, 0)},
        failures={"c": "timed out"},
    )
    assert observation(result, 4) == Observation(4, busy=5, queued=2, reporting=2, missing=1)


async def test_scrape_reads_answers_and_records_every_failure() -> None:
    """Four replicas: one answers, one refuses connections, one answers without the gauges, one
    hangs past the timeout. One round takes one timeout, not one per replica, and raises nothing."""
    hung = asyncio.Event()

    async def slow(request: aiohttp.web.Request) -> aiohttp.web.Response:
        await hung.wait()
        return aiohttp.web.Response(text=exposition(4, 0, 0))

    app = aiohttp.web.Application()
    app.router.add_get("/metrics", slow)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.9", 0)
    await site.start()
    slow_port = runner.addresses[0][1]
    try:
        async with FakeRuntimes(3) as fakes, aiohttp.ClientSession() as session:
            ok, refused, garbled = fakes.addresses
            fakes.set(ok, busy=3, queued=5)
            await fakes.stop(refused)
            fakes.garble(garbled)
            targets = {
                name: metrics_url(address, fakes.port)
                for name, address in zip("abc", fakes.addresses, strict=True)
            }
            targets["d"] = metrics_url("127.0.0.9", slow_port)
            started = asyncio.get_running_loop().time()
            result = await scrape(session, targets, within=0.5)
            took = asyncio.get_running_loop().time() - started
    finally:
        hung.set()
        await runner.cleanup()
    assert result.loads == {"a": ReplicaLoad(slots=4, busy=3, queued=5)}
    assert set(result.failures) == {"b", "c", "d"}
    assert result.failures["d"] == "timed out" and "parallama_slots_total" in result.failures["c"]
    assert took < 1.5


async def test_a_replica_that_dies_is_missing_even_on_a_kept_alive_connection() -> None:
    async with FakeRuntimes(1) as fakes, aiohttp.ClientSession() as session:
        targets = {"a": metrics_url(fakes.addresses[0], fakes.port)}
        assert (await scrape(session, targets, within=1)).loads
        await fakes.stop(fakes.addresses[0])
        assert set((await scrape(session, targets, within=1)).failures) == {"a"}


# ---------------------------------------------------------------------------------- the history


def test_the_history_keeps_the_windows_and_starts_over_after_a_hole() -> None:
    policy = Policy(1, 4, 1.0, scale_up_window_s=30, scale_down_window_s=60)
    memory = Memory()
    for t in range(0, 300, 15):
        memory.record(Recommendation(at=t, up=1, down=1), policy, period=15)
    assert memory.since == 0
    assert memory.history[0].at >= 285 - 60 - 2 * 15  # only what a window can still see
    memory.record(Recommendation(at=400, up=2, down=2), policy, period=15)  # 115 s without a sample
    assert list(memory.history) == [Recommendation(at=400, up=2, down=2)] and memory.since == 400


def test_policy_of_the_spec() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": {"uri": "https://x/m.gguf"},
            "autoscaling": {
                "enabled": True,
                "minReplicas": 2,
                "maxReplicas": 5,
                "targetUtilization": 0.5,
                "scaleUpStabilizationSeconds": 30,
            },
        }
    )
    assert policy_of(spec) == Policy(2, 5, 0.5, scale_up_window_s=30, scale_down_window_s=300)


# ------------------------------------------------------------------- a window must be observed


def test_a_fresh_history_does_not_scale_down_before_a_whole_window() -> None:
    """A restarted operator sees one idle sample: without ``observed_since`` that alone would scale
    four replicas down to one; with it nothing moves until the window has been watched."""
    policy = Policy(1, 8, 1.0, scale_down_window_s=300)
    idle = Observation(4, busy=0, reporting=4)
    history = [recommend(idle, policy, 1000)]
    assert decide(history, policy, current=4, now=1000).replicas == 1
    assert decide(history, policy, current=4, now=1000, observed_since=1000).replicas == 4
    history += [recommend(idle, policy, t) for t in range(1015, 1301, 15)]
    assert decide(history, policy, current=4, now=1300, observed_since=1000).replicas == 1


def test_a_fresh_history_waits_for_the_scale_up_window_too() -> None:
    policy = Policy(1, 8, 1.0, scale_up_window_s=60, scale_down_window_s=300)
    spike = Observation(4, busy=4, queued=12, reporting=1)
    history = [recommend(spike, policy, 0)]
    assert decide(history, policy, current=1, now=0, observed_since=0).replicas == 1
    history += [recommend(spike, policy, t) for t in (15, 30, 45, 60)]
    assert decide(history, policy, current=1, now=60, observed_since=0).replicas == 4


@settings(max_examples=200)
@given(
    st.integers(1, 5),
    st.integers(0, 10),
    st.floats(0, 600),
    st.lists(st.integers(0, 100), min_size=1, max_size=20),
    st.integers(1, 20),
    st.floats(0, 1200),
)
def test_observed_since_only_ever_holds_the_current_count(
    low: int, extra: int, window: float, loads: list[int], current: int, watched: float
) -> None:
    """Whatever the history, a decision that has not watched a whole window lies between the
    decision that has and the current count (clamped to the bounds): it holds, it never overshoots."""
    policy = Policy(low, low + extra, 0.8, scale_up_window_s=window / 4, scale_down_window_s=window)
    history = [
        recommend(Observation(4, busy=float(b), reporting=1), policy, float(i)) for i, b in enumerate(loads)
    ]
    now = float(len(loads) - 1)
    free = decide(history, policy, current, now).replicas
    held = decide(history, policy, current, now, observed_since=now - watched).replicas
    clamped = min(max(current, policy.min_replicas), policy.max_replicas)
    assert min(free, clamped) <= held <= max(free, clamped)
    if watched >= window + 1e-6:  # (now - since is computed, so not exactly ``watched``)
        assert held == free


# ------------------------------------------------------------------------------------ capacity

LLAMA_8B = {k: v for k, v in PRESETS["llama-3.1-8b"].items() if k != "name"}


def held_by(name: str, node: str, gpus: int, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "default", "labels": labels or {"app": name}},
        "spec": {"nodeName": node, "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
        "status": {"phase": "Running"},
    }


def test_the_plan_says_how_many_replicas_its_gpu_class_could_host() -> None:
    """``replicas_possible`` is the autoscaler's capacity: every replica the planned GPU class can
    host, not capped by the replicas asked for; GPUs other pods hold do not count, the
    deployment's own do (they come back to it)."""
    spec = ModelDeploymentSpec.model_validate(
        {"model": {"uri": "pvc://m/a.gguf", "metadata": LLAMA_8B}, "replicas": 1}
    )
    model = model_from_metadata(spec)
    assert model is not None
    nodes = [
        gfd_node("a", "NVIDIA-L4", 2, 23034),
        gfd_node("b", "NVIDIA-L4", 1, 23034),
        gfd_node("c", "NVIDIA-L20", 8, 46068),
    ]
    plan = compute_plan(spec, model, nodes)
    assert plan.gpu_product == "NVIDIA-L4" and plan.gpus_per_replica == 1
    assert plan.replicas_placed == 1 and plan.replicas_possible == 3
    others = [held_by("trainer", "a", 1)]
    assert compute_plan(spec, model, nodes, pods=others, owner=("default", "chat")).replicas_possible == 2
    own = [held_by("chat", "a", 1, pod_labels("chat")), held_by("chat", "b", 1, pod_labels("chat"))]
    assert compute_plan(spec, model, nodes, pods=own, owner=("default", "chat")).replicas_possible == 3
    assert compute_plan(spec, model, nodes, pods=own).replicas_possible == 1
