"""The examples plan the way their comments say, on a cluster with a 1 x L4 and an 8 x L20 node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from harness import gfd_node
from parallama_operator.planning import (
    GPU_RUNTIME_HOST_BYTES,
    compute_plan,
    host_bytes,
    model_from_metadata,
    plan_status,
)
from parallama_operator.resources import ModelDeploymentSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NODES = [gfd_node("gpu-l4", "NVIDIA-L4", 1, 23034), gfd_node("gpu-l20", "NVIDIA-L20", 8, 46068)]


def load(name: str) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(yaml.safe_load((EXAMPLES / name).read_text())["spec"])


def plan(spec: ModelDeploymentSpec, nodes: list[dict[str, Any]] = NODES) -> Any:
    model = model_from_metadata(spec)
    assert model is not None
    return compute_plan(spec, model, nodes)


def test_chat_model_takes_the_small_gpu_with_four_slots() -> None:
    result = plan(load("chat-llama-8b-1gpu.yaml"))
    assert result.fits and result.num_parallel == 4
    assert (result.gpus_per_replica, result.gpu_product) == (1, "NVIDIA-L4")


def test_batch_profile_gets_many_slots_on_the_l20() -> None:
    spec = load("batch-llama-8b-l20.yaml")
    result = plan(spec)
    assert result.fits and result.num_parallel >= 8 and result.gpu_product == "NVIDIA-L20"
    assert result.kv_cache_type.value == "q8_0"
    # the same request on the L4 alone cannot hold the 8 slots it asks for at least
    assert not plan(spec, NODES[:1]).fits


def test_deepseek_q2_spans_eight_l20s() -> None:
    spec = load("deepseek-r1-q2-8xl20.yaml")
    result = plan(spec)
    assert result.fits and result.gpus_per_replica == 8 and result.gpu_product == "NVIDIA-L20"
    assert len(result.tensor_split) == 8 and abs(sum(result.tensor_split) - 1) < 1e-3
    assert result.nodes == ["gpu-l20"]
    # a GGUF converted before llama.cpp's MLA change: full K (128 x 192) and V (128 x 128) per layer,
    # which leaves room for the 2 slots of 8192 the example's comment promises
    assert result.kv_bytes_per_token == 61 * 128 * (192 + 128) * 2
    assert result.num_parallel == 2
    assert any("MLA" in warning or "latent" in warning for warning in result.warnings)
    # the same model re-converted (keyLengthMla set): one latent row of kvLoraRank + rope dims
    metadata = spec.model.metadata
    assert metadata is not None
    mla = metadata.model_copy(
        update={
            "head_count_kv": 1,
            "key_length": 576,
            "value_length": 512,
            "key_length_mla": 192,
            "value_length_mla": 128,
        }
    )
    converted = plan(spec.model_copy(update={"model": spec.model.model_copy(update={"metadata": mla})}))
    assert converted.kv_bytes_per_token == 61 * (512 + 64) * 2
    assert converted.fits and converted.num_parallel == 4
    assert result.memory.weights_bytes >= 180 * 1024**3
    # left to itself the planner needs fewer GPUs, but never fewer than the weights demand
    auto = plan(spec.model_copy(update={"gpu": spec.gpu.model_copy(update={"count": None})}))
    assert auto.fits and 6 <= auto.gpus_per_replica < 8
    # and without the 8-GPU node it cannot run at all
    assert not plan(spec, NODES[:1]).fits


def test_embedding_model_plans_an_embedding_context_on_the_small_gpu() -> None:
    spec = load("embeddings-qwen3-0.6b-l4.yaml")
    model = model_from_metadata(spec)
    assert model is not None and (model.task, model.pooling) == ("embed", "last")
    result = plan(spec)
    assert result.fits and (result.task, result.pooling) == ("embed", "last")
    assert (result.gpus_per_replica, result.gpu_product, result.num_parallel) == (1, "NVIDIA-L4", 4)
    assert result.n_seq_max == 4  # an input per slot, no prompt-cache ids
    # what the example's comment promises: about 3.7 GiB on the GPU, 1.2 GiB of output buffer
    assert 3.5 * 1024**3 < result.memory.total_bytes < 3.9 * 1024**3
    assert result.output_buffer_bytes == 4 * (151669 + 1024) * 2048
    status = plan_status(result, spec, host=host_bytes(model, result))
    assert (status.task, status.pooling) == ("embed", "last")
    assert status.memory.output_bytes == result.output_buffer_bytes
    assert status.memory.host_bytes >= result.output_buffer_bytes + GPU_RUNTIME_HOST_BYTES
