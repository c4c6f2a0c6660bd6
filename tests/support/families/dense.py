"""Tiny dense, sliding-window and mixture-of-experts models (see the package docstring).

Every writer produces the tensors the pinned llama.cpp's ``load_arch_tensors`` for that architecture
creates (``src/models/<arch>.cpp``), with the smallest shapes that still exercise the memory rule the
case is about: grouped-query attention, tied embeddings, per-layer KV head counts (with zeros: deci's
attention-free and "linear attention" layers), a key length that differs from ``n_embd / n_head``,
sliding-window patterns in both their scalar and per-layer array forms, and head sizes that a
quantized K cache with flash attention cannot use (80 and 48 are not multiples of a 32-element block).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import family
from .common import ModelWriter, model_writer

__all__: list[str] = []


@dataclass(frozen=True)
class Shape:
    """The attention and feed-forward shape of one layer stack."""

    n_layer: int
    n_embd: int
    n_head: int | list[int]
    n_head_kv: int | list[int]
    n_ff: int
    head_k: int = 0
    """``attention.key_length`` (and value_length) when not ``n_embd / n_head``; 0 leaves it out."""

    def heads(self, il: int) -> int:
        return self.n_head[il] if isinstance(self.n_head, list) else self.n_head

    def kv_heads(self, il: int) -> int:
        return self.n_head_kv[il] if isinstance(self.n_head_kv, list) else self.n_head_kv

    @property
    def head_size(self) -> int:
        return self.head_k or self.n_embd // self.heads(0)


def _keys(w: ModelWriter, shape: Shape, *, rms_eps: bool = True) -> None:
    g = w.gguf
    g.add_block_count(shape.n_layer)
    g.add_embedding_length(shape.n_embd)
    g.add_feed_forward_length(shape.n_ff)
    g.add_head_count(shape.n_head)
    g.add_head_count_kv(shape.n_head_kv)
    g.add_rope_freq_base(10000.0)
    if shape.head_k:
        g.add_key_length(shape.head_k)
        g.add_value_length(shape.head_k)
        g.add_rope_dimension_count(shape.head_k)
    if rms_eps:
        g.add_layer_norm_rms_eps(1e-6)
    else:
        g.add_layer_norm_eps(1e-5)


def _embeddings(w: ModelWriter, shape: Shape, *, tied: bool = False) -> None:
    w.matrix("token_embd.weight", w.vocab_size, shape.n_embd)
    w.f32("output_norm.weight", shape.n_embd, value=1.0)
    if not tied:
        w.matrix("output.weight", w.vocab_size, shape.n_embd)


def _attention(w: ModelWriter, shape: Shape, il: int, *, bias: bool = False, qk_norm: bool = False) -> None:
    """Q, K, V and output projections of layer ``il`` (``create_tensor_qkv``), GQA per layer."""
    n_embd, hd = shape.n_embd, shape.head_size
    n_q, n_kv = hd * shape.heads(il), hd * shape.kv_heads(il)
    w.f32(f"blk.{il}.attn_norm.weight", n_embd, value=1.0)
    w.matrix(f"blk.{il}.attn_q.weight", n_q, n_embd)
    w.matrix(f"blk.{il}.attn_k.weight", n_kv, n_embd)
    w.matrix(f"blk.{il}.attn_v.weight", n_kv, n_embd)
    w.matrix(f"blk.{il}.attn_output.weight", n_embd, n_q)
    if bias:
        w.f32(f"blk.{il}.attn_q.bias", n_q)
        w.f32(f"blk.{il}.attn_k.bias", n_kv)
        w.f32(f"blk.{il}.attn_v.bias", n_kv)
    if qk_norm:
        w.f32(f"blk.{il}.attn_q_norm.weight", hd, value=1.0)
        w.f32(f"blk.{il}.attn_k_norm.weight", hd, value=1.0)


def _ffn(w: ModelWriter, shape: Shape, il: int, *, norm: bool = True) -> None:
    n_embd, n_ff = shape.n_embd, shape.n_ff
    if norm:
        w.f32(f"blk.{il}.ffn_norm.weight", n_embd, value=1.0)
    w.matrix(f"blk.{il}.ffn_gate.weight", n_ff, n_embd)
    w.matrix(f"blk.{il}.ffn_up.weight", n_ff, n_embd)
    w.matrix(f"blk.{il}.ffn_down.weight", n_embd, n_ff)


def _experts(
    w: ModelWriter, shape: Shape, il: int, n_expert: int, n_ff_exp: int, *, bias: bool = False
) -> None:
    """A routed mixture-of-experts feed-forward (numpy shapes: experts outermost)."""
    n_embd = shape.n_embd
    if not bias:  # gpt-oss (the biased kind) normalises with post_attention_norm instead
        w.f32(f"blk.{il}.ffn_norm.weight", n_embd, value=1.0)
    w.matrix(f"blk.{il}.ffn_gate_inp.weight", n_expert, n_embd)
    w.matrix(f"blk.{il}.ffn_gate_exps.weight", n_expert, n_ff_exp, n_embd)
    w.matrix(f"blk.{il}.ffn_up_exps.weight", n_expert, n_ff_exp, n_embd)
    w.matrix(f"blk.{il}.ffn_down_exps.weight", n_expert, n_embd, n_ff_exp)
    if bias:
        w.f32(f"blk.{il}.ffn_gate_inp.bias", n_expert)
        w.f32(f"blk.{il}.ffn_gate_exps.bias", n_expert, n_ff_exp)
        w.f32(f"blk.{il}.ffn_up_exps.bias", n_expert, n_ff_exp)
        w.f32(f"blk.{il}.ffn_down_exps.bias", n_expert, n_embd)


def _llama(
    path: Path,
    shape: Shape,
    *,
    tied: bool = False,
    arch: str = "llama",
    n_expert: int = 0,
    n_expert_used: int = 0,
) -> Path:
    """llama (and mixtral: llama with ``expert_count``): ``src/models/llama.cpp``."""
    with model_writer(path, arch) as w:
        _keys(w, shape)
        if n_expert:
            w.gguf.add_expert_count(n_expert)
            w.gguf.add_expert_used_count(n_expert_used)
        _embeddings(w, shape, tied=tied)
        for il in range(shape.n_layer):
            _attention(w, shape, il)
            if n_expert:
                _experts(w, shape, il, n_expert, shape.n_ff)
            else:
                _ffn(w, shape, il)
    return path


@family("llama", "llama", "dense", "gqa")
def llama(path: Path) -> Path:
    """GQA 8:2, head size 32."""
    return _llama(path, Shape(n_layer=4, n_embd=256, n_head=8, n_head_kv=2, n_ff=512))


@family("llama-tied", "llama", "dense", "gqa", "tied")
def llama_tied(path: Path) -> Path:
    """No ``output.weight``: llama.cpp duplicates the token embedding as the output head."""
    return _llama(path, Shape(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256), tied=True)


def _deci(path: Path, shape: Shape) -> Path:
    """deci (Nemotron-51B): per-layer ``head_count`` and ``head_count_kv`` (``src/models/deci.cpp`` sizes
    every layer's tensors from ``n_embd_k_gqa(il)``; llama's loader uses layer 0's for all layers and
    rejects such a file). A layer with heads but no KV heads is "linear attention" (``attn_output``
    only), one without heads is attention-free."""
    with model_writer(path, "deci") as w:
        _keys(w, shape)
        _embeddings(w, shape)
        for il in range(shape.n_layer):
            if shape.kv_heads(il) > 0:
                _attention(w, shape, il)
            elif shape.heads(il) > 0:
                w.f32(f"blk.{il}.attn_norm.weight", shape.n_embd, value=1.0)
                w.matrix(f"blk.{il}.attn_output.weight", shape.n_embd, shape.n_embd)
            _ffn(w, shape, il)
    return path


@family("deci-per-layer-kv", "deci", "dense", "gqa", "per_layer_kv")
def deci_per_layer_kv(path: Path) -> Path:
    """KV heads 2, 4, 1, 2: V rows of different widths, padded to the widest without flash attention."""
    return _deci(path, Shape(n_layer=4, n_embd=128, n_head=4, n_head_kv=[2, 4, 1, 2], n_ff=256))


@family("deci-zero-kv", "deci", "dense", "gqa", "per_layer_kv")
def deci_zero_kv(path: Path) -> Path:
    """KV heads 4, 0, 0, 1 (layer 1 linear attention, layer 2 attention-free): llama.cpp still gives
    the zero-KV layers a cache entry, of zero-width K rows and, without flash attention, V rows
    padded to the widest layer's."""
    return _deci(path, Shape(n_layer=4, n_embd=128, n_head=[4, 4, 0, 4], n_head_kv=[4, 0, 0, 1], n_ff=256))


@family("mixtral", "llama", "moe", "gqa")
def mixtral(path: Path) -> Path:
    """llama with routed experts (``expert_count`` > 0: ``ffn_*_exps`` instead of the dense FFN)."""
    return _llama(
        path, Shape(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=128), n_expert=4, n_expert_used=2
    )


@family("llama-hd80", "llama", "dense", "gqa")
def llama_hd80(path: Path) -> Path:
    """Head size 80: a q8_0/q4_0 K cache with flash attention is refused (80 % 32 != 0)."""
    return _llama(path, Shape(n_layer=2, n_embd=160, n_head=2, n_head_kv=2, n_ff=320))


@family("llama-hd48", "llama", "dense", "gqa")
def llama_hd48(path: Path) -> Path:
    """Head size 48: refused like ``llama-hd80``; the K row (2 x 48 = 96) is still whole blocks."""
    return _llama(path, Shape(n_layer=2, n_embd=192, n_head=4, n_head_kv=2, n_ff=384))


@family("qwen2", "qwen2", "dense", "gqa")
def qwen2(path: Path) -> Path:
    """Q, K and V biases (``src/models/qwen2.cpp``)."""
    shape = Shape(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256)
    with model_writer(path, "qwen2") as w:
        _keys(w, shape)
        _embeddings(w, shape)
        for il in range(shape.n_layer):
            _attention(w, shape, il, bias=True)
            _ffn(w, shape, il)
    return path


@family("qwen3", "qwen3", "dense", "gqa")
def qwen3(path: Path) -> Path:
    """Q/K norms and a key length (64) that is not ``n_embd / n_head`` (32), as Qwen3 ships."""
    shape = Shape(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, head_k=64)
    with model_writer(path, "qwen3") as w:
        _keys(w, shape)
        _embeddings(w, shape)
        for il in range(shape.n_layer):
            _attention(w, shape, il, qk_norm=True)
            _ffn(w, shape, il)
    return path


@family("qwen3moe", "qwen3moe", "moe", "gqa")
def qwen3moe(path: Path) -> Path:
    """Routed experts (8, 2 used) with their own ``expert_feed_forward_length``."""
    shape = Shape(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256)
    with model_writer(path, "qwen3moe") as w:
        _keys(w, shape)
        w.gguf.add_expert_count(8)
        w.gguf.add_expert_used_count(2)
        w.gguf.add_expert_feed_forward_length(64)
        _embeddings(w, shape)
        for il in range(shape.n_layer):
            _attention(w, shape, il, qk_norm=True)
            _experts(w, shape, il, 8, 64)
    return path


def _gemma(
    path: Path,
    arch: str,
    shape: Shape,
    *,
    window: int | None,
    pattern: int | list[bool] | None,
    qk_norm: bool,
) -> Path:
    """gemma2 / gemma3: post-attention and post-FFN norms, tied output (``src/models/gemma*.cpp``)."""
    with model_writer(path, arch) as w:
        _keys(w, shape)
        if window is not None:
            w.gguf.add_sliding_window(window)
        if pattern is not None:
            w.gguf.add_sliding_window_pattern(pattern)
        if arch == "gemma2":
            w.gguf.add_attn_logit_softcapping(50.0)
            w.gguf.add_final_logit_softcapping(30.0)
        _embeddings(w, shape, tied=True)
        for il in range(shape.n_layer):
            _attention(w, shape, il, qk_norm=qk_norm)
            w.f32(f"blk.{il}.post_attention_norm.weight", shape.n_embd, value=1.0)
            _ffn(w, shape, il)
            w.f32(f"blk.{il}.post_ffw_norm.weight", shape.n_embd, value=1.0)
    return path


@family("gemma2", "gemma2", "dense", "gqa", "swa")
def gemma2(path: Path) -> Path:
    """Every other layer slides a 128-token window (the default pattern, 2: layers 0 and 2)."""
    shape = Shape(n_layer=4, n_embd=128, n_head=4, n_head_kv=2, n_ff=256)
    return _gemma(path, "gemma2", shape, window=128, pattern=None, qk_norm=False)


@family("gemma2-default-window", "gemma2", "dense", "gqa", "swa")
def gemma2_default_window(path: Path) -> Path:
    """No ``sliding_window`` key: llama.cpp's gemma2 default window is 4096."""
    shape = Shape(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256)
    return _gemma(path, "gemma2", shape, window=None, pattern=None, qk_norm=False)


@family("gemma3", "gemma3", "dense", "gqa", "swa")
def gemma3(path: Path) -> Path:
    """Five sliding layers then a global one (the default pattern, 6), a 256-token window."""
    shape = Shape(n_layer=6, n_embd=128, n_head=4, n_head_kv=1, n_ff=256)
    return _gemma(path, "gemma3", shape, window=256, pattern=None, qk_norm=True)


@family("gemma3-no-window", "gemma3", "dense", "gqa")
def gemma3_no_window(path: Path) -> Path:
    """gemma3 without a ``sliding_window`` key (as converted when the pattern is 1): one plain cache."""
    shape = Shape(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256)
    return _gemma(path, "gemma3", shape, window=None, pattern=None, qk_norm=True)


@family("cohere2", "cohere2", "dense", "gqa", "swa")
def cohere2(path: Path) -> Path:
    """Command-R7B: a per-layer pattern array (the form the converter writes from ``layer_types``),
    window 64, layer norm without bias, parallel attention and FFN, tied output."""
    shape = Shape(n_layer=4, n_embd=128, n_head=4, n_head_kv=2, n_ff=256)
    with model_writer(path, "cohere2") as w:
        _keys(w, shape, rms_eps=False)
        w.gguf.add_sliding_window(64)
        w.gguf.add_sliding_window_pattern([True, True, True, False])
        w.gguf.add_logit_scale(0.25)
        _embeddings(w, shape, tied=True)
        for il in range(shape.n_layer):
            _attention(w, shape, il)
            _ffn(w, shape, il, norm=False)
    return path


@family("gpt-oss", "gpt-oss", "moe", "gqa", "swa")
def gpt_oss(path: Path) -> Path:
    """gpt-oss: alternating 128-token sliding and full layers (pattern 2), attention sinks, biased
    experts, head size 64 over an ``n_embd`` of 128 (the real model's 64 over 2880)."""
    shape = Shape(n_layer=4, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, head_k=64)
    with model_writer(path, "gpt-oss") as w:
        _keys(w, shape)
        w.gguf.add_sliding_window(128)
        w.gguf.add_expert_count(4)
        w.gguf.add_expert_used_count(2)
        w.gguf.add_expert_feed_forward_length(64)
        _embeddings(w, shape)
        n_q, n_kv = 64 * 4, 64 * 2
        for il in range(shape.n_layer):
            w.f32(f"blk.{il}.attn_norm.weight", shape.n_embd, value=1.0)
            w.f32(f"blk.{il}.post_attention_norm.weight", shape.n_embd, value=1.0)
            w.matrix(f"blk.{il}.attn_q.weight", n_q, shape.n_embd)
            w.matrix(f"blk.{il}.attn_k.weight", n_kv, shape.n_embd)
            w.matrix(f"blk.{il}.attn_v.weight", n_kv, shape.n_embd)
            w.f32(f"blk.{il}.attn_q.bias", n_q)
            w.f32(f"blk.{il}.attn_k.bias", n_kv)
            w.f32(f"blk.{il}.attn_v.bias", n_kv)
            w.matrix(f"blk.{il}.attn_output.weight", shape.n_embd, n_q)
            w.f32(f"blk.{il}.attn_output.bias", shape.n_embd)
            w.f32(f"blk.{il}.attn_sinks.weight", 4)
            _experts(w, shape, il, 4, 64, bias=True)
    return path
