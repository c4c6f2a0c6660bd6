"""A ModelDeployment serving an embedding model: the plan's task in the status and the printer
column, the Deployment built as for any model (the runtime detects the mode itself), the host memory
of an embedding context's output buffer, and a reranker refused like any unsupported model."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp.web
import pytest
import pytest_asyncio
from gguf import PoolingType
from harness import Cluster, gfd_node, running_operator
from parallama_operator.builders import Owner, build_deployment
from parallama_operator.planning import (
    GPU_RUNTIME_HOST_BYTES,
    compute_plan,
    host_bytes,
    model_from_metadata,
    plan_hash,
    plan_status,
)
from parallama_operator.resources import ModelDeploymentSpec
from parallama_runtime.planning.presets import PRESETS
from support.families.embedding import write_embedding_model

OWNER = Owner(name="embed", namespace="default", uid="00000000-0000-0000-0000-000000000002")
L4 = gfd_node("gpu-l4", "NVIDIA-L4", 1, 23034)
QWEN3_EMBEDDING = {k: v for k, v in PRESETS["qwen3-embedding-0.6b"].items() if k != "name"}
LLAMA_8B = {k: v for k, v in PRESETS["llama-3.1-8b"].items() if k != "name"}


def spec_for(metadata: dict[str, Any], **fields: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        {"model": {"uri": "pvc://models/m.gguf", "metadata": metadata}, **fields}
    )


def _container(spec: ModelDeploymentSpec) -> tuple[Any, dict[str, Any]]:
    model = model_from_metadata(spec)
    assert model is not None
    plan = compute_plan(spec, model, [L4])
    status = plan_status(plan, spec, host=host_bytes(model, plan))
    return status, build_deployment(OWNER, spec, status)["spec"]["template"]["spec"]["containers"][0]


def test_the_deployment_is_built_as_for_a_generative_model() -> None:
    """Same env names, probes, command and ports: the runtime reads the GGUF and serves embeddings."""
    embed_status, embed = _container(spec_for(QWEN3_EMBEDDING, numCtx=2048))
    chat_status, chat = _container(spec_for(LLAMA_8B, numCtx=2048))
    assert (embed_status.task, embed_status.pooling) == ("embed", "last")
    assert (chat_status.task, chat_status.pooling) == ("generate", None)
    assert [e["name"] for e in embed["env"]] == [e["name"] for e in chat["env"]]
    env = {e["name"]: e["value"] for e in embed["env"]}
    assert env["OLLAMA_NUM_PARALLEL"] == str(embed_status.num_parallel) == "4"  # inputs embedded together
    assert env["OLLAMA_CONTEXT_LENGTH"] == "2048"  # the longest input
    for key in ("readinessProbe", "livenessProbe", "startupProbe", "ports", "command", "args"):
        assert (key in embed) == (key in chat)
        if key in ("readinessProbe", "livenessProbe", "ports"):
            assert embed.get(key) == chat.get(key)


def test_host_memory_counts_an_embedding_context_output_buffer() -> None:
    """Beside GPUs the output buffer is host memory: a few MiB of logits rows for generation (inside
    the runtime's allowance, so generative plans and their hashes are unchanged), every token's row
    of logits and vector for an embedding context (added to the container's memory)."""
    embed_spec = spec_for(QWEN3_EMBEDDING, numCtx=2048)
    embed = model_from_metadata(embed_spec)
    assert embed is not None
    plan = compute_plan(embed_spec, embed, [L4])
    assert plan.output_buffer_bytes == 4 * (151669 + 1024) * 2048
    assert host_bytes(embed, plan) == GPU_RUNTIME_HOST_BYTES + plan.output_buffer_bytes  # no table known
    status = plan_status(plan, embed_spec, host=host_bytes(embed, plan))
    assert status.host_memory_bytes == status.memory.host_bytes
    container = build_deployment(OWNER, embed_spec, status)["spec"]["template"]["spec"]["containers"][0]
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi") and int(limit[:-2]) * 1024**2 >= status.host_memory_bytes

    chat_spec = spec_for(LLAMA_8B)
    chat = model_from_metadata(chat_spec)
    assert chat is not None
    chat_plan = compute_plan(chat_spec, chat, [L4])
    assert 0 < chat_plan.output_buffer_bytes < 16 * 1024**2
    assert host_bytes(chat, chat_plan) == GPU_RUNTIME_HOST_BYTES


def test_the_plan_hash_does_not_change_for_generative_models() -> None:
    """The task is not part of what the pods see: a generative deployment keeps its pods."""
    spec = spec_for(LLAMA_8B)
    model = model_from_metadata(spec)
    assert model is not None
    plan = compute_plan(spec, model, [L4])
    assert plan_hash(plan, spec) == plan_hash(plan.model_copy(update={"task": "embed"}), spec)


# ------------------------------------------------------------------------------------------------
# the real operator against the emulated cluster


class _Models:
    """GGUF files served with Range support (aiohttp's static files), as a model host does."""

    def __init__(self, base: str, directory: Path) -> None:
        self.base = base
        self.directory = directory

    def source(self, name: str) -> dict[str, str]:
        digest = hashlib.sha256((self.directory / name).read_bytes()).hexdigest()
        return {"uri": f"{self.base}/{name}", "sha256": digest}


@pytest_asyncio.fixture()
async def models(tmp_path: Path) -> AsyncIterator[_Models]:
    write_embedding_model(tmp_path / "embed.gguf", PoolingType.MEAN)
    write_embedding_model(tmp_path / "rerank.gguf", PoolingType.RANK)
    app = aiohttp.web.Application()
    app.router.add_static("/models/", tmp_path)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield _Models(f"http://127.0.0.1:{port}/models", tmp_path)
    await runner.cleanup()


def _status(cluster: Cluster, name: str, phase: str | None = None) -> dict[str, Any] | None:
    status = cluster.md(name).get("status") or {}
    if phase and status.get("phase") != phase:
        return None
    return status if status.get("plan") or phase else None


async def test_an_embedding_gguf_is_planned_and_deployed(cluster: Cluster, models: _Models) -> None:
    await cluster.add_node(L4)
    async with running_operator():
        await cluster.create_md("embed", {"model": models.source("embed.gguf"), "numCtx": 1000})
        status = await cluster.wait_for(lambda: _status(cluster, "embed"), what="a plan")
        dep = await cluster.wait_for(
            lambda: cluster.get("apps/v1/deployments", "embed"), what="the Deployment"
        )
    plan = status["plan"]
    assert plan["fits"] and (plan["task"], plan["pooling"]) == ("embed", "mean")
    assert plan["reason"].startswith("embedding model (mean pooling")
    assert plan["memory"]["outputBytes"] > 0
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OLLAMA_NUM_PARALLEL"] == str(plan["numParallel"])
    assert env["OLLAMA_CONTEXT_LENGTH"] == "1000"


async def test_a_reranker_is_invalid_without_a_deployment(cluster: Cluster, models: _Models) -> None:
    await cluster.add_node(L4)
    async with running_operator():
        await cluster.create_md("rerank", {"model": models.source("rerank.gguf")})
        status = await cluster.wait_for(lambda: _status(cluster, "rerank", "Invalid"), what="phase Invalid")
        await cluster.wait_for(
            lambda: any(e.get("reason") == "UnsupportedModel" for e in cluster.events("rerank")),
            what="an UnsupportedModel event",
        )
    assert "rerankers are not supported" in status["message"]
    assert cluster.get("apps/v1/deployments", "rerank") is None


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_metadata_pooling_makes_an_embedding_plan(pooling: str) -> None:
    status, _ = _container(spec_for({**LLAMA_8B, "poolingType": pooling}))
    assert (status.task, status.pooling) == ("embed", pooling)
    none, _ = _container(spec_for({**LLAMA_8B, "poolingType": "none"}))
    assert (none.task, none.pooling) == ("generate", None)
