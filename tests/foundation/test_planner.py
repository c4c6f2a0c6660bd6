"""Planner decisions on the seed's scenarios: one L4, 8 x L20, explicit slot counts, CPU-only."""

from __future__ import annotations

import pytest
from parallama_runtime.planning.gpu_catalog import lookup_gpu_memory_mib
from parallama_runtime.planning.memory import KVCacheType
from parallama_runtime.planning.model_info import model_info_from_metadata
from parallama_runtime.planning.planner import Node, PlanRequest, make_plan
from parallama_runtime.planning.presets import PRESETS

MiB = 1024 * 1024
GiB = 1024 * MiB
LLAMA_8B = model_info_from_metadata(PRESETS["llama-3.1-8b"])
DEEPSEEK_202GB = model_info_from_metadata(PRESETS["deepseek-r1-q2"])


def gpu_node(name: str, product: str, count: int) -> Node:
    mib = lookup_gpu_memory_mib(product)
    assert mib is not None
    return Node(name=name, product=f"NVIDIA-{product}", gpu_count=count, gpu_memory_bytes=mib * MiB)


L4 = gpu_node("l4-node", "L4", 1)
L20x8 = gpu_node("l20-node", "L20", 8)


def test_llama_8b_on_one_l4_runs_four_slots() -> None:
    plan = make_plan(LLAMA_8B, [L4], PlanRequest(num_ctx=4096))
    assert plan.fits
    assert (plan.num_parallel, plan.gpus_per_replica) == (4, 1)
    assert plan.kv_bytes_per_token == 131072
    assert plan.memory.kv_per_slot_bytes == 4096 * 131072
    assert plan.memory.total_bytes <= plan.memory.usable_bytes
    assert plan.nodes == ["l4-node"]
    assert "capped at max_parallel 4" in plan.reason


def test_slots_step_down_as_the_context_grows() -> None:
    slots = [make_plan(LLAMA_8B, [L4], PlanRequest(num_ctx=ctx)).num_parallel for ctx in (4096, 32768, 65536)]
    assert slots[0] == 4
    assert slots == sorted(slots, reverse=True)
    assert 1 <= slots[-1] < slots[1] < 4, slots  # steps down 4 -> 3 -> 1, never a silent jump to 1 at 32k


def test_q8_cache_fits_more_context_than_f16() -> None:
    f16 = make_plan(LLAMA_8B, [L4], PlanRequest(num_ctx=49152))
    q8 = make_plan(LLAMA_8B, [L4], PlanRequest(num_ctx=49152, kv_cache_type=KVCacheType.Q8_0))
    assert q8.kv_bytes_per_token == 69632
    assert q8.num_parallel > f16.num_parallel


def test_202gb_model_spans_five_to_eight_l20s() -> None:
    plan = make_plan(DEEPSEEK_202GB, [L4, L20x8], PlanRequest(num_ctx=4096))
    assert plan.fits
    assert 5 <= plan.gpus_per_replica <= 8
    assert plan.gpu_product == "NVIDIA-L20"
    assert plan.nodes == ["l20-node"]
    assert len(plan.devices) == plan.gpus_per_replica
    assert sum(plan.layer_split) == DEEPSEEK_202GB.block_count
    for device in plan.devices:
        assert device.total_bytes <= device.usable_bytes <= 0.8 * device.capacity_bytes + 1
    # one GPU fewer does not hold it
    fewer = make_plan(DEEPSEEK_202GB, [L20x8], PlanRequest(gpus_per_replica=plan.gpus_per_replica - 1))
    assert not fewer.fits


def test_explicit_slot_count_is_refused_with_the_shortfall_never_reduced() -> None:
    plan = make_plan(LLAMA_8B, [L4, L20x8], PlanRequest(num_ctx=131072, num_parallel=8, gpus_per_replica=1))
    assert not plan.fits
    assert plan.num_parallel == 8
    assert plan.shortfall_bytes > 0
    assert plan.closest_node is not None and "L20" in plan.closest_node
    assert f"({plan.shortfall_bytes} bytes)" in plan.reason
    assert "l20-node" in plan.reason


def test_explicit_slot_count_that_fits_is_honoured_exactly() -> None:
    plan = make_plan(LLAMA_8B, [L4], PlanRequest(num_ctx=4096, num_parallel=2))
    assert plan.fits and plan.num_parallel == 2


def test_nothing_fits_names_the_closest_node_shape() -> None:
    plan = make_plan(DEEPSEEK_202GB, [L4, gpu_node("t4", "T4", 4)], PlanRequest())
    assert not plan.fits
    assert plan.closest_node == "4 x NVIDIA-T4 (15.0 GiB)"
    assert "lacks" in plan.reason and plan.shortfall_bytes > 0


def test_batch_profile_allows_more_slots_than_chat() -> None:
    chat = make_plan(LLAMA_8B, [gpu_node("a100", "A100-80GB", 1)], PlanRequest(profile="chat"))
    batch = make_plan(LLAMA_8B, [gpu_node("a100", "A100-80GB", 1)], PlanRequest(profile="batch"))
    assert chat.num_parallel == 4
    assert batch.num_parallel == 16


def test_cpu_only_plan() -> None:
    plan = make_plan(LLAMA_8B, [Node(name="laptop", cpu_memory_bytes=16 * GiB)], PlanRequest())
    assert plan.fits
    assert plan.gpus_per_replica == 0
    assert [d.device for d in plan.devices] == ["cpu"]
    assert plan.memory.weights_bytes == LLAMA_8B.size_bytes
    tiny = make_plan(LLAMA_8B, [Node(name="pi", cpu_memory_bytes=4 * GiB)], PlanRequest())
    assert not tiny.fits and "CPU" in tiny.reason


def test_gpu_product_filter_and_free_memory() -> None:
    plan = make_plan(LLAMA_8B, [L4, L20x8], PlanRequest(gpu_product="L20"))
    assert plan.gpu_product == "NVIDIA-L20"
    busy = Node(
        name="desk", product="RTX-4090", gpu_count=1, gpu_memory_bytes=24 * GiB, gpu_free_bytes=(6 * GiB,)
    )
    assert make_plan(LLAMA_8B, [busy], PlanRequest()).devices[0].usable_bytes == 6 * GiB
    missing = make_plan(LLAMA_8B, [L4], PlanRequest(gpu_product="H100"))
    assert not missing.fits and "H100" in missing.reason


def test_smallest_gpu_count_then_smallest_gpu_wins() -> None:
    h100 = gpu_node("h100", "H100", 8)
    plan = make_plan(LLAMA_8B, [h100, L4], PlanRequest())
    assert plan.gpu_product == "NVIDIA-L4" and plan.gpus_per_replica == 1


def test_extra_reserve_lowers_the_slot_count() -> None:
    base = make_plan(LLAMA_8B, [L4], PlanRequest(num_ctx=32768))
    cautious = make_plan(LLAMA_8B, [L4], PlanRequest(num_ctx=32768, extra_reserve_bytes=4 * GiB))
    assert cautious.num_parallel < base.num_parallel


def test_min_above_max_is_rejected() -> None:
    with pytest.raises(ValueError, match="min_parallel 5 exceeds max_parallel 4"):
        PlanRequest(min_parallel=5, max_parallel=4)


def test_warnings_for_context_beyond_training_and_quantized_v_without_flash_attention() -> None:
    plan = make_plan(LLAMA_8B, [L20x8], PlanRequest(num_ctx=262144, kv_cache_type=KVCacheType.Q8_0))
    assert any("exceeds the 131072 tokens" in w for w in plan.warnings)
    plain = make_plan(LLAMA_8B, [L4], PlanRequest(kv_cache_type=KVCacheType.Q4_0, flash_attention=False))
    assert plain.kv_cache_type_v == KVCacheType.F16
    assert any("needs flash attention" in w for w in plain.warnings)
    assert make_plan(LLAMA_8B, [L4], PlanRequest()).warnings == []
