"""Tiny hybrid models: attention layers mixed with recurrent ones (see the package docstring).

Each writer lays its layers out the way its llama.cpp loader (``src/models/<arch>.cpp``) expects; a
layer pattern reads ``M`` for a recurrent layer, ``*`` for attention and ``-`` for an MLP-only block:

* ``jamba``: Mamba-1 layers and attention layers, told apart by a per-layer ``head_count_kv`` of 0;
* ``granitehybrid``: Mamba-2 layers and attention layers, the same way;
* ``falcon-h1``: attention *and* Mamba-2 in every layer (both caches in each);
* ``nemotron_h``: Mamba-2, attention and MLP-only blocks (``head_count_kv`` and ``feed_forward_length``
  per layer: a block with neither is Mamba-2, one with only a feed-forward keeps no state at all);
* ``qwen3next``: gated delta net layers and a full attention layer every ``full_attention_interval``;
* ``lfm2``: short convolution layers (state of ``shortconv.l_cache - 1`` columns) and attention layers;
  ``lfm2-swa`` slides a window over its attention layers (llama.cpp then uses an SWA cache).

Attention heads are 32 wide so that a q8_0 cache with flash attention is accepted (its block is 32);
state sizes differ between the families so that a rule applied to the wrong one shows. The
``write_*`` functions take the dimensions (and a vocabulary size) as arguments, for experiments on
other shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import family
from .common import ModelWriter, model_writer

__all__ = [
    "Dims",
    "write_falcon_h1",
    "write_granitehybrid",
    "write_jamba",
    "write_lfm2",
    "write_nemotron_h",
    "write_qwen3next",
]


@dataclass(frozen=True)
class Dims:
    """The transformer part: hidden size, heads and dense feed-forward width."""

    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 256

    @property
    def head(self) -> int:
        return self.n_embd // self.n_head


TINY = Dims()


def _base(
    w: ModelWriter,
    d: Dims,
    *,
    n_layer: int,
    n_ff: int | list[int],
    n_head_kv: int | list[int],
    output_norm: str = "output_norm.weight",
) -> None:
    """The keys and tensors every family shares: sizes, heads, embeddings, the final norm (tied output)."""
    g = w.gguf
    g.add_block_count(n_layer)
    g.add_embedding_length(d.n_embd)
    g.add_feed_forward_length(n_ff)
    g.add_head_count(d.n_head)
    g.add_head_count_kv(n_head_kv)
    g.add_layer_norm_rms_eps(1e-5)
    g.add_rope_freq_base(10000.0)
    w.matrix("token_embd.weight", w.vocab_size, d.n_embd)
    w.f32(output_norm, d.n_embd, value=1.0)


def _ssm_keys(
    w: ModelWriter, *, d_conv: int, d_inner: int, d_state: int, dt_rank: int, n_group: int | None = None
) -> None:
    g = w.gguf
    g.add_ssm_conv_kernel(d_conv)
    g.add_ssm_inner_size(d_inner)
    g.add_ssm_state_size(d_state)
    g.add_ssm_time_step_rank(dt_rank)
    if n_group is not None:
        g.add_ssm_group_count(n_group)


def _attention(w: ModelWriter, d: Dims, il: int, *, gated_q: bool = False, qk_norm: bool = False) -> None:
    """Separate Q, K and V projections (``create_tensor_qkv``) and the output projection."""
    q = d.n_head * d.head
    w.matrix(f"blk.{il}.attn_q.weight", 2 * q if gated_q else q, d.n_embd)
    w.matrix(f"blk.{il}.attn_k.weight", d.n_head_kv * d.head, d.n_embd)
    w.matrix(f"blk.{il}.attn_v.weight", d.n_head_kv * d.head, d.n_embd)
    w.matrix(f"blk.{il}.attn_output.weight", d.n_embd, q)
    if qk_norm:
        w.f32(f"blk.{il}.attn_q_norm.weight", d.head, value=1.0)
        w.f32(f"blk.{il}.attn_k_norm.weight", d.head, value=1.0)


def _ffn(w: ModelWriter, d: Dims, il: int, *, norm: str = "ffn_norm.weight") -> None:
    """A SwiGLU feed-forward (gate, up, down) with its pre-norm."""
    w.f32(f"blk.{il}.{norm}", d.n_embd, value=1.0)
    w.matrix(f"blk.{il}.ffn_gate.weight", d.n_ff, d.n_embd)
    w.matrix(f"blk.{il}.ffn_up.weight", d.n_ff, d.n_embd)
    w.matrix(f"blk.{il}.ffn_down.weight", d.n_embd, d.n_ff)


def _mamba2(
    w: ModelWriter, d: Dims, il: int, *, d_conv: int, d_inner: int, d_state: int, n_head: int, n_group: int
) -> None:
    """A Mamba-2 mixer (``llm_build_mamba_base::build_mamba2_layer``); conv and scan inputs are f32."""
    conv_dim = d_inner + 2 * n_group * d_state
    w.matrix(f"blk.{il}.ssm_in.weight", 2 * d_inner + 2 * n_group * d_state + n_head, d.n_embd)
    w.f32(f"blk.{il}.ssm_conv1d.weight", conv_dim, d_conv, scale=0.2)
    w.f32(f"blk.{il}.ssm_conv1d.bias", conv_dim)
    w.f32(f"blk.{il}.ssm_dt.bias", n_head)
    w.f32(f"blk.{il}.ssm_a", n_head, 1, value=-1.0)
    w.f32(f"blk.{il}.ssm_d", n_head, 1, value=1.0)
    w.f32(f"blk.{il}.ssm_norm.weight", n_group, d_inner // n_group, value=1.0)
    w.matrix(f"blk.{il}.ssm_out.weight", d.n_embd, d_inner)


def _kv_heads(d: Dims, pattern: str) -> list[int]:
    return [d.n_head_kv if kind == "*" else 0 for kind in pattern]


def write_jamba(
    path: Path,
    d: Dims = TINY,
    *,
    pattern: str = "MM*M",
    d_conv: int = 4,
    d_state: int = 16,
    dt_rank: int = 8,
    vocab_size: int = 0,
) -> Path:
    """Mamba-1 layers (d_inner = 2 n_embd, as the loader asserts) and attention layers (no RoPE)."""
    d_inner = 2 * d.n_embd
    with model_writer(path, "jamba", vocab_size=vocab_size) as w:
        _base(w, d, n_layer=len(pattern), n_ff=d.n_ff, n_head_kv=_kv_heads(d, pattern))
        _ssm_keys(w, d_conv=d_conv, d_inner=d_inner, d_state=d_state, dt_rank=dt_rank)
        for il, kind in enumerate(pattern):
            w.f32(f"blk.{il}.attn_norm.weight", d.n_embd, value=1.0)
            if kind == "*":
                _attention(w, d, il)
            else:
                w.matrix(f"blk.{il}.ssm_in.weight", 2 * d_inner, d.n_embd)
                w.f32(f"blk.{il}.ssm_conv1d.weight", d_inner, d_conv, scale=0.2)
                w.f32(f"blk.{il}.ssm_conv1d.bias", d_inner)
                w.matrix(f"blk.{il}.ssm_x.weight", dt_rank + 2 * d_state, d_inner)
                w.f32(f"blk.{il}.ssm_dt_norm.weight", dt_rank, value=1.0)
                w.matrix(f"blk.{il}.ssm_dt.weight", d_inner, dt_rank)
                w.f32(f"blk.{il}.ssm_dt.bias", d_inner)
                w.f32(f"blk.{il}.ssm_b_norm.weight", d_state, value=1.0)
                w.f32(f"blk.{il}.ssm_c_norm.weight", d_state, value=1.0)
                w.f32(f"blk.{il}.ssm_a", d_inner, d_state, value=-1.0)
                w.f32(f"blk.{il}.ssm_d", d_inner, value=1.0)
                w.matrix(f"blk.{il}.ssm_out.weight", d.n_embd, d_inner)
            _ffn(w, d, il)
    return path


def write_granitehybrid(
    path: Path,
    d: Dims = TINY,
    *,
    pattern: str = "M*MM",
    d_conv: int = 4,
    d_state: int = 16,
    n_head: int = 8,
    n_group: int = 1,
    vocab_size: int = 0,
) -> Path:
    """Granite-4.0-H's layout: Mamba-2 (d_inner = 2 n_embd) around attention layers with RoPE, and
    Granite's residual, embedding and logit scales."""
    ssm = {"d_conv": d_conv, "d_inner": 2 * d.n_embd, "d_state": d_state}
    with model_writer(path, "granitehybrid", vocab_size=vocab_size) as w:
        _base(w, d, n_layer=len(pattern), n_ff=d.n_ff, n_head_kv=_kv_heads(d, pattern))
        _ssm_keys(w, **ssm, dt_rank=n_head, n_group=n_group)
        w.gguf.add_float32("granitehybrid.residual_scale", 0.5)
        w.gguf.add_float32("granitehybrid.embedding_scale", 2.0)
        w.gguf.add_float32("granitehybrid.logit_scale", 4.0)
        for il, kind in enumerate(pattern):
            w.f32(f"blk.{il}.attn_norm.weight", d.n_embd, value=1.0)
            if kind == "*":
                _attention(w, d, il)
            else:
                _mamba2(w, d, il, **ssm, n_head=n_head, n_group=n_group)
            _ffn(w, d, il)
    return path


def write_falcon_h1(
    path: Path,
    d: Dims = TINY,
    *,
    n_layer: int = 3,
    d_conv: int = 4,
    d_inner: int = 192,
    d_state: int = 16,
    n_head: int = 6,
    n_group: int = 2,
    vocab_size: int = 0,
) -> Path:
    """Every layer runs attention and a Mamba-2 mixer side by side: a KV cache and a state per layer."""
    ssm = {"d_conv": d_conv, "d_inner": d_inner, "d_state": d_state}
    with model_writer(path, "falcon-h1", vocab_size=vocab_size) as w:
        _base(w, d, n_layer=n_layer, n_ff=d.n_ff, n_head_kv=d.n_head_kv)
        _ssm_keys(w, **ssm, dt_rank=n_head, n_group=n_group)
        w.gguf.add_key_length(d.head)
        w.gguf.add_value_length(d.head)
        for il in range(n_layer):
            w.f32(f"blk.{il}.attn_norm.weight", d.n_embd, value=1.0)
            _attention(w, d, il)
            _mamba2(w, d, il, **ssm, n_head=n_head, n_group=n_group)
            # falcon-h1's loader asks for this norm without the ".weight" suffix
            _ffn(w, d, il, norm="ffn_norm")
    return path


def write_nemotron_h(
    path: Path,
    d: Dims = TINY,
    *,
    pattern: str = "M-*M-",
    d_conv: int = 4,
    d_inner: int = 256,
    d_state: int = 32,
    n_head: int = 8,
    n_group: int = 2,
    vocab_size: int = 0,
) -> Path:
    """Nemotron-H's three kinds of block: Mamba-2 (no heads, no FFN), attention (heads, no FFN) and
    squared-ReLU MLP (FFN, no heads); the MLP blocks keep neither a cache nor a state."""
    ssm = {"d_conv": d_conv, "d_inner": d_inner, "d_state": d_state}
    ff = [d.n_ff if kind == "-" else 0 for kind in pattern]
    with model_writer(path, "nemotron_h", vocab_size=vocab_size) as w:
        _base(w, d, n_layer=len(pattern), n_ff=ff, n_head_kv=_kv_heads(d, pattern))
        _ssm_keys(w, **ssm, dt_rank=n_head, n_group=n_group)
        w.gguf.add_layer_norm_eps(1e-5)
        for il, kind in enumerate(pattern):
            w.f32(f"blk.{il}.attn_norm.weight", d.n_embd, value=1.0)
            if kind == "*":
                _attention(w, d, il)
            elif kind == "-":
                w.matrix(f"blk.{il}.ffn_up.weight", d.n_ff, d.n_embd)
                w.matrix(f"blk.{il}.ffn_down.weight", d.n_embd, d.n_ff)
            else:
                _mamba2(w, d, il, **ssm, n_head=n_head, n_group=n_group)
    return path


def write_qwen3next(
    path: Path,
    d: Dims = TINY,
    *,
    n_layer: int = 4,
    interval: int = 4,
    d_conv: int = 4,
    head_k: int = 32,
    n_k_heads: int = 2,
    n_v_heads: int = 4,
    n_expert: int = 4,
    n_expert_used: int = 2,
    n_ff_exp: int = 64,
    vocab_size: int = 0,
) -> Path:
    """Gated delta net layers with a gated full-attention layer every ``interval`` layers, and
    mixture-of-experts feed-forwards with a gated shared expert (the loader refuses zero experts).
    The delta net's value heads are as wide as its key heads (``ssm.state_size``)."""
    d_inner = head_k * n_v_heads
    key_dim, value_dim = head_k * n_k_heads, d_inner
    with model_writer(path, "qwen3next", vocab_size=vocab_size) as w:
        _base(w, d, n_layer=n_layer, n_ff=d.n_ff, n_head_kv=d.n_head_kv)
        _ssm_keys(w, d_conv=d_conv, d_inner=d_inner, d_state=head_k, dt_rank=n_v_heads, n_group=n_k_heads)
        g = w.gguf
        g.add_key_length(d.head)
        g.add_value_length(d.head)
        g.add_full_attention_interval(interval)
        g.add_expert_count(n_expert)
        g.add_expert_used_count(n_expert_used)
        g.add_expert_feed_forward_length(n_ff_exp)
        g.add_expert_shared_feed_forward_length(n_ff_exp)
        for il in range(n_layer):
            w.f32(f"blk.{il}.attn_norm.weight", d.n_embd, value=1.0)
            w.f32(f"blk.{il}.post_attention_norm.weight", d.n_embd, value=1.0)
            if (il + 1) % interval == 0:
                _attention(w, d, il, gated_q=True, qk_norm=True)
            else:
                w.matrix(f"blk.{il}.attn_qkv.weight", 2 * key_dim + value_dim, d.n_embd)
                w.matrix(f"blk.{il}.attn_gate.weight", value_dim, d.n_embd)
                w.f32(f"blk.{il}.ssm_conv1d.weight", 2 * key_dim + value_dim, d_conv, scale=0.2)
                w.f32(f"blk.{il}.ssm_dt.bias", n_v_heads)
                w.f32(f"blk.{il}.ssm_a", n_v_heads, value=-1.0)
                w.matrix(f"blk.{il}.ssm_ba.weight", 2 * n_v_heads, d.n_embd)
                w.f32(f"blk.{il}.ssm_norm.weight", head_k, value=1.0)
                w.matrix(f"blk.{il}.ssm_out.weight", d.n_embd, value_dim)
            w.matrix(f"blk.{il}.ffn_gate_inp.weight", n_expert, d.n_embd)
            w.matrix(f"blk.{il}.ffn_gate_exps.weight", n_expert, n_ff_exp, d.n_embd)
            w.matrix(f"blk.{il}.ffn_up_exps.weight", n_expert, n_ff_exp, d.n_embd)
            w.matrix(f"blk.{il}.ffn_down_exps.weight", n_expert, d.n_embd, n_ff_exp)
            w.f32(f"blk.{il}.ffn_gate_inp_shexp.weight", d.n_embd)
            w.matrix(f"blk.{il}.ffn_gate_shexp.weight", n_ff_exp, d.n_embd)
            w.matrix(f"blk.{il}.ffn_up_shexp.weight", n_ff_exp, d.n_embd)
            w.matrix(f"blk.{il}.ffn_down_shexp.weight", d.n_embd, n_ff_exp)
    return path


def write_lfm2(
    path: Path,
    d: Dims = TINY,
    *,
    pattern: str = "MM*M",
    l_cache: int = 3,
    sliding_window: int = 0,
    vocab_size: int = 0,
) -> Path:
    """Short-convolution layers (a state of ``l_cache - 1`` columns of n_embd) and attention layers with
    Q/K norms; the final norm is stored as ``token_embd_norm``."""
    with model_writer(path, "lfm2", vocab_size=vocab_size) as w:
        _base(
            w,
            d,
            n_layer=len(pattern),
            n_ff=d.n_ff,
            n_head_kv=_kv_heads(d, pattern),
            output_norm="token_embd_norm.weight",
        )
        w.gguf.add_shortconv_l_cache(l_cache)
        if sliding_window:
            w.gguf.add_sliding_window(sliding_window)
        for il, kind in enumerate(pattern):
            w.f32(f"blk.{il}.attn_norm.weight", d.n_embd, value=1.0)
            if kind == "*":
                _attention(w, d, il, qk_norm=True)
            else:
                w.f32(f"blk.{il}.shortconv.conv.weight", d.n_embd, l_cache, scale=0.2)
                w.matrix(f"blk.{il}.shortconv.in_proj.weight", 3 * d.n_embd, d.n_embd)
                w.matrix(f"blk.{il}.shortconv.out_proj.weight", d.n_embd, d.n_embd)
            _ffn(w, d, il)
    return path


@family("jamba", "jamba", "hybrid", "recurrent", "gqa", "tied", "per_layer_kv")
def jamba(path: Path) -> Path:
    return write_jamba(path)


@family("granitehybrid", "granitehybrid", "hybrid", "recurrent", "gqa", "tied", "per_layer_kv")
def granitehybrid(path: Path) -> Path:
    return write_granitehybrid(path)


@family("falcon-h1", "falcon-h1", "hybrid", "recurrent", "gqa", "tied")
def falcon_h1(path: Path) -> Path:
    return write_falcon_h1(path)


@family("nemotron_h", "nemotron_h", "hybrid", "recurrent", "gqa", "tied", "per_layer_kv")
def nemotron_h(path: Path) -> Path:
    return write_nemotron_h(path)


@family("qwen3next", "qwen3next", "hybrid", "recurrent", "gqa", "tied", "moe")
def qwen3next(path: Path) -> Path:
    return write_qwen3next(path)


@family("lfm2", "lfm2", "hybrid", "recurrent", "gqa", "tied", "per_layer_kv")
def lfm2(path: Path) -> Path:
    return write_lfm2(path)


@family("lfm2-swa", "lfm2", "hybrid", "recurrent", "gqa", "tied", "per_layer_kv", "swa")
def lfm2_swa(path: Path) -> Path:
    """LFM2 with a 128-token window: llama.cpp gives its attention layers an SWA cache."""
    return write_lfm2(path, pattern="M*M*", sliding_window=128)
