"""Ollama's response fields: the final object's counts and durations, /api/ps's memory from what
llama.cpp measured, /api/show's details and model_info from the GGUF header, through the official
client and checked against independent sources (the OpenAI route's token count, /metrics, the file's
header read by the planner's reader)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
from parallama_runtime.api.model_details import model_info, parameter_size, quantization_level
from parallama_runtime.planning.gguf_header import read_gguf_header
from parallama_runtime.serve import BackgroundServer
from runtime_helpers import SERVED_NAME, scrape

MESSAGES = [{"role": "user", "content": "what does a final object carry?"}]
OPTIONS = {"num_predict": 5, "temperature": 0, "ignore_eos": True}
FINAL_FIELDS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
    "done_reason",
)


def _get(url: str, payload: dict[str, Any] | None = None) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


# ------------------------------------------------------------------ formats, no server


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (8_030_261_248, "8.0B"),
        (8_000_000_000, "8B"),
        (7_241_732_096, "7.2B"),
        (3_212_345, "3.21M"),
        (3_000_000, "3M"),
        (12_345, "12K"),
        (999, "999"),
    ],
)
def test_parameter_size_as_ollama_prints_it(count: int, shown: str) -> None:
    assert parameter_size(count) == shown


@pytest.mark.parametrize(
    ("file_type", "name"),
    [(0, "F32"), (1, "F16"), (15, "Q4_K_M"), (32, "BF16"), (None, "unknown"), (4, "unknown")],
)
def test_quantization_level_names_llamas_file_types(file_type: int | None, name: str) -> None:
    assert quantization_level(file_type) == name


def test_model_info_shows_the_header_as_ollama_does() -> None:
    info = model_info(
        {
            "general.name": "x",
            "tokenizer.chat_template": "{{ x }}",
            "llama.context_length": 4096,
            "llama.attention.sliding_window_pattern": [True] * 6,
            "llama.feed_forward_length": [1, 2],
        },
        parameter_count=42,
    )
    assert info == {
        "general.parameter_count": 42,
        "llama.attention.sliding_window_pattern": [],  # more than 5 items: shown empty
        "llama.context_length": 4096,
        "llama.feed_forward_length": [1, 2],
    }


# ------------------------------------------------------------------ the final object


def test_generate_final_object_has_every_field(oll: ollama.Client, server: BackgroundServer) -> None:
    reply = oll.generate(model=SERVED_NAME, prompt=MESSAGES[0]["content"], options=OPTIONS)
    assert reply.done and reply.done_reason == "length"
    for name in FINAL_FIELDS:
        assert getattr(reply, name) is not None, name
    assert reply.context == []  # not kept: see docs/runtime.md
    assert reply.load_duration == 0  # loaded before the first request was taken
    assert reply.eval_count == 5
    assert reply.prompt_eval_duration > 0 and reply.eval_duration > 0  # type: ignore[operator]
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration  # type: ignore[operator]
    # the same prompt through the OpenAI route: the same count of prompt tokens
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    usage = oai.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=1).usage  # type: ignore[arg-type]
    assert usage is not None and reply.prompt_eval_count == usage.prompt_tokens


def test_raw_generate_has_no_context(server: BackgroundServer) -> None:
    """As in Ollama: a raw prompt gets no context back."""
    body = {"model": SERVED_NAME, "prompt": "abc", "raw": True, "stream": False, "options": OPTIONS}
    reply = _get(server.url + "/api/generate", body)
    assert "context" not in reply and reply["eval_count"] == 5


def test_chat_stream_final_object(oll: ollama.Client) -> None:
    parts = list(oll.chat(model=SERVED_NAME, messages=MESSAGES, options=OPTIONS, stream=True))
    final = parts[-1]
    assert final.done and final.message.content == ""
    for name in FINAL_FIELDS:
        assert getattr(final, name) is not None, name
    assert final.eval_count == 5 and final.prompt_eval_count > 0  # type: ignore[operator]
    assert final.total_duration >= final.prompt_eval_duration + final.eval_duration  # type: ignore[operator]
    assert all(getattr(part, name) is None for part in parts[:-1] for name in FINAL_FIELDS)


# ------------------------------------------------------------------ /api/ps and /api/show


def test_ps_reports_the_measured_memory(oll: ollama.Client, server: BackgroundServer) -> None:
    """size and size_vram are llama.cpp's own buffer reports: the figures /metrics publishes as
    parallama_memory_measured_bytes (NVML's whole-process figure aside)."""
    measured = {
        key: value
        for key, value in scrape(server.url).items()
        if key.startswith("parallama_memory_measured_bytes{") and 'component="process"' not in key
    }
    assert measured
    total = sum(measured.values())
    on_devices = sum(
        value for key, value in measured.items() if 'device="CPU' not in key and '_Host"' not in key
    )
    running = oll.ps().models
    assert len(running) == 1
    assert running[0].size == total > 0
    assert running[0].size_vram == on_devices
    raw = _get(server.url + "/api/ps")["models"][0]
    assert raw["size"] == total and raw["size_vram"] == on_devices


def test_show_details_and_model_info(oll: ollama.Client, server: BackgroundServer, model_path: Path) -> None:
    header = read_gguf_header(model_path)
    parameters = sum(tensor.n_elements for tensor in header.tensors)
    shown = oll.show(SERVED_NAME)
    details = shown.details
    assert details is not None
    assert details.family == header.metadata["general.architecture"] == "llama"
    assert details.quantization_level == "F16"  # the demo model's general.file_type is 1
    assert details.parameter_size == f"{parameters / 1e6:.2f}M"  # Ollama's form for millions
    info = shown.modelinfo
    assert info is not None
    assert info["general.parameter_count"] == parameters
    assert info["llama.context_length"] == header.metadata["llama.context_length"]
    assert info["llama.embedding_length"] == header.metadata["llama.embedding_length"]
    assert "tokenizer.chat_template" not in info and "general.name" not in info
    raw = _get(server.url + "/api/show", {"model": SERVED_NAME})
    assert raw["details"]["context_length"] == header.metadata["llama.context_length"]
