"""Properties every plan keeps, over random models, inventories and requests."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parallama_runtime.planning.memory import KVCacheType
from parallama_runtime.planning.model_info import ModelInfo, model_info_from_metadata
from parallama_runtime.planning.planner import Node, PlanRequest, make_plan

GiB = 1024**3


@st.composite
def models(draw: st.DrawFn) -> ModelInfo:
    heads = draw(st.sampled_from([8, 16, 32, 64]))
    head_dim = draw(st.sampled_from([64, 128]))
    return model_info_from_metadata(
        {
            "architecture": "llama",
            "blockCount": draw(st.integers(4, 96)),
            "embeddingLength": heads * head_dim,
            "headCount": heads,
            "headCountKv": draw(st.sampled_from([h for h in (1, 2, 4, 8, heads) if h <= heads])),
            "contextLength": 131072,
            "vocabSize": draw(st.sampled_from([32000, 128256])),
            "sizeBytes": draw(st.integers(1 * GiB, 300 * GiB)),
        }
    )


@st.composite
def clusters(draw: st.DrawFn) -> list[Node]:
    shapes = draw(
        st.lists(
            st.tuples(st.sampled_from([16, 24, 48, 80, 141]), st.sampled_from([1, 2, 4, 8])),
            min_size=1,
            max_size=3,
        )
    )
    return [
        Node(name=f"n{i}", product=f"GPU{gib}", gpu_count=count, gpu_memory_bytes=gib * GiB)
        for i, (gib, count) in enumerate(shapes)
    ]


@st.composite
def requests(draw: st.DrawFn) -> PlanRequest:
    return PlanRequest(
        num_ctx=draw(st.sampled_from([512, 2048, 4096, 8192, 32768])),
        max_parallel=draw(st.sampled_from([None, 2, 8])),
        kv_cache_type=draw(st.sampled_from(list(KVCacheType)[1:])),
        flash_attention=draw(st.booleans()),
        headroom=draw(st.sampled_from([0.0, 0.1, 0.2, 0.5])),
    )


PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(models(), clusters(), requests())
def test_a_fitting_plan_stays_within_usable_memory_on_every_device(
    model: ModelInfo, nodes: list[Node], request: PlanRequest
) -> None:
    plan = make_plan(model, nodes, request)
    if plan.fits:
        assert plan.devices and len(plan.devices) == plan.gpus_per_replica
        for device in plan.devices:
            assert device.total_bytes <= device.usable_bytes
            assert device.usable_bytes <= device.capacity_bytes * (1 - request.headroom) + 1
    else:
        assert plan.reason.startswith("does not fit")


@PROPERTY_SETTINGS
@given(models(), clusters(), requests())
def test_one_more_slot_would_not_fit_unless_capped(
    model: ModelInfo, nodes: list[Node], request: PlanRequest
) -> None:
    plan = make_plan(model, nodes, request)
    _, high = request.slot_bounds()
    if not plan.fits or plan.num_parallel >= high:
        return
    more = request.model_copy(
        update={"num_parallel": plan.num_parallel + 1, "gpus_per_replica": plan.gpus_per_replica}
    )
    # the same GPUs of the same node shape cannot take another slot
    same_shape = [n for n in nodes if n.name in plan.nodes]
    assert not make_plan(model, same_shape, more).fits


@PROPERTY_SETTINGS
@given(models(), clusters(), requests())
def test_one_gpu_fewer_would_not_fit(model: ModelInfo, nodes: list[Node], request: PlanRequest) -> None:
    plan = make_plan(model, nodes, request)
    if not plan.fits or plan.gpus_per_replica <= 1:
        return
    low, _ = request.slot_bounds()
    fewer = request.model_copy(update={"gpus_per_replica": plan.gpus_per_replica - 1, "num_parallel": low})
    assert not make_plan(model, nodes, fewer).fits
