"""Planning glue: status, hashes, OOM reserve, phases, conditions, runtime troubles (pure)."""

from __future__ import annotations

from typing import Any

from harness import gfd_node
from parallama_operator.health import runtime_troubles
from parallama_operator.planning import (
    MAX_EXTRA_RESERVE_FRACTION,
    compute_plan,
    model_from_metadata,
    next_extra_reserve,
    phase_for,
    plan_request,
    plan_status,
    set_condition,
)
from parallama_operator.resources import Condition, ModelDeploymentSpec, Phase
from parallama_runtime.planning.presets import PRESETS
from parallama_runtime.termination import format_allocation_failure

METADATA = {k: v for k, v in PRESETS["llama-3.1-8b"].items() if k != "name"}
NODES = [gfd_node("l4", "NVIDIA-L4", 1, 23034), gfd_node("l20", "NVIDIA-L20", 8, 46068)]


def spec_of(**fields: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        {"model": {"uri": "pvc://m/x.gguf", "metadata": METADATA}, **fields}
    )


def test_status_carries_the_memory_breakdown() -> None:
    spec = spec_of()
    plan = compute_plan(spec, model_from_metadata(spec) or _fail(), NODES)
    status = plan_status(plan, spec).model_dump(by_alias=True)
    memory = status["memory"]
    for key in (
        "weightsBytes",
        "kvPerSlotBytes",
        "kvCacheBytes",
        "computeBytes",
        "overheadBytes",
        "headroomBytes",
        "usableBytes",
        "totalBytes",
    ):
        assert memory[key] > 0, key
    assert memory["kvCacheBytes"] == memory["kvPerSlotBytes"] * status["numParallel"]
    assert memory["totalBytes"] <= memory["usableBytes"]
    assert status["fits"] and status["gpuProduct"] == "NVIDIA-L4" and status["nodes"] == ["l4"]


def _fail() -> Any:
    raise AssertionError("metadata expected")


def test_hash_changes_only_with_what_pods_see() -> None:
    spec = spec_of()
    model = model_from_metadata(spec) or _fail()
    a = plan_status(compute_plan(spec, model, NODES), spec)
    b = plan_status(compute_plan(spec, model, list(reversed(NODES))), spec)
    assert a.hash == b.hash
    fewer = plan_status(compute_plan(spec, model, NODES[1:]), spec)  # the L4 node is gone
    assert fewer.gpu_product == "NVIDIA-L20" and fewer.hash != a.hash


GEMMA3 = {  # 5 of every 6 layers attend to a window of 1024 tokens only
    "architecture": "gemma3",
    "sizeBytes": 8_000_000_000,
    "blockCount": 48,
    "embeddingLength": 3840,
    "headCount": 16,
    "headCountKv": 8,
    "keyLength": 256,
    "valueLength": 256,
    "contextLength": 131072,
    "vocabSize": 262144,
    "feedForwardLength": 15360,
    "slidingWindow": 1024,
}


def test_swa_full_is_planned() -> None:
    assert plan_request(spec_of()).swa_full is False
    assert plan_request(spec_of(swaFull=True)).swa_full is True
    model = {"model": {"uri": "pvc://m/gemma.gguf", "metadata": GEMMA3}, "numCtx": 32768}
    small, full = (spec_of(**model, swaFull=swa) for swa in (False, True))
    l40s = [gfd_node("l40s", "NVIDIA-L40S", 1, 46068)]
    a = compute_plan(small, model_from_metadata(small) or _fail(), l40s)
    b = compute_plan(full, model_from_metadata(full) or _fail(), l40s)
    assert (a.swa_full, b.swa_full) == (False, True)
    assert a.swa_cells_per_slot < a.kv_cells_per_slot == b.swa_cells_per_slot
    assert a.num_parallel > b.num_parallel  # the point of the default: more slots
    # with the same slots the pods still differ (PARALLAMA_SWA_FULL): the hash must say so
    one = {"parallelism": {"numParallel": 1}}
    small, full = (spec_of(**model, **one, swaFull=swa) for swa in (False, True))
    a = compute_plan(small, model_from_metadata(small) or _fail(), l40s)
    b = compute_plan(full, model_from_metadata(full) or _fail(), l40s)
    assert a.fits and b.fits and plan_status(a, small).hash != plan_status(b, full).hash


def test_unschedulable_plan_names_the_shortfall() -> None:
    spec = spec_of(model={"uri": "pvc://m/x.gguf", "metadata": {**METADATA, "sizeBytes": 900 * 10**9}})
    plan = compute_plan(spec, model_from_metadata(spec) or _fail(), NODES)
    assert not plan.fits and plan.shortfall_bytes > 0
    assert "lacks" in plan.reason and "8 x NVIDIA-L20" in plan.reason


def test_extra_reserve_removes_slots() -> None:
    spec = spec_of(gpu={"product": "NVIDIA-L4"}, numCtx=32768)
    model = model_from_metadata(spec) or _fail()
    first = plan_status(compute_plan(spec, model, NODES), spec)
    reserve = next_extra_reserve(0, first)
    assert reserve >= first.memory.kv_per_slot_bytes
    second = plan_status(compute_plan(spec, model, NODES, reserve), spec)
    assert second.num_parallel < first.num_parallel


def test_extra_reserve_is_capped() -> None:
    spec = spec_of()
    plan = plan_status(compute_plan(spec, model_from_metadata(spec) or _fail(), NODES), spec)
    reserve = 0
    for _ in range(100):
        reserve = next_extra_reserve(reserve, plan)
    assert reserve == int((plan.gpu_memory_bytes or 0) * MAX_EXTRA_RESERVE_FRACTION)


def test_phases() -> None:
    assert phase_for(fits=False, desired=1, ready=0, degraded=False) == Phase.UNSCHEDULABLE
    assert phase_for(fits=True, desired=1, ready=0, degraded=True) == Phase.DEGRADED
    assert phase_for(fits=True, desired=2, ready=1, degraded=False) == Phase.DEPLOYING
    assert phase_for(fits=True, desired=2, ready=2, degraded=False) == Phase.READY
    assert phase_for(fits=True, desired=0, ready=0, degraded=False) == Phase.PLANNED


def test_condition_transition_time_moves_only_on_flips() -> None:
    first = set_condition([], Condition(type="Available", status="False", reason="A"), "t1")
    same = set_condition(first, Condition(type="Available", status="False", reason="B"), "t2")
    flipped = set_condition(same, Condition(type="Available", status="True", reason="C"), "t3")
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["reason"] == "B"
    assert flipped[0]["lastTransitionTime"] == "t3"
    other = set_condition(flipped, Condition(type="Degraded", status="False", reason="D"), "t4")
    assert [c["type"] for c in other] == ["Available", "Degraded"]


def _pod(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "uid": "u1", "annotations": status.pop("annotations", {})},
        "status": {"containerStatuses": [{"name": "runtime", **status}]},
    }


def test_oom_kill_is_one_trouble_before_and_after_the_restart() -> None:
    killed = _pod(restartCount=0, state={"terminated": {"reason": "OOMKilled"}})
    restarted = _pod(restartCount=1, state={"running": {}}, lastState={"terminated": {"reason": "OOMKilled"}})
    (a,) = runtime_troubles(killed, 4)
    (b,) = runtime_troubles(restarted, 4)
    assert a.reason == "OOMKilled" and a.signature == b.signature
    again = _pod(
        restartCount=2,
        state={"terminated": {"reason": "OOMKilled"}},
        lastState={"terminated": {"reason": "OOMKilled"}},
    )
    assert len(runtime_troubles(again, 4)) == 2


def test_fewer_slots_than_planned() -> None:
    assert runtime_troubles(_pod(restartCount=0, annotations={"parallama.dev/slots": "4"}), 4) == []
    (trouble,) = runtime_troubles(_pod(restartCount=0, annotations={"parallama.dev/slots": "2"}), 4)
    assert trouble.reason == "SlotsBelowPlan"
    assert runtime_troubles(_pod(restartCount=0, state={"terminated": {"reason": "Error"}}), 4) == []


def test_runtime_that_could_not_allocate_its_slots_is_a_trouble_once() -> None:
    message = format_allocation_failure(4, 8192, "failed to allocate CUDA0 buffer of size 4294967296")
    crashed = _pod(
        restartCount=0, state={"terminated": {"reason": "Error", "exitCode": 1, "message": message}}
    )
    restarted = _pod(
        restartCount=1,
        state={"waiting": {}},
        lastState={"terminated": {"reason": "Error", "message": message}},
    )
    (a,) = runtime_troubles(crashed, 4)
    (b,) = runtime_troubles(restarted, 4)
    assert a.reason == "SlotsBelowPlan" and a.signature == b.signature
    assert "4 slots of 8192 tokens" in a.message and "CUDA0" in a.message
    other = _pod(restartCount=0, state={"terminated": {"reason": "Error", "message": "segfault"}})
    assert runtime_troubles(other, 4) == []
