"""``parallama serve`` settings: flags beat the environment, which beats defaults; bad values say why."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from parallama_runtime.engine.chat_template import FALLBACK_TEMPLATE, TemplateError, render_chat
from parallama_runtime.planning import planner
from parallama_runtime.planning.memory import KVCacheType
from parallama_runtime.planning.model_info import model_info_from_metadata
from parallama_runtime.planning.presets import PRESETS
from parallama_runtime.serve import DEFAULT_PORT, Server, SettingsError, add_arguments, resolve_settings


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


ENV = {
    "OLLAMA_NUM_PARALLEL": "3",
    "OLLAMA_CONTEXT_LENGTH": "8192",
    "OLLAMA_KV_CACHE_TYPE": "q8_0",
    "OLLAMA_FLASH_ATTENTION": "0",
    "PARALLAMA_GPU_LAYERS": "0",
    "PARALLAMA_TENSOR_SPLIT": "0.6,0.4",
    "PARALLAMA_MODEL": "/models/m.gguf",
    "PARALLAMA_SWA_FULL": "1",
}


def test_environment_is_honoured() -> None:
    s = resolve_settings(_args(), ENV)
    assert (s.parallel, s.num_ctx, s.kv_cache_type, s.flash_attention) == (3, 8192, KVCacheType.Q8_0, False)
    assert s.gpu_layers == 0 and s.tensor_split == (0.6, 0.4) and s.model == "/models/m.gguf"
    assert s.swa_full is True
    assert s.port == DEFAULT_PORT
    assert any("f16" in note for note in s.notes)  # quantized V needs flash attention


def test_flags_beat_environment() -> None:
    s = resolve_settings(
        _args(
            "/x.gguf",
            "--parallel",
            "auto",
            "--num-ctx",
            "2048",
            "--kv-cache-type",
            "q4_0",
            "--flash-attention",
            "--gpu-layers",
            "12",
            "--tensor-split",
            "1,1",
            "--port",
            "9000",
            "--no-swa-full",
        ),
        ENV,
    )
    assert s.parallel is None and s.num_ctx == 2048 and s.kv_cache_type == KVCacheType.Q4_0
    assert s.flash_attention is True and s.gpu_layers == 12 and s.tensor_split == (1.0, 1.0)
    assert s.model == "/x.gguf" and s.port == 9000 and s.swa_full is False


def test_defaults() -> None:
    s = resolve_settings(_args(), {})
    assert s.parallel is None and s.num_ctx == 4096 and s.kv_cache_type == KVCacheType.F16
    assert s.flash_attention and s.gpu_layers == -1 and s.model is None and s.host == "127.0.0.1"
    assert s.swa_full is False  # llama-server's default: window-sized caches for sliding-window layers


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ((), {"PARALLAMA_SWA_FULL": "0"}, False),
        ((), {"PARALLAMA_SWA_FULL": "true"}, True),
        ((), {"PARALLAMA_SWA_FULL": "False"}, False),
        ((), {"PARALLAMA_SWA_FULL": " "}, False),  # set but empty: the default
        (("--swa-full",), {}, True),
        (("--swa-full",), {"PARALLAMA_SWA_FULL": "0"}, True),
        (("--no-swa-full",), {"PARALLAMA_SWA_FULL": "1"}, False),
    ],
)
def test_swa_full_flag_beats_environment(argv: tuple[str, ...], env: dict[str, str], expected: bool) -> None:
    assert resolve_settings(_args(*argv), env).swa_full is expected


def test_swa_full_reaches_the_engine_and_the_auto_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server plans its slots, and creates its llama.cpp context, with the same swa_full."""
    requests: list[planner.PlanRequest] = []
    real_make_plan = planner.make_plan

    def spy(*args: Any) -> planner.Plan:
        requests.append(args[2])
        return real_make_plan(*args)

    monkeypatch.setattr(planner, "make_plan", spy)
    monkeypatch.setattr(
        "parallama_runtime.local_inventory.local_nodes",
        lambda: [planner.Node(name="local", product="L4", gpu_count=1, gpu_memory_bytes=24 * 1024**3)],
    )
    model = model_info_from_metadata({k: v for k, v in PRESETS["llama-3.1-8b"].items() if k != "name"})
    for env, expected in (({"PARALLAMA_SWA_FULL": "1"}, True), ({}, False)):
        server = Server(resolve_settings(_args(), env))
        slots = server._slots(model)
        assert requests[-1].swa_full is expected
        config = server.engine_config(Path("/m.gguf"), slots)
        assert config.swa_full is expected and config.memory_config.swa_full is expected


def test_ollama_host() -> None:
    s = resolve_settings(_args(), {"OLLAMA_HOST": "0.0.0.0:8080"})
    assert (s.host, s.port) == ("0.0.0.0", 8080)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"OLLAMA_NUM_PARALLEL": "many"}, "integer"),
        ({"OLLAMA_NUM_PARALLEL": "-1"}, "at least 1"),
        ({"OLLAMA_KV_CACHE_TYPE": "q3"}, "q3"),
        ({"OLLAMA_FLASH_ATTENTION": "maybe"}, "boolean"),
        ({"PARALLAMA_TENSOR_SPLIT": "a,b"}, "comma list"),
        ({"OLLAMA_CONTEXT_LENGTH": "big"}, "integer"),
        ({"PARALLAMA_SWA_FULL": "full"}, "PARALLAMA_SWA_FULL='full' is not a boolean"),
    ],
)
def test_bad_values(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        resolve_settings(_args(), env)


def test_chat_template_is_sandboxed_and_falls_back() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat("{{ messages[0]['content'] }}!", messages) == "hi!"
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    assert render_chat(evil, messages) == render_chat(FALLBACK_TEMPLATE, messages)
    assert render_chat(None, messages).endswith("Assistant:")
    with pytest.raises(TemplateError, match="roles"):
        render_chat("{{ raise_exception('roles must alternate') }}", messages)
    with pytest.raises(TemplateError):
        render_chat(None, [{"content": "no role"}])
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert "ab" in render_chat(None, parts)


_BUDGET_ENV = {"PARALLAMA_PREFILL_BUDGET": "32", "PARALLAMA_PROMPT_CACHE": "0"}


@pytest.mark.parametrize(
    ("argv", "env", "budget", "cache"),
    [
        ([], {}, 256, True),
        (["--prefill-budget", "64", "--no-prompt-cache"], {}, 64, False),
        ([], {"PARALLAMA_PREFILL_BUDGET": "32", "PARALLAMA_PROMPT_CACHE": "0"}, 32, False),
        (
            ["--prefill-budget", "16", "--prompt-cache"],
            {"PARALLAMA_PREFILL_BUDGET": "32", "PARALLAMA_PROMPT_CACHE": "0"},
            16,
            True,
        ),
    ],
)
def test_prefill_budget_and_prompt_cache_reach_the_engine(
    argv: list[str], env: dict[str, str], budget: int, cache: bool
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = resolve_settings(parser.parse_args(["m.gguf", *argv]), env)
    config = Server(settings).engine_config(Path("m.gguf"), 2)
    assert (config.prefill_budget, config.prompt_cache) == (budget, cache)


@pytest.mark.parametrize("bad", [["--prefill-budget", "0"], ["--prefill-budget", "-3"]])
def test_a_prefill_budget_below_one_token_is_refused(bad: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SettingsError, match="prefill-budget"):
        resolve_settings(parser.parse_args(["m.gguf", *bad]), {})
