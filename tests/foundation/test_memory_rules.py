"""llama.cpp's rules as the planner applies them, on explicit metadata (no llama.cpp needed).

The byte-for-byte comparisons with llama.cpp itself are in tests/memory; these tests pin the rules'
consequences for the planner: refusals, unsupported architectures, cell counts, SWA and unified
caches, the DeepSeek conversions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from parallama_runtime.cli import main as cli_main
from parallama_runtime.planning.errors import UnsupportedModelError
from parallama_runtime.planning.memory import (
    KVCacheType,
    MemoryConfig,
    context_refusal,
    estimate_memory,
    kv_cells_per_slot,
    sequence_ids,
)
from parallama_runtime.planning.model_info import model_info_from_metadata
from parallama_runtime.planning.planner import Node, PlanRequest, make_plan
from parallama_runtime.planning.presets import PRESETS

GiB = 1024**3
L4 = Node(name="l4", product="NVIDIA-L4", gpu_count=1, gpu_memory_bytes=24 * GiB)


def llama(**overrides: object) -> dict[str, object]:
    metadata: dict[str, object] = {
        "architecture": "llama",
        "block_count": 4,
        "embedding_length": 2560,
        "head_count": 32,
        "head_count_kv": 8,
        "context_length": 8192,
        "size_bytes": 1_000_000_000,
    }
    metadata.update(overrides)
    return metadata


def test_quantized_k_with_flash_attention_needs_a_head_size_the_block_divides() -> None:
    """phi-2-like heads of 80: llama.cpp refuses q8_0/q4_0 K with flash attention (80 % 32 != 0)."""
    model = model_info_from_metadata(llama())
    assert model.key_length == 80
    for kv in (KVCacheType.Q8_0, KVCacheType.Q4_0):
        refusal = context_refusal(model, MemoryConfig(kv_cache_type=kv, flash_attention=True))
        assert refusal is not None and "head size 80" in refusal and kv.value in refusal
        with pytest.raises(ValueError, match="head size 80"):
            estimate_memory(model, MemoryConfig(kv_cache_type=kv, flash_attention=True))
    # f16 is fine, and so is q8_0 without flash attention (K rows of 8 x 80 = 640 values; V stays f16)
    assert context_refusal(model, MemoryConfig(kv_cache_type=KVCacheType.F16)) is None
    assert context_refusal(model, MemoryConfig(kv_cache_type=KVCacheType.Q8_0, flash_attention=False)) is None


def test_a_refused_plan_says_why_and_the_cli_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = model_info_from_metadata(llama())
    plan = make_plan(model, [L4], PlanRequest(kv_cache_type=KVCacheType.Q8_0))
    assert not plan.fits and plan.refused
    assert plan.reason.startswith("refused:") and "head size 80" in plan.reason

    path = tmp_path / "hd80.json"
    path.write_text(json.dumps(llama()))
    code = cli_main(["plan", "--model", str(path), "--gpus", "1xL4", "--kv-cache-type", "q8_0"])
    out = capsys.readouterr().out
    assert code == 2
    assert "head size 80" in out


def test_an_architecture_without_rules_is_named_never_planned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UnsupportedModelError, match="'made-up-arch' cannot be planned yet"):
        model_info_from_metadata(llama(architecture="made-up-arch"))
    path = tmp_path / "unknown.json"
    path.write_text(json.dumps(llama(architecture="made-up-arch")))
    assert cli_main(["plan", "--model", str(path), "--gpus", "1xL4"]) == 2
    assert "made-up-arch" in capsys.readouterr().err


@pytest.mark.parametrize(("num_ctx", "slots"), [(4096, 4), (1000, 3), (300, 7), (8192, 1)])
def test_unified_cache_is_one_stream_of_all_cells(num_ctx: int, slots: int) -> None:
    """The runtime's layout (the default): one pool of ``num_ctx x slots`` cells padded to 256, where
    a stream per slot pads every slot's share."""
    per_slot = kv_cells_per_slot(num_ctx, slots)
    unified = kv_cells_per_slot(num_ctx, slots, unified=True)
    assert per_slot % 256 == 0 and unified % 256 == 0
    assert per_slot >= num_ctx and unified >= num_ctx * slots
    model = model_info_from_metadata(llama(embedding_length=4096))
    split = estimate_memory(model, MemoryConfig(num_ctx=num_ctx, num_parallel=slots, kv_unified=False))
    pooled = estimate_memory(model, MemoryConfig(num_ctx=num_ctx, num_parallel=slots))
    assert MemoryConfig().kv_unified
    assert (split.kv_cells_per_slot, pooled.kv_cells_per_slot) == (per_slot, unified)
    assert split.kv_cache_bytes == split.kv_bytes_per_token * per_slot * slots
    assert pooled.kv_cache_bytes == pooled.kv_bytes_per_token * unified


def test_the_unified_pool_scores_every_cell_without_flash_attention() -> None:
    """In one stream every token's KQ row spans the whole pool: without flash attention the compute
    buffer grows with the slots (the KQ matrix, n_head x pool cells per token), where a stream per
    slot kept it at one slot's cells. Flash attention keeps only the mask (f16, one row per token)."""
    model = model_info_from_metadata(llama(embedding_length=4096))

    def compute(slots: int, *, unified: bool, fa: bool) -> int:
        config = MemoryConfig(
            num_ctx=4096, num_parallel=slots, flash_attention=fa, kv_unified=unified, n_seq_max=slots
        )
        return estimate_memory(model, config).compute_bytes

    kq = 4096 * 32 * 512 * 4  # one slot's cells x heads x micro-batch, f32
    assert compute(4, unified=False, fa=False) == compute(1, unified=False, fa=False)
    assert compute(4, unified=True, fa=False) - compute(1, unified=True, fa=False) >= 3 * kq
    mask = 4096 * 512 * 2  # one slot's cells x micro-batch, f16
    assert 0 <= compute(4, unified=True, fa=True) - compute(1, unified=True, fa=True) <= 3 * mask


def test_sequence_ids_the_runtime_gives() -> None:
    """More sequence ids than slots only where no buffer grows with them but the logits and the
    reserved batch's rounding: not with recurrent state nor with a small sliding-window cache."""

    def ids(slots: int, **flags: Any) -> int:
        return sequence_ids(slots, **{"recurrent": False, "sliding_window": 0, "swa_full": False, **flags})

    assert [ids(slots) for slots in (1, 4, 5, 8, 9, 64, 100)] == [16, 16, 32, 32, 64, 256, 256]
    assert ids(4, prompt_cache=False) == 4
    assert ids(4, recurrent=True) == 4
    assert ids(4, sliding_window=4096) == 4 and ids(4, sliding_window=4096, swa_full=True) == 16
    # the plan applies the rule to the model's layout unless n_seq_max is given
    gemma2 = model_info_from_metadata(llama(architecture="gemma2", embedding_length=2048, head_count=8))
    assert gemma2.layout.has_swa
    assert estimate_memory(gemma2, MemoryConfig(num_parallel=4)).n_seq_max == 4
    assert estimate_memory(gemma2, MemoryConfig(num_parallel=4, swa_full=True)).n_seq_max == 16
    mamba = model_info_from_metadata(
        {
            "architecture": "mamba",
            "block_count": 2,
            "embedding_length": 256,
            "head_count": 0,
            "context_length": 4096,
            "size_bytes": 10_000_000,
            "gguf": {
                "ssm.conv_kernel": 4,
                "ssm.inner_size": 512,
                "ssm.state_size": 16,
                "ssm.time_step_rank": 16,
            },
        }
    )
    assert estimate_memory(mamba, MemoryConfig(num_parallel=4)).n_seq_max == 4
    dense = model_info_from_metadata(llama())
    assert estimate_memory(dense, MemoryConfig(num_parallel=4)).n_seq_max == 16
    assert estimate_memory(dense, MemoryConfig(num_parallel=4, kv_unified=False)).n_seq_max == 4
    assert estimate_memory(dense, MemoryConfig(num_parallel=4, n_seq_max=7)).n_seq_max == 7


def test_extra_sequence_ids_in_the_plan() -> None:
    """A plan for 4 slots of a dense model assumes the runtime's 16 ids: the same KV pool, a row of
    logits per id (host memory beside a GPU), and a reserved batch rounded up to a multiple of them."""
    model = model_info_from_metadata(llama(vocab_size=32000))
    plan = estimate_memory(model, MemoryConfig(num_ctx=4096, num_parallel=4))
    four = estimate_memory(model, MemoryConfig(num_ctx=4096, num_parallel=4, n_seq_max=4))
    assert (plan.n_seq_max, four.n_seq_max) == (16, 4)
    assert plan.kv_cache_bytes == four.kv_cache_bytes and plan.compute_bytes == four.compute_bytes
    assert plan.output_buffer_bytes == 4 * 32000 * 16 and plan.host_bytes - four.host_bytes == 4 * 32000 * 12
    assert plan.total_bytes == four.total_bytes  # GPU memory: the logits live in host memory
    cpu = estimate_memory(model, MemoryConfig(num_ctx=4096, num_parallel=4, gpu_layers=0))
    assert cpu.devices[0].output_bytes == plan.output_buffer_bytes and cpu.host_bytes == 0
    twenty = estimate_memory(model, MemoryConfig(num_ctx=4096, num_parallel=4, n_seq_max=20))
    assert twenty.compute_bytes > plan.compute_bytes  # 520 tokens reserved for a 512-token micro-batch
    with pytest.raises(ValueError, match="n_seq_max"):
        estimate_memory(model, MemoryConfig(num_parallel=4, n_seq_max=3))


def test_deepseek_conversions_cache_what_llama_cpp_caches() -> None:
    """The seed's 202 GB R1: files converted before llama.cpp's MLA change cache full per-head K and V
    (4,997,120 bytes per token in f16); the re-converted ones one latent row (70,272)."""
    legacy = model_info_from_metadata(PRESETS["deepseek-r1-q2"])
    mla = model_info_from_metadata(PRESETS["deepseek-r1-q2-mla"])
    config = MemoryConfig(num_ctx=4096, num_parallel=4)
    assert estimate_memory(legacy, config).kv_bytes_per_token == 4_997_120
    assert estimate_memory(mla, config).kv_bytes_per_token == 70_272
    assert not legacy.is_mla and mla.is_mla
    # 4 slots of 4096 in the legacy conversion: about 76 GiB of KV, as the issue measured
    assert round(estimate_memory(legacy, config).kv_cache_bytes / GiB) == 76
    # MLA refuses different K and V types: a quantized K without flash attention keeps V in f16
    refusal = context_refusal(mla, MemoryConfig(kv_cache_type=KVCacheType.Q8_0, flash_attention=False))
    assert refusal is not None and "different K (q8_0) and V (f16)" in refusal
    assert (
        context_refusal(legacy, MemoryConfig(kv_cache_type=KVCacheType.Q8_0, flash_attention=False)) is None
    )


def test_the_seed_model_on_8_l20_plans_what_really_fits() -> None:
    l20 = Node(name="l20", product="NVIDIA-L20", gpu_count=8, gpu_memory_bytes=48 * 10**9)
    legacy = model_info_from_metadata(PRESETS["deepseek-r1-q2"])
    mla = model_info_from_metadata(PRESETS["deepseek-r1-q2-mla"])
    plan_legacy = make_plan(legacy, [l20], PlanRequest(num_ctx=8192))
    plan_mla = make_plan(mla, [l20], PlanRequest(num_ctx=8192))
    assert plan_legacy.fits and plan_mla.fits
    # the full K and V of the old conversion leave room for fewer slots than the latent cache
    assert plan_legacy.num_parallel < plan_mla.num_parallel == 4
    for plan in (plan_legacy, plan_mla):
        for device in plan.devices:
            assert device.total_bytes <= device.usable_bytes


def test_gpu_plans_count_cuda_flash_attention_over_a_quantized_cache() -> None:
    """Measured on an H100 (bench/cuda_memory.py): CUDA's flash attention over a q8_0 cache holds one
    layer's K and V of every stream in f16; the CPU graph does not, and f16 caches need no copy."""
    model = model_info_from_metadata(llama(embedding_length=4096))
    width = max(layer.k_elements + layer.v_elements for layer in model.layout.layers)

    def compute(kv: KVCacheType, gpu: bool) -> int:
        config = MemoryConfig(num_ctx=4096, num_parallel=4, kv_cache_type=kv, gpu_layers=-1 if gpu else 0)
        return estimate_memory(model, config).compute_bytes

    cells = kv_cells_per_slot(4096, 4) * 4
    assert compute(KVCacheType.Q8_0, gpu=True) - compute(KVCacheType.Q8_0, gpu=False) == cells * width * 2
    assert compute(KVCacheType.F16, gpu=True) == compute(KVCacheType.F16, gpu=False)


def test_replicas_go_where_they_all_fit_and_the_plan_says_where() -> None:
    """4 replicas of a small model: one L4 node hosts only one, an 8 x L20 node all four; the plan
    takes the L20s and places every replica instead of pinning them to a product that holds one."""
    model = model_info_from_metadata(PRESETS["llama-3.1-8b"])
    l4 = Node(name="l4", product="NVIDIA-L4", gpu_count=1, gpu_memory_bytes=24 * GiB)
    l20 = Node(name="l20", product="NVIDIA-L20", gpu_count=8, gpu_memory_bytes=48 * GiB)
    one = make_plan(model, [l4, l20], PlanRequest())
    assert one.gpu_product == "NVIDIA-L4" and one.placement == {"l4": 1}  # smallest GPU for a single replica
    four = make_plan(model, [l4, l20], PlanRequest(replicas=4))
    assert four.gpu_product == "NVIDIA-L20" and four.placement == {"l20": 4} and four.replicas_placed == 4
    assert "4 replicas on l20 (4)" in four.reason


def test_a_partial_placement_says_how_many_fit_and_packs_small_nodes_first() -> None:
    model = model_info_from_metadata(PRESETS["qwen2.5-32b"])  # needs 2 L4s per replica
    nodes = [
        Node(name="big", product="NVIDIA-L4", gpu_count=8, gpu_memory_bytes=24 * GiB),
        Node(name="small", product="NVIDIA-L4", gpu_count=2, gpu_memory_bytes=24 * GiB),
    ]
    plan = make_plan(model, nodes, PlanRequest(replicas=2))
    assert plan.gpus_per_replica == 2 and plan.placement == {"small": 1, "big": 1}
    many = make_plan(model, nodes, PlanRequest(replicas=7))
    assert many.fits and many.replicas_placed == 5 and many.placement == {"small": 1, "big": 4}
    assert "only 5 of 7 replicas fit" in many.reason and "2 free NVIDIA-L4" in many.reason
