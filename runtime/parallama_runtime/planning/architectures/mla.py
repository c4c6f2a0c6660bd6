"""Multi-head latent attention (DeepSeek-2 and its namesakes): llama.cpp's memory rules.

DeepSeek-2 compresses K and V into one latent row of ``kv_lora_rank`` values plus ``n_rot`` rotary
values per token. How llama.cpp caches it depends on how the GGUF was converted, and llama.cpp decides
from the metadata alone (``llama_hparams::is_mla()``: both ``attention.key_length_mla`` and
``attention.value_length_mla`` present and non-zero):

* **MLA conversion** (``conversion/deepseek.py`` since the re-conversion): ``head_count_kv`` is 1,
  ``key_length`` is ``kv_lora_rank + n_rot`` and ``value_length`` is ``kv_lora_rank``; the per-head
  sizes move to the ``*_mla`` keys and ``wkv_b`` is split into ``wk_b`` / ``wv_b``. The graph absorbs
  ``wk_b`` into the query (MQA over the latent), so one K row of ``kv_lora_rank + n_rot`` values per
  layer and cell is all the cache holds: ``llama_kv_cache``'s constructor creates no V tensor
  (``has_v = !is_mla``) and ``build_attn`` reads V as a view of the first ``kv_lora_rank`` values of K.
  ``llama_init_from_model`` then refuses different K and V cache types.
* **older conversion** (no ``*_mla`` keys): the graph decompresses the latent with ``wkv_b`` into full
  per-head K (``qk_nope + qk_rope``) and V for ``head_count_kv = head_count`` heads and caches those,
  about 57 times more for DeepSeek-V3/R1.

In both, the NextN/MTP layers appended to ``block_count`` (``nextn_predict_layers``) are filtered out
of the main context's cache (``create_memory``'s default branch), as :func:`.dense.attention_layers`
already mirrors. ``mistral4`` is the same loader and graph under another name (``src/models/models.h``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import CacheLayout, ComputeQuery, Hparams, register
from .dense import attention_layers, main_layer_count

__all__ = ["MlaShape", "deepseek2_compute", "deepseek2_layout", "is_mla", "mla_shape"]

LEGACY_NOTE = (
    "this GGUF predates llama.cpp's MLA re-conversion (no attention.key_length_mla): llama.cpp caches "
    "full per-head K and V instead of the compressed latent; re-converting it with a current "
    "convert_hf_to_gguf.py makes its KV cache many times smaller"
)


def is_mla(hp: Hparams) -> bool:
    """``llama_hparams::is_mla()``: both MLA head sizes are present and non-zero."""
    key, value = hp.get("attention.key_length_mla", 0), hp.get("attention.value_length_mla", 0)
    return int(key) != 0 and int(value) != 0


@dataclass(frozen=True)
class MlaShape:
    """The attention and feed-forward sizes DeepSeek-2's graph works with (``deepseek2.cpp``)."""

    mla: bool
    n_embd: int
    n_head: int
    kv_lora_rank: int
    q_lora_rank: int
    rope: int
    """``n_rot``: rotary dimensions of a head, shared by all heads in K."""
    head_k: int
    """``n_embd_head_k_mla()``: a decompressed head's K size (nope + rope)."""
    head_v: int
    """``n_embd_head_v_mla()``: a decompressed head's V size."""
    n_ff: int
    """Feed-forward width of the leading dense layers."""
    n_ff_exp: int
    n_expert_used: int
    n_expert_shared: int
    dense_lead: int
    n_layer: int
    """Trunk layers (``n_layer()``): NextN layers are not in the main graph."""

    @property
    def qk_nope(self) -> int:
        return self.head_k - self.rope


def mla_shape(hp: Hparams) -> MlaShape:
    """Read the sizes as ``llama_model_deepseek2::load_arch_hparams`` and ``load_hparams`` do."""
    n_head = hp.per_layer("attention.head_count", hp.n_layer)[0]
    n_embd = int(hp.n_embd)
    default_head = n_embd // n_head if n_head else 0
    head_k_full = int(hp.get("attention.key_length", default_head))
    mla = is_mla(hp)
    return MlaShape(
        mla=mla,
        n_embd=n_embd,
        n_head=n_head,
        kv_lora_rank=int(hp.get("attention.kv_lora_rank", 0)),
        q_lora_rank=int(hp.get("attention.q_lora_rank", 0)),
        rope=int(hp.get("rope.dimension_count", head_k_full)),
        head_k=int(hp.get("attention.key_length_mla")) if mla else head_k_full,
        head_v=(
            int(hp.get("attention.value_length_mla"))
            if mla
            else int(hp.get("attention.value_length", default_head))
        ),
        n_ff=hp.int("feed_forward_length"),
        n_ff_exp=hp.int("expert_feed_forward_length"),
        n_expert_used=hp.int("expert_used_count"),
        n_expert_shared=hp.int("expert_shared_count"),
        dense_lead=hp.int("leading_dense_block_count"),
        n_layer=main_layer_count(hp),
    )


def deepseek2_compute(hp: Hparams, layout: CacheLayout, q: ComputeQuery) -> int:
    """CPU compute buffer of DeepSeek-2's graph (``llama_model_deepseek2::graph``).

    ggml's allocator places tensors best-fit and frees them after their last use, so the buffer is
    the high-water address of the worst layer, not just the sum of live tensors: a tensor that fits
    no hole goes on top of the one allocated last. Per token of the micro-batch, in floats, the
    largest of these phases (the KQ mask, an input alive through all layers, under each layer phase):

    * MLA attention: the query path leaves ``q`` (``H (nope + rope)``), the absorbed query
      (``H kv_lora_rank``) and the roped ``q_pe`` (``H rope``) below ``Qcur`` (``H (kv_lora_rank + rope)``),
      which lands on top unless it fits the hole ``q`` left (``nope >= kv_lora_rank``). Without flash
      attention KQ (``H n_kv``) then goes on top too, unless it fits the hole the query path left.
    * older conversion: ``q``, ``Qcur``, the decompressed ``kv`` (``H (nope + V)``), the V copy and
      ``Kcur`` stack up (``H (3 K + nope + 2 V)``) with flash attention; without it, ``Qcur`` and KQ sit
      above the freed K/V, and the V-cache row indices (i64 per element of a transposed V row,
      ``2 H V``) are an input alive through all layers.
    * the leading dense feed-forward: gate, up and their product (``3 n_ff``);
    * a MoE layer: the routed experts' gate, up and product (``3 n_ff_exp k``), or the product and
      the experts' outputs (``n_ff_exp k + n_embd k``) when larger, or the shared expert;
    * the output: the logits of every output row (``n_vocab``).

    ``n_kv`` is what one stream attends over: with the runtime's unified pool, every slot's cells, so
    the KQ mask and (without flash attention) KQ grow with the slots, as in llama.cpp.

    The multiples of ``n_embd`` (the residual stream and the holes it leaves) were calibrated against
    llama.cpp's CPU buffer over shapes from 64 to 1024 wide and 4 to 128 heads: within 10 % but for
    edge cases where KQ just fits or misses a hole (see tests/memory/test_mla_recurrent_vs_llama.py).
    """
    s = mla_shape(hp)
    e, h, r, p = s.n_embd, s.n_head, s.kv_lora_rank, s.rope
    nope, k, v = s.qk_nope, s.head_k, s.head_v
    n_kv = q.n_kv
    fa = q.flash_attention
    inputs = n_kv / 2 if fa else float(n_kv)  # the KQ mask: f16 with flash attention, f32 without
    if s.mla:
        query = s.q_lora_rank + h * (nope + p) + h * r + h * p
        qcur = h * (r + p) if nope < r else 0
        attention: float = 3 * e + query + qcur
        if not fa and n_kv >= r + nope + 2 * p:
            attention += h * n_kv
    elif fa:
        attention = 1.5 * e + s.q_lora_rank + h * (3 * k + nope + 2 * v)
    else:
        inputs += 2 * h * v  # llm_graph_input_attn_kv's v_idxs: one i64 per element of the V rows
        attention = 0.75 * e + s.q_lora_rank + 2 * h * k + 1.75 * h * v + h * n_kv
    phases = [inputs + attention]
    if s.dense_lead > 0:
        phases.append(inputs + 3 * s.n_ff + 4 * e)
    if s.dense_lead < s.n_layer and s.n_expert_used > 0:
        routed = s.n_ff_exp * s.n_expert_used
        shared = s.n_ff_exp * s.n_expert_shared
        phases.append(inputs + max(3 * routed, routed + e * s.n_expert_used + e, 3 * shared + e) + 3.5 * e)
    worst = max(phases) * q.n_tokens
    if q.with_output:
        worst = max(worst, q.n_vocab * q.n_outputs + 3 * e * q.n_tokens)
    return int(worst * 4)


@register("deepseek2", "mistral4", compute=deepseek2_compute)
def deepseek2_layout(hp: Hparams) -> CacheLayout:
    """One K row of ``kv_lora_rank + rope`` per trunk layer with MLA; full K and V per head without."""
    layers = attention_layers(hp)
    if not is_mla(hp):
        return CacheLayout(layers=tuple(layers), notes=(LEGACY_NOTE,))
    # V is a view of K's first kv_lora_rank values: no V tensor (llama_kv_cache: has_v = !is_mla). The
    # V head size (value_length = kv_lora_rank) stays: llama_init_from_model checks a quantized V type's
    # block against it with flash attention, MLA or not.
    return CacheLayout(layers=tuple(replace(layer, v_elements=0) for layer in layers), is_mla=True)
