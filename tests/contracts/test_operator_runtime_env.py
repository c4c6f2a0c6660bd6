"""The env contract end to end: what the operator puts in a runtime pod is what the runtime runs.

The operator's builders write OLLAMA_* and PARALLAMA_* variables from a plan; ``parallama serve``
reads them. Both sides are real code here: the pure builders and the runtime's own settings
resolver, fed the container's env and args exactly as Kubernetes would.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from parallama_operator.builders import Owner, build_deployment
from parallama_operator.planning import plan_request, plan_status
from parallama_operator.resources import ModelDeploymentSpec
from parallama_runtime import serve
from parallama_runtime.planning.model_info import model_info_from_metadata
from parallama_runtime.planning.planner import Node, make_plan
from parallama_runtime.planning.presets import PRESETS

OWNER = Owner(name="m", namespace="ai", uid="00000000-0000-0000-0000-000000000001")
L20x8 = Node(name="l20", product="NVIDIA-L20", gpu_count=8, gpu_memory_bytes=46068 * 1024**2)


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
        ("llama-3.1-8b", {"swaFull": True}),
    ],
)
def test_runtime_runs_what_the_operator_planned(preset: str, fields: dict[str, Any]) -> None:
    metadata = {k: v for k, v in PRESETS[preset].items() if k != "name"}
    spec = ModelDeploymentSpec.model_validate(
        {"model": {"uri": f"https://models.example/{preset}.gguf", "metadata": metadata}, **fields}
    )
    plan = make_plan(model_info_from_metadata(metadata), [L20x8], plan_request(spec))
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
