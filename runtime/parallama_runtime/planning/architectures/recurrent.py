"""Pure recurrent architectures (Mamba, Mamba-2, RWKV-6/7 and their Qwen2-based variants).

``create_memory`` gives every architecture ``llm_arch_is_recurrent`` names a ``llama_memory_recurrent``
and no KV cache: each of the ``n_layer()`` layers keeps two f32 rows per state cell, ``n_embd_r()``
(Mamba's conv state, RWKV's token shift) and ``n_embd_s()`` (the SSM / WKV state), and there are
``rs_size = max(1, n_seq_max)`` cells (``n_rs_seq = 0``, as the runtime leaves it, adds no rollback
snapshots): one per sequence id, which is why the runtime gives these models no more sequence ids
than slots. ``kv_unified`` does not reach this memory (it has no streams). Nothing grows with the
context: ``num_ctx`` changes neither the state nor the compute buffer. The rows follow
``llama_hparams::n_embd_r`` / ``n_embd_s`` (``src/llama-hparams.cpp``):

* RWKV (``wkv.head_size`` set): ``token_shift_count * n_embd`` (default 2; the Qwen2-based
  conversions write 1) and ``n_embd * wkv.head_size``;
* Mamba: ``(ssm.conv_kernel - 1) * (ssm.inner_size + 2 n_group ssm.state_size)`` and
  ``ssm.state_size * ssm.inner_size``, where ``n_group`` is ``ssm.group_count`` for Mamba-2 and 0 for
  Mamba-1 (its loader never reads the key).
"""

from __future__ import annotations

from . import CacheLayout, ComputeQuery, Hparams, LayerMemory, register
from .dense import main_layer_count

__all__ = ["mamba_state", "recurrent_compute", "recurrent_layout", "rwkv_state"]


def mamba_state(hp: Hparams, *, groups: bool) -> tuple[int, int]:
    """``(n_embd_r, n_embd_s)`` of a Mamba-style layer; ``groups`` for loaders that read
    ``ssm.group_count`` (Mamba-2 and its hybrids), else ``n_group`` stays 0 (Mamba-1, Jamba)."""
    d_conv = int(hp.require("ssm.conv_kernel"))
    d_inner = int(hp.require("ssm.inner_size"))
    d_state = int(hp.require("ssm.state_size"))
    n_group = int(hp.require("ssm.group_count")) if groups else 0
    return max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state), d_state * d_inner


def rwkv_state(hp: Hparams) -> tuple[int, int]:
    """``(n_embd_r, n_embd_s)`` of an RWKV layer: token shift and WKV state."""
    head_size = int(hp.require("wkv.head_size"))
    token_shift_count = int(hp.get("token_shift_count", 2))  # llama_hparams' default
    return token_shift_count * hp.n_embd, hp.n_embd * head_size


def _state(hp: Hparams) -> tuple[int, int]:
    if hp.arch == "mamba":
        return mamba_state(hp, groups=False)
    if hp.arch == "mamba2":
        return mamba_state(hp, groups=True)
    return rwkv_state(hp)


def recurrent_compute(hp: Hparams, layout: CacheLayout, q: ComputeQuery) -> int:
    """CPU compute buffer of the recurrent graphs (``src/models/mamba-base.cpp``, ``rwkv6-base.cpp``,
    ``rwkv7-base.cpp``): no KQ mask, nothing that grows with the context.

    Per token of the micro-batch, in floats, the larger of a layer's working set and the output (the
    logits of every token, ``n_vocab``, next to ``3 n_embd`` of residual and norm), plus the states
    of the micro-batch's sequences (``n_seqs`` rows of ``n_embd_r + n_embd_s``), which the graph
    gathers (``build_rs``) and the scan writes back; RWKV holds both copies at its peak.

    * Mamba-1: the residual, ``xz`` (``2 d_inner``), the conv output, ``dt``, the scan's ``y`` and the
      skip product and gate (``d_inner`` each): ``n_embd + 6 d_inner``, plus ``x_db``
      (``dt_rank + 2 d_state``);
    * Mamba-2: the same ``n_embd + 6 d_inner`` plus three copies of B and C (``2 n_group d_state``: in
      ``zxBCdt``, the conv window and the conv output);
    * RWKV time mix: the five token-shift interpolations, r, k, v, g, the decay and the WKV output,
      about 14 ``n_embd`` (RWKV-6), 13 (its Qwen2 variant), 18 (RWKV-7), 17 (ARWKV-7); the channel mix
      or feed-forward when ``n_ff`` is large. The multiples were calibrated against llama.cpp's CPU
      buffer for widths 64 to 512 (within 5 %).
    """
    e = int(hp.n_embd)
    r, s = _state(hp)
    states = r + s
    layer: float
    if hp.arch in ("mamba", "mamba2"):
        d_inner = int(hp.require("ssm.inner_size"))
        d_state = int(hp.require("ssm.state_size"))
        if hp.arch == "mamba":
            layer = e + 6 * d_inner + int(hp.require("ssm.time_step_rank")) + 2 * d_state
        else:
            layer = e + 6 * d_inner + 6 * int(hp.require("ssm.group_count")) * d_state
        per_seq = states
    else:
        n_ff = hp.int("feed_forward_length")
        layer = {
            "rwkv6": max(14 * e, n_ff + 7 * e),
            "rwkv6qwen2": max(13.25 * e, 3 * n_ff + 3 * e),
            "rwkv7": max(18 * e, n_ff + 7 * e),
            "arwkv7": max(17 * e, 3 * n_ff + 7 * e),
        }[hp.arch]
        per_seq = 2 * states
    output = q.n_vocab * q.n_outputs + 3 * e * q.n_tokens if q.with_output else 0
    return int(4 * (max(layer * q.n_tokens, output) + per_seq * q.n_seqs))


@register("mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", compute=recurrent_compute)
def recurrent_layout(hp: Hparams) -> CacheLayout:
    """Every layer keeps one state row pair per sequence; no layer has a KV cache."""
    r, s = _state(hp)
    n_layer = main_layer_count(hp)  # llama_memory_recurrent allocates rows for n_layer() layers only
    return CacheLayout(
        layers=tuple(
            LayerMemory(r_elements=r, s_elements=s) if il < n_layer else LayerMemory()
            for il in range(hp.n_layer)
        )
    )
