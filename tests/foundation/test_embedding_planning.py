"""Embedding models in the planner: what the header says a model serves, the embedding context the
memory model plans for it, the plan and ``parallama plan`` (llama.cpp itself: tests/memory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gguf import PoolingType
from hypothesis import given
from hypothesis import strategies as st
from parallama_runtime.cli import main
from parallama_runtime.planning.errors import ModelSourceError, UnsupportedModelError
from parallama_runtime.planning.memory import (
    MemoryConfig,
    embedding_batch,
    estimate_memory,
    sequence_ids,
)
from parallama_runtime.planning.model_info import model_info_from_metadata, model_info_from_url
from parallama_runtime.planning.planner import Node, PlanRequest, make_plan
from parallama_runtime.planning.presets import PRESETS
from support.families.embedding import write_embedding_model

GiB = 1024**3
L4 = Node(name="l4", product="NVIDIA-L4", gpu_count=1, gpu_memory_bytes=23034 * 1024**2)
QWEN3_EMBEDDING = {k: v for k, v in PRESETS["qwen3-embedding-0.6b"].items() if k != "name"}
LLAMA_8B = {k: v for k, v in PRESETS["llama-3.1-8b"].items() if k != "name"}


def test_the_header_read_over_http_carries_the_pooling(tmp_path: Path, file_server_factory: Any) -> None:
    """The bounded reader (Range requests) keeps the scalar ``pooling_type`` it steps past arrays for."""
    write_embedding_model(tmp_path / "embed.gguf", PoolingType.CLS)
    server = file_server_factory(tmp_path)
    info = model_info_from_url(server.url("embed.gguf"))
    assert (info.pooling_type, info.task, info.pooling) == (2, "embed", "cls")
    assert info.embedding_output_length == info.embedding_length == 256


@pytest.mark.parametrize(
    ("pooling", "task"),
    [(None, "generate"), ("none", "generate"), (0, "generate"), ("mean", "embed"), (3, "embed")],
)
def test_metadata_pooling_by_name_or_number(pooling: Any, task: str) -> None:
    metadata = {**LLAMA_8B, "poolingType": pooling}
    assert model_info_from_metadata(metadata).task == task


@pytest.mark.parametrize(
    ("pooling", "error", "fragment"),
    [
        ("rank", UnsupportedModelError, "rerankers are not supported"),
        (4, UnsupportedModelError, "rank"),
        (7, UnsupportedModelError, "pooling_type 7"),
        ("avg", ModelSourceError, "unknown poolingType 'avg'"),
    ],
)
def test_rank_and_unknown_poolings_are_refused(pooling: Any, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        model_info_from_metadata({**LLAMA_8B, "poolingType": pooling})


def test_rank_is_bad_input_for_parallama_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rank.json"
    path.write_text(json.dumps({**LLAMA_8B, "poolingType": "rank"}))
    assert main(["plan", "--model", str(path), "--gpus", "1xL4"]) == 2
    assert "rerankers are not supported" in capsys.readouterr().err


@given(num_ctx=st.integers(1, 70_000), slots=st.integers(1, 256))
def test_embedding_batch_is_a_whole_input_split_evenly(num_ctx: int, slots: int) -> None:
    batch = embedding_batch(num_ctx, slots)
    assert batch % slots == 0 and num_ctx <= batch < num_ctx + slots
    assert batch <= num_ctx * slots  # never past the context, so llama.cpp keeps it as given


def test_embedding_batch_examples() -> None:
    assert [embedding_batch(c, s) for c, s in ((1000, 3), (512, 4), (2048, 1), (1, 3))] == [
        1002,
        512,
        2048,
        3,
    ]


def test_an_embedding_context_takes_one_id_per_slot() -> None:
    flags: dict[str, Any] = {"recurrent": False, "sliding_window": 0, "swa_full": False}
    assert sequence_ids(4, **flags) == 16  # the prompt cache's ids
    assert sequence_ids(4, **flags, embeddings=True) == 4


def test_for_model_resolves_the_runtime_context() -> None:
    embed = model_info_from_metadata(QWEN3_EMBEDDING)
    chat = model_info_from_metadata(LLAMA_8B)
    config = MemoryConfig(num_ctx=1000, num_parallel=3, n_ubatch=512)
    assert config.for_model(chat) == MemoryConfig(
        num_ctx=1000, num_parallel=3, n_ubatch=512, embeddings=False
    )
    resolved = config.for_model(embed)
    assert (resolved.embeddings, resolved.n_seq_max, resolved.n_ubatch) == (True, 3, 1002)
    # an explicit choice wins: more ids, or a generative context for the same file
    assert MemoryConfig(num_ctx=1000, num_parallel=3, n_seq_max=6).for_model(embed).n_ubatch == 1002
    assert MemoryConfig(num_ctx=1000, num_parallel=3, embeddings=False).for_model(embed).n_ubatch == 512


def test_a_gpu_plan_keeps_the_output_buffer_in_host_memory() -> None:
    embed = model_info_from_metadata(QWEN3_EMBEDDING)
    estimate = estimate_memory(embed, MemoryConfig(num_ctx=2048, num_parallel=4))
    rows = 4 * (151669 + 1024) * 2048
    assert estimate.output_buffer_bytes == rows
    assert all(d.output_bytes == 0 for d in estimate.devices)
    assert estimate.host_bytes == estimate.output_buffer_bytes  # metadata: no host-side embedding table
    # every token's logits are in the graph too: the compute buffer holds a micro-batch of them
    assert estimate.compute_bytes > 4 * 151669 * 2048


def test_the_plan_says_it_embeds_and_ignores_the_generation_batch() -> None:
    embed = model_info_from_metadata(QWEN3_EMBEDDING)
    plan = make_plan(embed, [L4], PlanRequest(num_ctx=2048))
    assert plan.fits and (plan.task, plan.pooling) == ("embed", "last")
    assert plan.num_parallel == 4 and plan.n_seq_max == 4
    assert plan.reason.startswith("embedding model (last pooling, a slot embeds one input): 4 slots of 2048")
    assert plan.output_buffer_bytes == 4 * (151669 + 1024) * 2048
    same = make_plan(embed, [L4], PlanRequest(num_ctx=2048, n_ubatch=128))
    assert same.memory == plan.memory  # an embedding context's batch is a whole input
    too_long = make_plan(embed, [L4], PlanRequest(num_ctx=32768, num_parallel=4, flash_attention=False))
    assert not too_long.fits and "embedding model (last pooling" in too_long.reason
    chat = make_plan(model_info_from_metadata(LLAMA_8B), [L4], PlanRequest())
    assert (chat.task, chat.pooling) == ("generate", None) and not chat.reason.startswith("embedding")


def test_parallama_plan_prints_the_task(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--model", "qwen3-embedding-0.6b", "--gpus", "1xL4", "--num-ctx", "2048"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "task       embed (last pooling): a slot embeds one input of up to 2048 tokens" in table
    assert "output buffer 1.2 GiB of host memory" in table
    assert main([*args, "--output", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["task"], plan["pooling"], plan["fits"]) == ("embed", "last", True)
    assert main(["plan", "--model", "llama-3.1-8b", "--gpus", "1xL4"]) == 0
    assert "task       generate" in capsys.readouterr().out
