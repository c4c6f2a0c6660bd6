"""Hybrid architectures: attention layers mixed with recurrent ones (see the package docstring).

llama.cpp gives a hybrid model a ``llama_memory_hybrid`` (``src/llama-memory-hybrid.cpp``): a KV cache
over the layers ``filter_attn`` keeps and a ``llama_memory_recurrent`` over the layers ``filter_recr``
keeps (``llama_model::create_memory``, the hybrid branch). The filters are ``!is_recr(il)`` and
``is_recr(il)`` unless the architecture sets its own; ``is_recr`` itself is decided per architecture in
``load_arch_hparams`` (``src/models/<arch>.cpp``). The recurrent state of a layer is ``n_embd_r()`` conv
elements plus ``n_embd_s()`` SSM elements (``src/llama-hparams.cpp``); both are model-wide, the same
for every recurrent layer, and f32. With a sliding window (LFM2 variants) the attention part is a
``llama_kv_cache_iswa`` instead (``llama_memory_hybrid_iswa``), which the layout expresses by marking
those layers ``swa``.

The compute buffer of these graphs is not llama-shaped: a recurrent layer's working set (the scan's
output with the final states appended, the conv input with the carried columns) replaces attention's,
so each architecture here registers :func:`hybrid_compute`, derived from the graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UnsupportedModelError
from . import CacheLayout, ComputeQuery, Hparams, LayerMemory, register
from .dense import attention_layers, main_layer_count
from .recurrent import mamba_state

__all__ = [
    "RecurrentRows",
    "falcon_h1",
    "granite_hybrid",
    "hybrid_compute",
    "jamba",
    "lfm2",
    "nemotron_h",
    "qwen3next",
    "recurrent_rows",
]


@dataclass(frozen=True)
class RecurrentRows:
    """``n_embd_r()`` and ``n_embd_s()``: f32 elements of a recurrent layer's two state rows."""

    r: int
    s: int


def _mamba_rows(hp: Hparams, *, groups: bool) -> RecurrentRows:
    """``llama_hparams::n_embd_r/n_embd_s`` for Mamba-style state (Mamba-1, Mamba-2, gated delta net),
    as the pure recurrent models have it (:func:`.recurrent.mamba_state`).

    The conv state keeps the last ``d_conv - 1`` inputs of every conv channel: ``d_inner`` of them, plus
    ``2 n_group d_state`` for B and C where the architecture reads ``ssm.group_count`` (Mamba-2, delta
    net; Jamba's Mamba-1 loader never reads it, so its n_group stays 0). The SSM state is ``d_state``
    by ``d_inner``. The keys are required: llama.cpp refuses to load a model without them.
    """
    r, s = mamba_state(hp, groups=groups)
    return RecurrentRows(r=r, s=s)


def _shortconv_rows(hp: Hparams) -> RecurrentRows:
    """LFM2's short convolution: ``n_embd (l_cache - 1)`` conv elements and no SSM state (its loader
    reads no ``ssm.*`` key, so ``d_state d_inner`` is 0)."""
    l_cache = int(hp.require("shortconv.l_cache"))
    return RecurrentRows(r=hp.n_embd * max(l_cache - 1, 0), s=0)


_ROWS: dict[str, Callable[[Hparams], RecurrentRows]] = {
    "jamba": lambda hp: _mamba_rows(hp, groups=False),
    "granitehybrid": lambda hp: _mamba_rows(hp, groups=True),
    "falcon-h1": lambda hp: _mamba_rows(hp, groups=True),
    "nemotron_h": lambda hp: _mamba_rows(hp, groups=True),
    "qwen3next": lambda hp: _mamba_rows(hp, groups=True),
    "lfm2": _shortconv_rows,
}


def recurrent_rows(hp: Hparams) -> RecurrentRows:
    """The per-sequence state rows of one recurrent layer of ``hp.arch``."""
    rows = _ROWS.get(hp.arch)
    if rows is None:
        raise UnsupportedModelError(f"no recurrent state rule for {hp.arch!r}")
    return rows(hp)


def _trunk_layers(hp: Hparams) -> int:
    """``llama_hparams::n_layer()``: blocks minus the appended NextN/MTP blocks, which the main context
    never runs and which neither of its caches keeps."""
    n_layer = main_layer_count(hp)
    if n_layer <= 0:
        raise UnsupportedModelError(f"{hp.arch} model has no trunk layers (an MTP head only)")
    return n_layer


def _hybrid_layout(
    hp: Hparams,
    *,
    attn: Callable[[int], bool],
    recr: Callable[[int], bool],
    swa: list[bool] | None = None,
    sliding_window: int = 0,
) -> CacheLayout:
    """Combine the KV rows of the layers ``attn`` keeps with the state rows of those ``recr`` keeps.

    ``attn`` and ``recr`` are ``create_memory``'s ``filter_attn`` and ``filter_recr``. The KV cache
    applies ``attn`` to every block (``llama_kv_cache`` loops over ``n_layer_all``; a kept layer with no
    KV heads still gets zero-width K rows and, without flash attention, padded V rows), the recurrent
    memory applies ``recr`` to the trunk only (``llama_memory_recurrent`` loops over ``n_layer()``). A
    layer outside the KV cache keeps its V width (``kv=False``): without flash attention llama.cpp pads
    V rows to ``n_embd_v_gqa_max()``, the widest over *all* layers. Every trunk layer keeps its head
    sizes: ``llama_init_from_model`` checks a quantized K/V type's block against ``n_embd_head_k(il)``
    of every trunk layer, cached or not.
    """
    n_trunk = _trunk_layers(hp)
    rows = recurrent_rows(hp)
    layers = []
    for il, layer in enumerate(attention_layers(hp, swa, filter_nextn=False)):
        trunk = il < n_trunk
        keeps_kv = attn(il)
        keeps_state = trunk and recr(il)
        layers.append(
            LayerMemory(
                k_elements=layer.k_elements if keeps_kv else 0,
                v_elements=layer.v_elements,
                head_k=layer.head_k if trunk else 0,
                head_v=layer.head_v if trunk else 0,
                swa=layer.swa and keeps_kv,
                r_elements=rows.r if keeps_state else 0,
                s_elements=rows.s if keeps_state else 0,
                kv=keeps_kv,
            )
        )
    has_swa = any(layer.swa for layer in layers)
    return CacheLayout(
        layers=tuple(layers),
        sliding_window=sliding_window if has_swa else 0,
        swa_type="standard" if has_swa else "none",
    )


def _kv_heads(hp: Hparams) -> list[int]:
    n_head = hp.per_layer("attention.head_count", hp.n_layer)
    return hp.per_layer("attention.head_count_kv", hp.n_layer, n_head)


def _recurrent_where_no_kv_heads(hp: Hparams) -> list[bool]:
    """``is_recr`` of Jamba, Granite-4.0-H and LFM2: a trunk layer with ``head_count_kv`` 0 (the loops in
    their ``load_arch_hparams`` stop at ``n_layer()``, so MTP blocks stay non-recurrent)."""
    n_trunk = _trunk_layers(hp)
    return [il < n_trunk and n == 0 for il, n in enumerate(_kv_heads(hp))]


# --- compute ------------------------------------------------------------------------------------
#
# llama.cpp sizes the compute buffer by reserving the worst-case graph (``llama_context::sched_reserve``:
# a micro-batch of n_ubatch tokens split over n_seq_max sequences, every token an output) and letting
# ggml's graph allocator (``ggml/src/ggml-alloc.c``) place every intermediate tensor: a tensor is freed
# after its last consumer, elementwise ops run in place, and the buffer is the high-water mark. The
# rules below add up, per phase of the graph, the tensors that are alive together at its worst point
# (read from ``src/models/<arch>.cpp`` and ``mamba-base.cpp``), plus the graph inputs that stay
# allocated throughout. Counts are f32 elements unless said otherwise.


@dataclass(frozen=True)
class _Graph:
    """The widths the graphs' tensors are made of (``hparams`` as the per-arch loaders set them)."""

    n_embd: int
    n_head: int
    q_width: int
    """Columns of the Q projection (twice the heads' width where Q carries a gate, as in Qwen3-Next)."""
    attn_out: int
    """Columns of the attention output (n_head * head_v)."""
    k: int
    v: int
    n_ff: int
    """Widest dense feed-forward (0 where there is none)."""
    ffn: str
    """``swiglu``, ``relu2`` (up and down only) or ``moe``."""
    n_ff_exp: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_shexp: int = 0
    ffn_gateless: bool = False


def _graph(hp: Hparams, layout: CacheLayout) -> _Graph:
    n_layer = hp.n_layer
    n_embd = hp.n_embd
    n_head = hp.per_layer("attention.head_count", n_layer)[0]
    kv_layers = [layer for layer in layout.layers if layer.has_kv]
    head_k = max((layer.head_k for layer in layout.layers), default=0)
    head_v = max((layer.head_v for layer in layout.layers), default=0)
    n_ff = max(hp.per_layer("feed_forward_length", n_layer), default=0)
    n_expert = int(hp.get("expert_count", 0))
    ffn = "moe" if n_expert > 0 else ("relu2" if hp.arch == "nemotron_h" else "swiglu")
    n_used = hp.int("expert_used_count", 0)
    if hp.arch in ("jamba", "granitehybrid"):
        # their experts are feed_forward_length wide ({n_embd, n_ff, n_expert} in the loaders)
        n_ff_exp = n_ff
    else:
        # qwen3next, nemotron_h: expert_feed_forward_length, else n_ff / n_expert_used
        n_ff_exp = int(hp.get("expert_feed_forward_length", 0)) or (n_ff // n_used if n_used else 0)
    n_ff_shexp = int(hp.get("expert_shared_feed_forward_length", 0))
    if hp.arch == "qwen3next" and n_ff_shexp == 0:
        n_ff_shexp = n_ff
    return _Graph(
        n_embd=n_embd,
        n_head=n_head,
        q_width=head_k * n_head * (2 if hp.arch == "qwen3next" else 1),
        attn_out=head_v * n_head,
        k=max((layer.k_elements for layer in kv_layers), default=0),
        v=max((layer.v_elements for layer in kv_layers), default=0),
        n_ff=n_ff,
        ffn=ffn,
        n_ff_exp=n_ff_exp,
        n_expert=n_expert,
        n_expert_used=n_used,
        n_ff_shexp=n_ff_shexp,
        ffn_gateless=hp.arch == "nemotron_h",
    )


def _inputs(g: _Graph, layout: CacheLayout, q: ComputeQuery, n_tokens: int) -> int:
    """Graph inputs alive for the whole graph (``llm_graph_input_*``), in f32 elements.

    ``inp_embd`` (n_embd per token) is allocated even when tokens come as ids. Each KV cache has a
    mask of n_kv per token (f16 with flash attention) and K/V row indices (int64); without flash
    attention V is stored transposed and its indices are per element (``build_input_v_idxs``). With a
    sliding window there are two caches (``llama_kv_cache_iswa``); a cache no layer attends through
    (LFM2's full cache when every attention layer slides) adds no input to the graph.
    """
    kv_layers = [layer for layer in layout.layers if layer.has_kv]
    caches = [q.n_kv_swa] if any(layer.swa for layer in kv_layers) else []
    if any(not layer.swa for layer in kv_layers):
        # the full cache's inputs exist only where some layer attends through it
        caches.append(q.n_kv)
    total = g.n_embd * n_tokens
    for n_kv in caches:
        mask = n_kv * n_tokens
        total += mask // 2 if q.flash_attention else mask
        total += 2 * n_tokens * (1 if q.flash_attention else max(g.v, 1)) + 2 * n_tokens
    return total


def _attention_phase(g: _Graph, q: ComputeQuery, n_tokens: int, n_kv: int) -> int:
    """An attention layer: the residual and the norm, Q, K and V, then KQ (n_kv per head and token)
    without flash attention (its product with V fits in the holes K and V leave), or the fused
    attention's output and the output projection with it."""
    layer = 2 * g.n_embd + g.q_width + g.k + g.v
    if q.flash_attention:
        return n_tokens * (layer + 2 * g.attn_out)
    return n_tokens * (layer + n_kv * g.n_head)


def _ffn_phase(g: _Graph, n_tokens: int) -> int:
    """The feed-forward over the residual and the norm: gate, up and their product (SwiGLU, which is not
    in place), or up alone (squared ReLU, in place). A mixture of experts (``build_moe_ffn``) holds the
    same three per used expert and token (``MUL_MAT_ID``), with the router's probabilities, over one
    more hole of n_embd (the previous experts' output); its shared expert runs after, next to the
    routed output."""
    if g.ffn == "swiglu":
        return n_tokens * (2 * g.n_embd + 3 * g.n_ff)
    if g.ffn == "relu2":
        return n_tokens * (3 * g.n_embd + g.n_ff)
    # Nemotron-H's experts have no gate: up and its squared ReLU
    per_expert = (2 if g.ffn_gateless else 3) * g.n_ff_exp
    routed = 3 * g.n_embd + per_expert * g.n_expert_used + 2 * g.n_expert
    shared = 3 * g.n_embd + (2 if g.ffn_gateless else 3) * g.n_ff_shexp
    return n_tokens * max(routed, shared)


def _ssm_sizes(hp: Hparams) -> tuple[int, int, int]:
    """``ssm.conv_kernel``, ``ssm.inner_size`` and ``ssm.state_size`` (required by every loader here)."""
    return (
        int(hp.require("ssm.conv_kernel")),
        int(hp.require("ssm.inner_size")),
        int(hp.require("ssm.state_size")),
    )


def _mamba1_phase(hp: Hparams, g: _Graph, n_tokens: int, n_seqs: int) -> int:
    """``build_mamba_layer``: the in-projection (x and z, 2 d_inner), the conv input (d_inner per token
    plus the carried d_conv - 1 columns per sequence, later reused by dt), the conv output (d_inner)
    and the scan's output (d_inner per token, then the final d_state x d_inner state of every
    sequence), over the residual and the layer norm's hole."""
    d_conv, d_inner, d_state = _ssm_sizes(hp)
    conv_x = d_inner * n_tokens + (d_conv - 1) * d_inner * n_seqs
    y = d_inner * n_tokens + d_state * d_inner * n_seqs
    return n_tokens * (2 * g.n_embd + 3 * d_inner) + conv_x + y


def _mamba2_phase(hp: Hparams, g: _Graph, n_tokens: int, n_seqs: int, *, parallel_attention: bool) -> int:
    """``build_mamba2_layer``: the in-projection (z, xBC and dt), the conv input and its output (xBC:
    d_inner + 2 n_group d_state channels), then z made contiguous (d_inner) next to the scan's output.
    The scan's output (d_inner per token and the final states of every sequence) reuses the freed conv
    input when it fits there, else it lands on top. The layer norm's output is freed under the
    in-projection and stays a hole; Falcon-H1 also keeps the parallel attention's output (n_embd)."""
    d_conv, d_inner, d_state = _ssm_sizes(hp)
    n_group, n_ssm_head = int(hp.require("ssm.group_count")), int(hp.require("ssm.time_step_rank"))
    channels = d_inner + 2 * n_group * d_state
    in_proj = 2 * d_inner + 2 * n_group * d_state + n_ssm_head
    conv_x = channels * n_tokens + (d_conv - 1) * channels * n_seqs
    y = d_inner * n_tokens + d_state * d_inner * n_seqs
    last = d_inner * n_tokens if y <= conv_x - n_ssm_head * n_tokens else y
    residual = (3 if parallel_attention else 2) * g.n_embd
    return n_tokens * (residual + in_proj + channels) + conv_x + last


def _delta_net_phase(hp: Hparams, g: _Graph, n_tokens: int, n_seqs: int) -> int:
    """Qwen3-Next's gated delta net (``build_layer_attn_linear``, fused ``GATED_DELTA_NET``): the
    residual and the layer norm (alive until the output gate's projection, after the net), the conv
    input (the mixed QKV projection, 2 n_k_heads d_k + d_inner channels, whose space Q and K reuse) and
    the conv output, Q and K repeated to the value heads (d_inner each), the sequences' gathered
    states (d_state x d_inner each) and the net's output (d_inner per token, then the new states)."""
    _, d_inner, d_state = _ssm_sizes(hp)
    n_group = int(hp.require("ssm.group_count"))
    channels = d_inner + 2 * n_group * d_state
    states = d_state * d_inner * n_seqs
    y = d_inner * n_tokens + states
    return n_tokens * (2 * g.n_embd + 2 * channels + 2 * d_inner) + states + y


def _shortconv_phase(hp: Hparams, g: _Graph, n_tokens: int, n_seqs: int) -> int:
    """LFM2's short convolution: the in-projection (B, C, x: 3 n_embd), B*x, the conv input (n_embd per
    token plus l_cache - 1 carried columns per sequence) and the conv output."""
    l_cache = int(hp.require("shortconv.l_cache"))
    conv_x = g.n_embd * n_tokens + (l_cache - 1) * g.n_embd * n_seqs
    return n_tokens * (2 * g.n_embd + 3 * g.n_embd + 2 * g.n_embd) + conv_x


def hybrid_compute(hp: Hparams, layout: CacheLayout, q: ComputeQuery) -> int:
    """Bytes of the CPU compute buffer of a hybrid model (see the comment above ``_Graph``).

    The buffer is the worst of the graph's phases: an attention layer, the architecture's recurrent
    layer or a feed-forward, each on top of the graph inputs, or the output (the logits of every token
    of the worst-case micro-batch, next to the last hidden states).
    """
    g = _graph(hp, layout)
    n_seqs = max(q.n_seqs, 1)
    n_tokens = q.n_tokens  # graph_reserve rounds the worst-case micro-batch up to a multiple of n_seqs
    inputs = _inputs(g, layout, q, n_tokens)
    phases = [_ffn_phase(g, n_tokens)]
    if layout.has_attention:
        n_kv = q.n_kv_swa if all(layer.swa for layer in layout.layers if layer.has_kv) else q.n_kv
        phases.append(_attention_phase(g, q, n_tokens, n_kv))
    if hp.arch == "jamba":
        phases.append(_mamba1_phase(hp, g, n_tokens, n_seqs))
    elif hp.arch in ("granitehybrid", "nemotron_h", "falcon-h1"):
        phases.append(_mamba2_phase(hp, g, n_tokens, n_seqs, parallel_attention=hp.arch == "falcon-h1"))
    elif hp.arch == "qwen3next":
        phases.append(_delta_net_phase(hp, g, n_tokens, n_seqs))
    elif hp.arch == "lfm2":
        phases.append(_shortconv_phase(hp, g, n_tokens, n_seqs))
    # the output: the logits of every token next to the final norm, over the unused embeddings input;
    # the masks and the layers' tensors are freed by then and the logits reuse their space
    output = n_tokens * 2 * g.n_embd + q.n_outputs * q.n_vocab if q.with_output else 0
    return 4 * max(inputs + max(phases), output)


# --- layouts ------------------------------------------------------------------------------------


@register("jamba", "granitehybrid", compute=hybrid_compute)
def jamba(hp: Hparams) -> CacheLayout:
    """Jamba and Granite-4.0-H: a layer is recurrent iff its ``head_count_kv`` is 0 (both loaders);
    the default filters (``!is_recr`` / ``is_recr``) split attention and Mamba layers along that line."""
    recurrent = _recurrent_where_no_kv_heads(hp)
    return _hybrid_layout(hp, attn=lambda il: not recurrent[il], recr=lambda il: recurrent[il])


granite_hybrid = jamba


@register("falcon-h1", compute=hybrid_compute)
def falcon_h1(hp: Hparams) -> CacheLayout:
    """Falcon-H1 runs attention and a Mamba-2 mixer in parallel in every layer: ``create_memory`` keeps
    every layer in both caches (both filters return true; the recurrent one still stops at the trunk)."""
    return _hybrid_layout(hp, attn=lambda il: True, recr=lambda il: True)


@register("nemotron_h", compute=hybrid_compute)
def nemotron_h(hp: Hparams) -> CacheLayout:
    """Nemotron-H: Mamba-2 blocks have neither heads nor a feed-forward, attention blocks have heads and
    no feed-forward, MLP blocks a feed-forward only. ``create_memory`` caches attention for
    ``!is_recr && n_ff == 0`` and state for ``is_recr && n_ff == 0``: MLP blocks keep nothing."""
    n_layer, n_trunk = hp.n_layer, _trunk_layers(hp)
    n_ff = hp.per_layer("feed_forward_length", n_layer)
    kv = _kv_heads(hp)
    recurrent = [il < n_trunk and kv[il] == 0 and n_ff[il] == 0 for il in range(n_layer)]
    return _hybrid_layout(
        hp,
        attn=lambda il: not recurrent[il] and n_ff[il] == 0,
        recr=lambda il: recurrent[il],
    )


@register("qwen3next", compute=hybrid_compute)
def qwen3next(hp: Hparams) -> CacheLayout:
    """Qwen3-Next: gated delta net layers, with full attention every ``full_attention_interval`` (default
    4) layers, or as the ``attention.recurrent_layers`` array says (``load_arch_hparams``)."""
    n_layer = hp.n_layer
    n_trunk = _trunk_layers(hp)
    if hp.get("attention.recurrent_layers") is not None:
        recurrent = [bool(v) for v in hp.per_layer("attention.recurrent_layers", n_layer)]
    else:
        interval = int(hp.get("full_attention_interval", 4))
        recurrent = [il < n_trunk and (il + 1) % interval != 0 for il in range(n_layer)]
    return _hybrid_layout(
        hp, attn=lambda il: il < n_trunk and not recurrent[il], recr=lambda il: il < n_trunk and recurrent[il]
    )


@register("lfm2", compute=hybrid_compute)
def lfm2(hp: Hparams) -> CacheLayout:
    """LFM2: short-conv layers where ``head_count_kv`` is 0, attention elsewhere. With
    ``attention.sliding_window`` > 0 every attention layer slides a standard window and the attention
    part becomes an SWA cache (``llama_memory_hybrid_iswa``)."""
    recurrent = _recurrent_where_no_kv_heads(hp)
    n_swa = int(hp.get("attention.sliding_window", 0))
    # load_arch_hparams marks is_swa = !is_recr over the trunk only
    n_trunk = _trunk_layers(hp)
    swa = [il < n_trunk and not r for il, r in enumerate(recurrent)] if n_swa > 0 else None
    return _hybrid_layout(
        hp, attn=lambda il: not recurrent[il], recr=lambda il: recurrent[il], swa=swa, sliding_window=n_swa
    )
