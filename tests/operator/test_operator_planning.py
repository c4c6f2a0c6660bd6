"""Planning glue: status, hashes, OOM reserve, phases, conditions, runtime troubles (pure)."""

from __future__ import annotations

from typing import Any

from harness import gfd_node
from parallama_operator.health import react, runtime_invalid, runtime_troubles
from parallama_operator.planning import (
    MAX_EXTRA_RESERVE_FRACTION,
    compute_plan,
    host_bytes,
    model_from_metadata,
    next_extra_reserve,
    next_host_reserve,
    phase_for,
    plan_request,
    plan_status,
    reserve_key,
    reserves_for,
    set_condition,
)
from parallama_operator.resources import Condition, ModelDeploymentSpec, Phase
from parallama_runtime.planning.presets import PRESETS
from parallama_runtime.termination import Failure, FailureReason

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
    # one unified pool of num_ctx x slots cells; the window cache is smaller unless swa_full
    assert a.swa_cells_per_slot < a.kv_cells_per_slot == 32768 * a.num_parallel
    assert b.swa_cells_per_slot == b.kv_cells_per_slot == 32768 * b.num_parallel
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


def _pod(plan_hash: str = "h1", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "uid": "u1", "annotations": {"parallama.dev/plan-hash": plan_hash}},
        "status": {"containerStatuses": [{"name": "runtime", **status}]},
    }


def _terminated(message: str, reason: str = "Error") -> dict[str, Any]:
    return {"terminated": {"reason": reason, "exitCode": 1, "message": message}}


def test_oom_kill_is_one_trouble_before_and_after_the_restart() -> None:
    killed = _pod(restartCount=0, state={"terminated": {"reason": "OOMKilled"}})
    restarted = _pod(restartCount=1, state={"running": {}}, lastState={"terminated": {"reason": "OOMKilled"}})
    (a,) = runtime_troubles(killed)
    (b,) = runtime_troubles(restarted)
    assert a.kind == "OOMKilled" and a.signature == b.signature
    again = _pod(
        restartCount=2,
        state={"terminated": {"reason": "OOMKilled"}},
        lastState={"terminated": {"reason": "OOMKilled"}},
    )
    assert len(runtime_troubles(again)) == 2
    assert runtime_troubles(_pod(restartCount=0, state=_terminated("segfault"))) == []


def test_each_termination_reason_is_a_trouble_once() -> None:
    for reason in FailureReason:
        message = Failure(reason, "llama.cpp said so", slots=4, num_ctx=8192).format()
        crashed = _pod(restartCount=0, state=_terminated(message))
        restarted = _pod(restartCount=1, state={"waiting": {}}, lastState=_terminated(message))
        (a,) = runtime_troubles(crashed)
        (b,) = runtime_troubles(restarted)
        assert a.kind == reason.value and a.signature == b.signature and a.plan_hash == "h1"
        assert a.failure is not None and (a.failure.slots, a.failure.num_ctx) == (4, 8192)


def _status(spec: ModelDeploymentSpec, **fields: Any) -> dict[str, Any]:
    model = model_from_metadata(spec) or _fail()
    plan = compute_plan(spec, model, NODES)
    planned = plan_status(plan, spec, host=host_bytes(model, plan))
    return {"plan": planned.model_dump(by_alias=True), **fields}


def _react(status: dict[str, Any], message: str, *, kill: bool = False, plan_hash: str | None = None) -> Any:
    spec = spec_of()
    state = {"terminated": {"reason": "OOMKilled"}} if kill else _terminated(message)
    pod = _pod(plan_hash or status["plan"]["hash"], restartCount=0, state=state)
    return react(
        runtime_troubles(pod), status, generation=3, reserve_key=reserve_key(spec), user_sets_memory=False
    )


def test_gpu_out_of_memory_raises_only_the_gpu_reserve() -> None:
    status = _status(spec_of())
    for reason in (FailureReason.GPU_OOM_LOAD, FailureReason.GPU_OOM_SERVING):
        reaction = _react(status, Failure(reason, "cudaMalloc failed: out of memory", 4, 8192).format())
        assert reaction.replan and reaction.event_reason == "GPUOutOfMemory"
        assert reaction.status["extraReserveBytes"] > 0 and reaction.status["hostReserveBytes"] == 0
        assert reaction.status["phase"] == "Degraded"
    # a pod of an older plan teaches nothing about the current one
    stale = _react(status, Failure(FailureReason.GPU_OOM_LOAD, "x").format(), plan_hash="old")
    assert stale.quiet and "extraReserveBytes" not in stale.status and stale.status["troubles"]


def test_oom_killed_raises_only_the_host_reserve() -> None:
    status = _status(spec_of())
    reaction = _react(status, "", kill=True)
    assert reaction.replan and reaction.event_reason == "OOMKilled"
    assert reaction.status["hostReserveBytes"] >= 512 * 1024 * 1024
    assert reaction.status["extraReserveBytes"] == 0 and reaction.status["oomKills"] == 1
    mine = react(
        runtime_troubles(
            _pod(status["plan"]["hash"], restartCount=0, state={"terminated": {"reason": "OOMKilled"}})
        ),
        status,
        generation=3,
        reserve_key="k",
        user_sets_memory=True,
    )
    assert not mine.replan and "spec.resources" in mine.event_message


def test_host_reserve_is_bounded_and_reaches_the_memory_limit() -> None:
    spec = spec_of()
    model = model_from_metadata(spec) or _fail()
    plan = compute_plan(spec, model, NODES)
    base = plan_status(plan, spec, host=host_bytes(model, plan))
    assert base.memory.host_bytes > model.embedding_bytes and base.host_memory_bytes == base.memory.host_bytes
    reserve = 0
    for _ in range(100):
        reserve = next_host_reserve(reserve, base)
    assert reserve == max(base.memory.host_bytes, 4 * 1024**3)
    raised = plan_status(plan, spec, host=host_bytes(model, plan), host_reserve=reserve)
    assert raised.host_memory_bytes == base.host_memory_bytes + reserve and raised.hash != base.hash
    own = spec_of(resources={"limits": {"memory": "8Gi"}})
    assert plan_status(plan, own, host=host_bytes(model, plan)).host_memory_bytes == 0


def test_unsupported_model_and_unreadable_file_are_invalid_without_reserve() -> None:
    status = _status(spec_of())
    for reason, verdict in (
        (FailureReason.UNSUPPORTED_MODEL, "UnsupportedModel"),
        (FailureReason.UNREADABLE_FILE, "ModelUnreadable"),
    ):
        reaction = _react(status, Failure(reason, "no rules for frobnicator").format())
        assert reaction.invalid and not reaction.replan and reaction.event_reason == verdict
        assert "extraReserveBytes" not in reaction.status and "hostReserveBytes" not in reaction.status
        assert runtime_invalid({**status, **reaction.status}, 3) == (verdict, reaction.event_message)
        assert runtime_invalid({**status, **reaction.status}, 4) is None  # a spec change clears it


def test_load_failure_is_reported_and_changes_nothing() -> None:
    reaction = _react(_status(spec_of()), Failure(FailureReason.LOAD_FAILED, "mystery").format())
    assert not reaction.replan and not reaction.invalid and reaction.event_reason == "RuntimeFailed"
    assert "extraReserveBytes" not in reaction.status


def test_reserves_reset_when_the_spec_they_were_learned_for_changes() -> None:
    spec = spec_of()
    status = {"extraReserveBytes": 5, "hostReserveBytes": 7, "reserveKey": reserve_key(spec)}
    assert reserves_for(status, spec) == (5, 7)
    assert reserves_for(status, spec_of(replicas=3)) == (5, 7)  # scaling keeps what was learned
    assert reserves_for(status, spec_of(numCtx=8192)) == (0, 0)
