"""The env contract end to end: what the operator puts in a runtime pod is what the runtime runs.

The operator's builders write OLLAMA_* and PARALLAMA_* variables from a plan; ``parallama serve``
reads them and creates its engine. Both sides are real code here: the pure builders, the runtime's
own settings resolver, fed the container's env and args exactly as Kubernetes would, and the engine
configuration the server makes from them. The engine must run the layout the plan assumed (one
unified KV pool, the same sequence ids), so that the memory it plans for itself is the operator's.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from parallama_operator.builders import Owner, build_deployment
from parallama_operator.planning import plan_request, plan_status
from parallama_operator.resources import ModelDeploymentSpec
from parallama_runtime import serve
from parallama_runtime.engine import binding
from parallama_runtime.planning.memory import estimate_memory
from parallama_runtime.planning.model_info import model_info_from_metadata
from parallama_runtime.planning.planner import Node, make_plan
from parallama_runtime.planning.presets import PRESETS

OWNER = Owner(name="m", namespace="ai", uid="00000000-0000-0000-0000-000000000001")
L20x8 = Node(name="l20", product="NVIDIA-L20", gpu_count=8, gpu_memory_bytes=46068 * 1024**2)
MODELS = {
    **PRESETS,
    # a sliding-window model (Gemma-3-27B's shape): its small window cache grows with the sequence ids
    # in a unified pool, so the runtime gives it one per slot, and the plan must assume the same
    "gemma-3-27b": {
        "architecture": "gemma3",
        "blockCount": 62,
        "embeddingLength": 5376,
        "headCount": 32,
        "headCountKv": 16,
        "keyLength": 128,
        "valueLength": 128,
        "contextLength": 131072,
        "vocabSize": 262144,
        "feedForwardLength": 21504,
        "slidingWindow": 1024,
        "sizeBytes": 16_500_000_000,
    },
}


def runtime_settings(container: dict[str, Any]) -> serve.ServeSettings:
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return serve.resolve_settings(parser.parse_args(container.get("args", [])), env)


@pytest.mark.parametrize(
    ("preset", "fields"),
    [
        ("llama-3.1-8b", {"numCtx": 8192, "kvCacheType": "q8_0"}),
        ("llama-3.3-70b", {"numCtx": 4096, "flashAttention": False, "parallelism": {"numParallel": 2}}),
        ("deepseek-r1-q2", {"numCtx": 8192}),
        ("deepseek-r1-q2-mla", {"numCtx": 8192}),
        ("llama-3.1-8b", {"swaFull": True}),
        ("gemma-3-27b", {"numCtx": 8192}),
    ],
)
def test_runtime_runs_what_the_operator_planned(preset: str, fields: dict[str, Any]) -> None:
    metadata = {k: v for k, v in MODELS[preset].items() if k != "name"}
    spec = ModelDeploymentSpec.model_validate(
        {"model": {"uri": f"https://models.example/{preset}.gguf", "metadata": metadata}, **fields}
    )
    model = model_info_from_metadata(metadata)
    plan = make_plan(model, [L20x8], plan_request(spec))
    assert plan.fits, plan.reason
    status = plan_status(plan, spec)
    container = build_deployment(OWNER, spec, status)["spec"]["template"]["spec"]["containers"][0]
    settings = runtime_settings(container)

    assert settings.parallel == plan.num_parallel
    assert settings.num_ctx == plan.num_ctx
    assert settings.kv_cache_type == plan.kv_cache_type
    assert settings.flash_attention == plan.flash_attention
    assert settings.swa_full == plan.swa_full == spec.swa_full
    assert settings.gpu_layers == -1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(plan.gpus_per_replica)
    if plan.gpus_per_replica > 1:
        assert settings.tensor_split == pytest.approx(tuple(plan.tensor_split), abs=1e-4)
    else:
        assert settings.tensor_split == ()
    assert settings.model is not None and settings.model.endswith(f"{preset}.gguf")
    assert settings.host == "0.0.0.0" and settings.port == spec.service.port

    # the engine the server creates from these settings runs the layout the plan assumed
    engine = serve.Server(settings).engine_config(Path(settings.model), settings.parallel or 0)
    memory = engine.memory_config
    assert memory.kv_unified is True
    assert (memory.num_ctx, memory.num_parallel) == (plan.num_ctx, plan.num_parallel)
    assert (memory.type_k, memory.type_v) == (plan.kv_cache_type, plan.kv_cache_type_v)
    assert (memory.flash_attention, memory.swa_full) == (plan.flash_attention, plan.swa_full)
    layout = model.layout
    sequences = binding.sequence_ids(
        engine, recurrent=layout.has_recurrent, sliding_window=layout.sliding_window if layout.has_swa else 0
    )
    assert sequences == plan.n_seq_max
    # and so the memory the runtime plans for itself (serve: its memory_config on the GPUs it sees) is
    # what the operator planned, device by device
    gpus = plan.gpus_per_replica
    own = estimate_memory(
        model,
        replace(memory, n_seq_max=sequences, tensor_split=tuple(plan.tensor_split) or (1.0,) * gpus),
    )
    planned = [(d.device, d.kv_cache_bytes, d.compute_bytes) for d in plan.devices]
    assert [(d.device, d.kv_cache_bytes, d.compute_bytes) for d in own.devices] == planned
    assert (
        own.kv_cells_per_slot == plan.kv_cells_per_slot and own.swa_cells_per_slot == plan.swa_cells_per_slot
    )


def test_an_embedding_runtime_creates_the_context_the_operator_planned() -> None:
    """An embedding model: the pod gets the same env as any model, and the runtime's embedding
    context (one id per slot, a batch of a whole input rounded to the slots) is the one the plan
    counted, so the memory it plans for itself is the operator's, device by device."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from parallama_runtime.engine.embedding import embedding_context_params

    metadata = {k: v for k, v in PRESETS["qwen3-embedding-0.6b"].items() if k != "name"}
    spec = ModelDeploymentSpec.model_validate(
        {"model": {"uri": "https://models.example/embed.gguf", "metadata": metadata}, "numCtx": 1001}
    )
    model = model_info_from_metadata(metadata)
    plan = make_plan(model, [L20x8], plan_request(spec))
    assert plan.fits and plan.task == "embed" and plan.num_parallel == 4
    container = build_deployment(OWNER, spec, plan_status(plan, spec))["spec"]["template"]["spec"][
        "containers"
    ][0]
    settings = runtime_settings(container)
    assert (settings.parallel, settings.num_ctx) == (plan.num_parallel, plan.num_ctx)

    engine = serve.Server(settings).engine_config(Path(settings.model or ""), settings.parallel or 0)
    params = embedding_context_params(llama_cpp, engine, 2)
    planned = estimate_memory(model, replace(engine.memory_config, tensor_split=(1.0,)))
    assert planned.config.embeddings is True
    assert params.embeddings and params.kv_unified
    assert params.n_seq_max == planned.n_seq_max == plan.n_seq_max == plan.num_parallel
    assert params.n_ctx == plan.num_ctx * plan.num_parallel
    assert params.n_batch == params.n_ubatch == planned.config.n_ubatch == 1004  # rounded to the 4 slots
    planned_devices = [(d.device, d.kv_cache_bytes, d.compute_bytes) for d in planned.devices]
    assert planned_devices == [(d.device, d.kv_cache_bytes, d.compute_bytes) for d in plan.devices]
    assert planned.output_buffer_bytes == plan.output_buffer_bytes
