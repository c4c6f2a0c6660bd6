"""Dense, sliding-window and mixture-of-experts transformers: llama.cpp's memory rules for them.

All of these take ``create_memory``'s default branch (``src/llama-model.cpp``): one
``llama_kv_cache`` over every layer, or, when the architecture sets a sliding-window type,
``llama_kv_cache_iswa``: a full-size cache for the global layers and a small one (the window plus a
micro-batch, padded to 256) for the sliding ones. Mixture-of-experts changes only the weights and the
compute graph, never the cache. What differs per architecture is how ``load_arch_hparams``
(``src/models/<arch>.cpp``) decides which layers slide and how wide the window is; the head sizes
and KV heads come from the generic ``llama_model_base::load_hparams`` (:func:`attention_layers`).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import UnsupportedModelError
from . import CacheLayout, Hparams, LayerMemory, register

__all__ = [
    "PLAIN_ARCHITECTURES",
    "attention_layers",
    "main_layer_count",
    "plain_attention",
    "sliding_window_layout",
    "swa_pattern",
]


def main_layer_count(hp: Hparams) -> int:
    """llama.cpp's ``hparams.n_layer()``: ``block_count`` less the trailing NextN/MTP layers
    (``nextn_predict_layers``), which the main context never attends with."""
    n_layer_all = hp.n_layer
    nextn = int(hp.get("nextn_predict_layers", 0))
    if nextn > n_layer_all:
        raise UnsupportedModelError(f"{hp.arch}: nextn_predict_layers ({nextn}) exceeds block_count")
    return n_layer_all - nextn


def attention_layers(
    hp: Hparams, swa: list[bool] | None = None, *, filter_nextn: bool = True
) -> list[LayerMemory]:
    """Attention layers as ``llama_model_base::load_hparams`` sizes them, one per ``block_count``.

    ``n_head_kv`` is per layer (``get_key_or_arr``, default ``n_head``); the head sizes default to
    ``n_embd / n_head(0)`` and are overridden by ``attention.key_length`` / ``value_length``, and for
    sliding-window layers by ``attention.key_length_swa`` / ``value_length_swa``.

    A layer with zero KV heads (deci's "linear attention" and attention-free layers) still gets a
    cache entry in ``llama_kv_cache``'s constructor (``has_kv`` is true for every layer by default):
    its K rows are empty, but without flash attention its V rows are padded to the widest layer's
    (``TAG_V_CACHE_VARIABLE``), so it is marked ``kv=True``.

    With ``filter_nextn`` (the default branch of ``create_memory``: ``n_layer_nextn > 0`` and a trunk
    left), the NextN/MTP layers get no cache (``kv=False``) and no head sizes, since
    ``llama_init_from_model`` checks head sizes only over ``n_layer()``; their V width is kept, as
    ``n_embd_v_gqa_max`` (the V padding) runs over every layer.
    """
    n_layer_all = hp.n_layer
    n_layer = main_layer_count(hp) if filter_nextn else n_layer_all
    if n_layer == 0:  # a model made only of NextN layers has no trunk: llama.cpp does not filter
        n_layer = n_layer_all
    n_head = hp.per_layer("attention.head_count", n_layer_all)
    n_head_kv = hp.per_layer("attention.head_count_kv", n_layer_all, n_head)
    swa = swa or [False] * n_layer_all
    if n_head[0] > 0:
        n_embd: int = hp.n_embd
        head_k = int(hp.get("attention.key_length", n_embd // n_head[0]))
        head_v = int(hp.get("attention.value_length", n_embd // n_head[0]))
    else:
        head_k = head_v = 0
    head_k_swa = int(hp.get("attention.key_length_swa", head_k))
    head_v_swa = int(hp.get("attention.value_length_swa", head_v))
    layers = []
    for il in range(n_layer_all):
        hk, hv = (head_k_swa, head_v_swa) if swa[il] else (head_k, head_v)
        if il >= n_layer:
            layers.append(LayerMemory(v_elements=hv * n_head_kv[il], swa=swa[il], kv=False))
            continue
        layers.append(
            LayerMemory(
                k_elements=hk * n_head_kv[il],
                v_elements=hv * n_head_kv[il],
                head_k=hk,
                head_v=hv,
                swa=swa[il],
                kv=True if hk > 0 and n_head_kv[il] == 0 else None,
            )
        )
    return layers


PLAIN_ARCHITECTURES = (
    "llama",
    "deci",
    "mistral3",
    "qwen",
    "qwen2",
    "qwen2moe",
    "qwen3",
    "qwen3moe",
    "phi2",
    "phi3",
    "gemma",
    "granite",
    "granitemoe",
    "starcoder",
    "starcoder2",
    "command-r",
    "deepseek",
    "internlm2",
    "stablelm",
    "exaone",
    "olmo",
    "olmoe",
    "minicpm",
    "smollm3",
    "seed_oss",
    "ernie4_5",
    "ernie4_5-moe",
    "arcee",
    "apertus",
    "glm4",
    "glm4moe",
    "baichuan",
    "falcon",
    "gpt2",
    "gptneox",
    "bloom",
    "mpt",
    "refact",
    "orion",
    "xverse",
    "codeshell",
    "chatglm",
    "nemotron",
    "hunyuan-dense",
    "hunyuan-moe",
    "dots1",
    "bailingmoe",
    "dbrx",
    "arctic",
)
"""Architectures whose ``load_arch_hparams`` reads nothing that changes the cache (no sliding
window, no MLA, no recurrent or KV-less layers) and that ``create_memory`` gives one plain
``llama_kv_cache``; each was checked in the pinned ``src/models/<arch>.cpp``. ``phi3`` is here because
llama.cpp disables its sliding window (``swa_type = NONE`` even with ``sliding_window`` set). Grok is
not: llama.cpp forces its flash attention off, which a layout cannot say."""


@register(*PLAIN_ARCHITECTURES)
def plain_attention(hp: Hparams) -> CacheLayout:
    """Every layer attends over the whole context with its own K and V (GQA heads per layer)."""
    return CacheLayout(layers=tuple(attention_layers(hp)))


# --------------------------------------------------------------------------------------------------
# sliding windows


def swa_pattern(hp: Hparams, n_pattern: int, *, dense_first: bool = False) -> list[bool]:
    """Which layers slide: ``llama_model_base::load_swa_pattern`` then ``llama_hparams::set_swa_pattern``.

    ``attention.sliding_window_pattern`` is either a per-layer array (bool or int; entries past its
    end stay full attention) or a period replacing the architecture's default ``n_pattern``: with
    ``dense_first`` the first layer of each period is full (``il % n != 0`` slides), otherwise the
    last one is (``il % n < n - 1`` slides); a period of 0 makes every layer slide. NextN layers
    never slide.
    """
    n_layer_all = hp.n_layer
    value = hp.get("attention.sliding_window_pattern")
    if isinstance(value, list):
        if len(value) > 512:  # LLAMA_MAX_LAYERS: llama.cpp refuses the file
            raise UnsupportedModelError(
                f"{hp.arch}.attention.sliding_window_pattern has {len(value)} entries"
            )
        return [bool(value[il]) if il < len(value) else False for il in range(n_layer_all)]
    if value is not None:
        n_pattern = int(value)
    n_layer = main_layer_count(hp)
    pattern = []
    for il in range(n_layer_all):
        if il >= n_layer:
            pattern.append(False)
        elif n_pattern == 0:
            pattern.append(True)
        elif dense_first:
            pattern.append(il % n_pattern != 0)
        else:
            pattern.append(il % n_pattern < n_pattern - 1)
    return pattern


def sliding_window_layout(
    hp: Hparams, n_swa: int, swa: list[bool], swa_type: str = "standard"
) -> CacheLayout:
    """The ``llama_kv_cache_iswa`` layout: sliding layers in the small cache, the rest in the base one.

    ``create_memory`` asserts that a model with a sliding-window type has a sliding layer
    (``GGML_ASSERT(hparams.is_swa_any())``): llama.cpp aborts the process on such a file, so it is
    refused here rather than planned.
    """
    if not any(swa):
        raise UnsupportedModelError(
            f"{hp.arch} model sets a sliding window but its pattern leaves no sliding layer; "
            "llama.cpp aborts on it (GGML_ASSERT is_swa_any in create_memory)"
        )
    return CacheLayout(layers=tuple(attention_layers(hp, swa)), sliding_window=n_swa, swa_type=swa_type)


def _window(hp: Hparams, default: int | None) -> int:
    """``attention.sliding_window``, or the architecture's default; None: the key is required."""
    value = hp.get("attention.sliding_window")
    if value is None:
        if default is None:
            raise UnsupportedModelError(
                f"{hp.arch} model lacks the GGUF key {hp.arch}.attention.sliding_window"
            )
        return default
    return int(value)


@register("gemma2")
def gemma2(hp: Hparams) -> CacheLayout:
    """``src/models/gemma2.cpp``: always sliding; window 4096 unless the key says otherwise; pattern 2
    (even layers slide)."""
    return sliding_window_layout(hp, _window(hp, 4096), swa_pattern(hp, 2))


@register("gpt-oss")
def gpt_oss(hp: Hparams) -> CacheLayout:
    """``src/models/openai-moe.cpp``: the window key is required; pattern 2 (even layers slide)."""
    return sliding_window_layout(hp, _window(hp, None), swa_pattern(hp, 2))


@register("cohere2")
def cohere2(hp: Hparams) -> CacheLayout:
    """``src/models/cohere2.cpp``: the window key is required; pattern 4 (three slide, one global)."""
    return sliding_window_layout(hp, _window(hp, None), swa_pattern(hp, 4))


def _optional_window(n_pattern: int, *, dense_first: bool = False) -> Callable[[Hparams], CacheLayout]:
    """Architectures that slide only when ``attention.sliding_window`` is present and positive
    (gemma3, olmo2, afmoe, mellum: ``found_swa && n_swa > 0``), else keep one plain cache."""

    def rule(hp: Hparams) -> CacheLayout:
        n_swa = int(hp.get("attention.sliding_window", 0))
        if n_swa <= 0:
            return CacheLayout(layers=tuple(attention_layers(hp)))
        return sliding_window_layout(hp, n_swa, swa_pattern(hp, n_pattern, dense_first=dense_first))

    return rule


_GEMMA3 = register("gemma3")(_optional_window(6))  # src/models/gemma3.cpp: five sliding, one global
register("olmo2")(_optional_window(4))  # src/models/olmo2.cpp (OLMo 3's sliding layers)
register("afmoe", "mellum")(_optional_window(4))  # src/models/afmoe.cpp, mellum.cpp


@register("smallthinker")
def smallthinker(hp: Hparams) -> CacheLayout:
    """``src/models/smallthinker.cpp``: a positive window key turns sliding on, but the window is then
    fixed at 4096 whatever the key says; pattern 4 with the *first* layer of each period global."""
    if int(hp.get("attention.sliding_window", 0)) <= 0:
        return CacheLayout(layers=tuple(attention_layers(hp)))
    return sliding_window_layout(hp, 4096, swa_pattern(hp, 4, dense_first=True))


@register("exaone4")
def exaone4(hp: Hparams) -> CacheLayout:
    """``src/models/exaone4.cpp``: only the 64-layer (32B) model slides (window 4096 unless the key
    says otherwise, pattern 4); smaller ones keep one plain cache even with a window key."""
    if main_layer_count(hp) != 64:
        return CacheLayout(layers=tuple(attention_layers(hp)))
    return sliding_window_layout(hp, _window(hp, 4096), swa_pattern(hp, 4))


@register("llama4")
def llama4(hp: Hparams) -> CacheLayout:
    """``src/models/llama4.cpp``: chunked attention unless the window key is present and 0; the chunk
    is fixed at 8192 (the key's value is not used); pattern 4 (three chunked, one global)."""
    value = hp.get("attention.sliding_window")
    if value is not None and int(value) == 0:
        return CacheLayout(layers=tuple(attention_layers(hp)))
    return sliding_window_layout(hp, 8192, swa_pattern(hp, 4), swa_type="chunked")


@register("granite_swa")
def granite_swa(hp: Hparams) -> CacheLayout:
    """``src/models/granite-swa.cpp``: the per-layer pattern array and the window are both required."""
    if not isinstance(hp.get("attention.sliding_window_pattern"), list):
        raise UnsupportedModelError(
            f"{hp.arch} model lacks the array {hp.arch}.attention.sliding_window_pattern"
        )
    return sliding_window_layout(hp, _window(hp, None), swa_pattern(hp, 0))
