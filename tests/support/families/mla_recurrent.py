"""Tiny multi-head latent attention (DeepSeek-2 shaped) and pure recurrent (Mamba, RWKV) models.

The tensor shapes follow each architecture's ``load_arch_tensors`` in llama.cpp's ``src/models``
(``deepseek2.cpp``, ``mamba.cpp``, ``mamba2.cpp``, ``rwkv6.cpp``, ``rwkv6qwen2.cpp``, ``rwkv7.cpp``,
``arwkv7.cpp``) and the keys those of the converters in ``conversion/`` (``deepseek.py``, ``mamba.py``,
``rwkv.py``). Head sizes are chosen so that the cache rows are multiples of ggml's quantization block
(32) where a case needs a quantized cache to be accepted, and not where it needs it refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from . import family
from .common import ModelWriter, model_writer

__all__ = ["DEEPSEEK2_LEGACY", "DEEPSEEK2_MLA", "DeepSeekShape", "write_mamba", "write_mamba2"]

T = gguf.MODEL_TENSOR


def _name(tensor: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    base = gguf.TENSOR_NAMES[tensor].format(bid=bid)
    return f"{base}.{suffix}" if suffix else base


def _common(model: ModelWriter, n_embd: int, *, output_norm_bias: bool = False, output: bool = True) -> None:
    model.matrix(_name(T.TOKEN_EMBD), model.vocab_size, n_embd)
    model.f32(_name(T.OUTPUT_NORM), n_embd, value=1.0)
    if output_norm_bias:
        model.f32(_name(T.OUTPUT_NORM, suffix="bias"), n_embd, value=0.0)
    if output:
        model.matrix(_name(T.OUTPUT), model.vocab_size, n_embd)


# ---------------------------------------------------------------------------------------------------
# DeepSeek-2: multi-head latent attention
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeepSeekShape:
    """The attention and feed-forward shape of a DeepSeek-2 model, in the Hugging Face config's terms."""

    n_layer: int
    n_embd: int
    n_head: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    dense_lead: int
    n_ff: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_expert_shared: int


DEEPSEEK2_MLA = DeepSeekShape(
    n_layer=3,
    n_embd=64,
    n_head=4,
    q_lora_rank=32,
    kv_lora_rank=64,
    qk_nope=16,
    qk_rope=32,
    v_head=16,
    dense_lead=1,
    n_ff=96,
    n_expert=4,
    n_expert_used=2,
    n_ff_exp=32,
    n_expert_shared=1,
)
"""MLA conversion: cached K row = kv_lora_rank + rope = 96 (a multiple of 32), V = 64 (a view of K)."""

DEEPSEEK2_LEGACY = DeepSeekShape(
    n_layer=3,
    n_embd=64,
    n_head=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope=32,
    qk_rope=32,
    v_head=32,
    dense_lead=1,
    n_ff=96,
    n_expert=4,
    n_expert_used=2,
    n_ff_exp=32,
    n_expert_shared=1,
)
"""Older conversion: full per-head K (nope + rope = 64) and V (32) for every one of the 4 heads."""


def _deepseek2(
    path: Path, shape: DeepSeekShape, *, mla: bool, architecture: str = "deepseek2", nextn: int = 0
) -> Path:
    s = shape
    k_mla = s.qk_nope + s.qk_rope
    n_layer_all = s.n_layer + nextn
    with model_writer(path, architecture, seed=11 if mla else 12) as model:
        w = model.gguf
        w.add_block_count(n_layer_all)
        if nextn:
            w.add_nextn_predict_layers(nextn)
        w.add_embedding_length(s.n_embd)
        w.add_feed_forward_length(s.n_ff)
        w.add_head_count(s.n_head)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(s.qk_rope)
        w.add_leading_dense_block_count(s.dense_lead)
        w.add_q_lora_rank(s.q_lora_rank)
        w.add_kv_lora_rank(s.kv_lora_rank)
        if mla:
            # conversion/deepseek.py since the MLA re-conversion: MQA over the compressed latent
            w.add_head_count_kv(1)
            w.add_key_length(s.kv_lora_rank + s.qk_rope)
            w.add_value_length(s.kv_lora_rank)
            w.add_key_length_mla(k_mla)
            w.add_value_length_mla(s.v_head)
        else:
            # the older conversion: plain multi-head attention after decompression by wkv_b
            w.add_head_count_kv(s.n_head)
            w.add_key_length(k_mla)
            w.add_value_length(s.v_head)
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        w.add_expert_shared_count(s.n_expert_shared)
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)

        _common(model, s.n_embd)
        for i in range(s.n_layer):  # the nextn layers have no tensors: llama.cpp then loads the trunk only
            model.f32(_name(T.ATTN_NORM, i), s.n_embd, value=1.0)
            model.f32(_name(T.ATTN_Q_A_NORM, i), s.q_lora_rank, value=1.0)
            model.f32(_name(T.ATTN_KV_A_NORM, i), s.kv_lora_rank, value=1.0)
            model.matrix(_name(T.ATTN_Q_A, i), s.q_lora_rank, s.n_embd)
            model.matrix(_name(T.ATTN_Q_B, i), s.n_head * k_mla, s.q_lora_rank)
            model.matrix(_name(T.ATTN_KV_A_MQA, i), s.kv_lora_rank + s.qk_rope, s.n_embd)
            if mla:
                # ne {nope, kv_lora_rank, n_head} and {kv_lora_rank, v_head, n_head}
                model.matrix(_name(T.ATTN_K_B, i), s.n_head, s.kv_lora_rank, s.qk_nope)
                model.matrix(_name(T.ATTN_V_B, i), s.n_head, s.v_head, s.kv_lora_rank)
            else:
                model.matrix(_name(T.ATTN_KV_B, i), s.n_head * (s.qk_nope + s.v_head), s.kv_lora_rank)
            model.matrix(_name(T.ATTN_OUT, i), s.n_embd, s.n_head * s.v_head)
            model.f32(_name(T.FFN_NORM, i), s.n_embd, value=1.0)
            if i < s.dense_lead:
                model.matrix(_name(T.FFN_GATE, i), s.n_ff, s.n_embd)
                model.matrix(_name(T.FFN_UP, i), s.n_ff, s.n_embd)
                model.matrix(_name(T.FFN_DOWN, i), s.n_embd, s.n_ff)
            else:
                model.f32(_name(T.FFN_GATE_INP, i), s.n_expert, s.n_embd)
                model.f32(_name(T.FFN_EXP_PROBS_B, i, "bias"), s.n_expert, value=0.0)
                model.matrix(_name(T.FFN_GATE_EXP, i), s.n_expert, s.n_ff_exp, s.n_embd)
                model.matrix(_name(T.FFN_UP_EXP, i), s.n_expert, s.n_ff_exp, s.n_embd)
                model.matrix(_name(T.FFN_DOWN_EXP, i), s.n_expert, s.n_embd, s.n_ff_exp)
                shared = s.n_ff_exp * s.n_expert_shared
                model.matrix(_name(T.FFN_GATE_SHEXP, i), shared, s.n_embd)
                model.matrix(_name(T.FFN_UP_SHEXP, i), shared, s.n_embd)
                model.matrix(_name(T.FFN_DOWN_SHEXP, i), s.n_embd, shared)
    return path


@family("deepseek2-mla", "deepseek2", "mla", "moe")
def deepseek2_mla(path: Path) -> Path:
    return _deepseek2(path, DEEPSEEK2_MLA, mla=True)


@family("deepseek2-legacy", "deepseek2", "mla_legacy", "moe")
def deepseek2_legacy(path: Path) -> Path:
    return _deepseek2(path, DEEPSEEK2_LEGACY, mla=False)


@family("deepseek2-mla-nextn", "deepseek2", "mla", "moe")
def deepseek2_mla_nextn(path: Path) -> Path:
    """A GLM-4.7-Flash-like file: one next-token-prediction layer counted in block_count (its tensors
    left out), which llama.cpp's trunk KV cache filters out."""
    return _deepseek2(path, DEEPSEEK2_MLA, mla=True, nextn=1)


@family("mistral4-mla", "mistral4", "mla", "moe")
def mistral4_mla(path: Path) -> Path:
    """mistral4 is deepseek2's loader and graph under another name (src/models/models.h)."""
    return _deepseek2(path, DEEPSEEK2_MLA, mla=True, architecture="mistral4")


# ---------------------------------------------------------------------------------------------------
# Mamba
# ---------------------------------------------------------------------------------------------------

MAMBA = {"n_layer": 2, "n_embd": 64, "d_conv": 4, "d_inner": 128, "d_state": 16, "dt_rank": 4}
MAMBA2 = {
    "n_layer": 2,
    "n_embd": 64,
    "d_conv": 4,
    "d_inner": 128,
    "d_state": 16,
    "n_group": 2,
    "head_dim": 32,
}


@family("mamba", "mamba", "recurrent")
def mamba(path: Path) -> Path:
    return write_mamba(path, MAMBA)


def write_mamba(path: Path, p: dict[str, int], vocab_size: int = 0) -> Path:
    n_embd, d_inner, d_state, dt_rank = p["n_embd"], p["d_inner"], p["d_state"], p["dt_rank"]
    d_conv = p["d_conv"]
    with model_writer(path, "mamba", seed=21, vocab_size=vocab_size) as model:
        w = model.gguf
        w.add_block_count(p["n_layer"])
        w.add_embedding_length(n_embd)
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_ssm_conv_kernel(d_conv)
        w.add_ssm_inner_size(d_inner)
        w.add_ssm_state_size(d_state)
        w.add_ssm_time_step_rank(dt_rank)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_ssm_dt_b_c_rms(False)
        _common(model, n_embd)
        for i in range(p["n_layer"]):
            model.f32(_name(T.ATTN_NORM, i), n_embd, value=1.0)
            model.matrix(_name(T.SSM_IN, i), 2 * d_inner, n_embd)
            model.f32(_name(T.SSM_CONV1D, i), d_inner, d_conv, scale=0.2)
            model.f32(_name(T.SSM_CONV1D, i, "bias"), d_inner, value=0.0)
            model.matrix(_name(T.SSM_X, i), dt_rank + 2 * d_state, d_inner)
            model.matrix(_name(T.SSM_DT, i), d_inner, dt_rank)
            model.f32(_name(T.SSM_DT, i, "bias"), d_inner, value=0.0)
            model.f32(_name(T.SSM_A, i, ""), d_inner, d_state, value=-1.0)
            model.f32(_name(T.SSM_D, i, ""), d_inner, value=1.0)
            model.matrix(_name(T.SSM_OUT, i), n_embd, d_inner)
    return path


@family("mamba2", "mamba2", "recurrent")
def mamba2(path: Path) -> Path:
    return write_mamba2(path, MAMBA2)


def write_mamba2(path: Path, p: dict[str, int], vocab_size: int = 0) -> Path:
    n_embd, d_inner, d_state, n_group = p["n_embd"], p["d_inner"], p["d_state"], p["n_group"]
    d_conv = p["d_conv"]
    n_head = d_inner // p["head_dim"]
    conv_dim = d_inner + 2 * n_group * d_state
    with model_writer(path, "mamba2", seed=22, vocab_size=vocab_size) as model:
        w = model.gguf
        w.add_block_count(p["n_layer"])
        w.add_embedding_length(n_embd)
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_ssm_conv_kernel(d_conv)
        w.add_ssm_inner_size(d_inner)
        w.add_ssm_state_size(d_state)
        w.add_ssm_time_step_rank(n_head)
        w.add_ssm_group_count(n_group)
        w.add_layer_norm_rms_eps(1e-5)
        _common(model, n_embd)
        for i in range(p["n_layer"]):
            model.f32(_name(T.ATTN_NORM, i), n_embd, value=1.0)
            model.matrix(_name(T.SSM_IN, i), d_inner + conv_dim + n_head, n_embd)
            model.f32(_name(T.SSM_CONV1D, i), conv_dim, d_conv, scale=0.2)
            model.f32(_name(T.SSM_CONV1D, i, "bias"), conv_dim, value=0.0)
            model.f32(_name(T.SSM_DT, i, "bias"), n_head, value=0.0)
            model.f32(_name(T.SSM_A, i, ""), n_head, 1, value=-1.0)
            model.f32(_name(T.SSM_D, i, ""), n_head, 1, value=1.0)
            model.f32(_name(T.SSM_NORM, i), n_group, d_inner // n_group, value=1.0)
            model.matrix(_name(T.SSM_OUT, i), n_embd, d_inner)
    return path


# ---------------------------------------------------------------------------------------------------
# RWKV
# ---------------------------------------------------------------------------------------------------

RWKV = {
    "n_layer": 2,
    "n_embd": 64,
    "head_size": 16,
    "n_ff": 128,
    "time_mix_extra_dim": 8,
    "time_decay_extra_dim": 16,
    "lora": 8,
}


def _rwkv_keys(w: gguf.GGUFWriter, token_shift_count: int | None) -> None:
    """The keys RWKV 6 and 7 share: no attention heads, a WKV head size, an optional token shift."""
    p = RWKV
    w.add_block_count(p["n_layer"])
    w.add_embedding_length(p["n_embd"])
    w.add_head_count(0)
    w.add_wkv_head_size(p["head_size"])
    w.add_feed_forward_length(p["n_ff"])
    if token_shift_count is not None:
        w.add_token_shift_count(token_shift_count)


def _rwkv6_keys(w: gguf.GGUFWriter, token_shift_count: int | None) -> None:
    _rwkv_keys(w, token_shift_count)
    w.add_time_mix_extra_dim(RWKV["time_mix_extra_dim"])
    w.add_time_decay_extra_dim(RWKV["time_decay_extra_dim"])


def _rwkv6_time_mix(model: ModelWriter, i: int, *, qwen2: bool) -> None:
    p = RWKV
    n_embd, head = p["n_embd"], p["head_size"]
    tm, td = p["time_mix_extra_dim"], p["time_decay_extra_dim"]
    model.matrix(_name(T.TIME_MIX_W1, i), tm * 5, n_embd)
    model.matrix(_name(T.TIME_MIX_W2, i), 5, n_embd, tm)
    model.f32(_name(T.TIME_MIX_LERP_X, i), 1, 1, n_embd, value=0.5)
    model.f32(_name(T.TIME_MIX_LERP_FUSED, i), 5, 1, 1, n_embd, value=0.5)
    if not qwen2:  # QRWKV has no time_mix_first: llama.cpp then runs gated linear attention
        model.f32(_name(T.TIME_MIX_FIRST, i), n_embd // head, head)
    model.f32(_name(T.TIME_MIX_DECAY, i), n_embd, value=-1.0)
    model.matrix(_name(T.TIME_MIX_DECAY_W1, i), td, n_embd)
    model.matrix(_name(T.TIME_MIX_DECAY_W2, i), n_embd, td)
    model.matrix(_name(T.TIME_MIX_KEY, i), n_embd, n_embd)
    model.matrix(_name(T.TIME_MIX_VALUE, i), n_embd, n_embd)
    model.matrix(_name(T.TIME_MIX_RECEPTANCE, i), n_embd, n_embd)
    model.matrix(_name(T.TIME_MIX_GATE, i), n_embd, n_embd)
    if not qwen2:
        model.f32(_name(T.TIME_MIX_LN, i), n_embd, value=1.0)
        model.f32(_name(T.TIME_MIX_LN, i, "bias"), n_embd, value=0.0)
    model.matrix(_name(T.TIME_MIX_OUTPUT, i), n_embd, n_embd)


@family("rwkv6", "rwkv6", "recurrent")
def rwkv6(path: Path) -> Path:
    p = RWKV
    n_embd, n_ff = p["n_embd"], p["n_ff"]
    with model_writer(path, "rwkv6", seed=31) as model:
        w = model.gguf
        _rwkv6_keys(w, None)  # the default token_shift_count (2)
        w.add_layer_norm_eps(1e-5)
        w.add_rescale_every_n_layers(6)
        _common(model, n_embd, output_norm_bias=True)
        model.f32(_name(T.TOKEN_EMBD_NORM, 0), n_embd, value=1.0)
        model.f32(_name(T.TOKEN_EMBD_NORM, 0, "bias"), n_embd, value=0.0)
        for i in range(p["n_layer"]):
            for norm in (T.ATTN_NORM, T.ATTN_NORM_2):
                model.f32(_name(norm, i), n_embd, value=1.0)
                model.f32(_name(norm, i, "bias"), n_embd, value=0.0)
            _rwkv6_time_mix(model, i, qwen2=False)
            model.f32(_name(T.CHANNEL_MIX_LERP_K, i), 1, 1, n_embd, value=0.5)
            model.f32(_name(T.CHANNEL_MIX_LERP_R, i), 1, 1, n_embd, value=0.5)
            model.matrix(_name(T.CHANNEL_MIX_KEY, i), n_ff, n_embd)
            model.matrix(_name(T.CHANNEL_MIX_VALUE, i), n_embd, n_ff)
            model.matrix(_name(T.CHANNEL_MIX_RECEPTANCE, i), n_embd, n_embd)
    return path


@family("rwkv6qwen2", "rwkv6qwen2", "recurrent")
def rwkv6qwen2(path: Path) -> Path:
    p = RWKV
    n_embd, n_ff = p["n_embd"], p["n_ff"]
    with model_writer(path, "rwkv6qwen2", seed=32) as model:
        w = model.gguf
        _rwkv6_keys(w, 1)  # conversion/rwkv.py writes 1 for the Qwen2 hybrids
        w.add_layer_norm_rms_eps(1e-6)
        w.add_head_count_kv(n_embd // p["head_size"])
        _common(model, n_embd)
        for i in range(p["n_layer"]):
            model.f32(_name(T.ATTN_NORM, i), n_embd, value=1.0)
            _rwkv6_time_mix(model, i, qwen2=True)
            model.f32(_name(T.FFN_NORM, i), n_embd, value=1.0)
            model.matrix(_name(T.FFN_GATE, i), n_ff, n_embd)
            model.matrix(_name(T.FFN_UP, i), n_ff, n_embd)
            model.matrix(_name(T.FFN_DOWN, i), n_embd, n_ff)
    return path


def _rwkv7_time_mix(model: ModelWriter, i: int, *, lerp: int, ln: bool) -> None:
    p = RWKV
    n_embd, r = p["n_embd"], p["lora"]
    model.f32(_name(T.TIME_MIX_W0, i), n_embd, value=-1.0)
    model.matrix(_name(T.TIME_MIX_W1, i), r, n_embd)
    model.matrix(_name(T.TIME_MIX_W2, i), n_embd, r)
    model.f32(_name(T.TIME_MIX_A0, i), n_embd, value=0.0)
    model.matrix(_name(T.TIME_MIX_A1, i), r, n_embd)
    model.matrix(_name(T.TIME_MIX_A2, i), n_embd, r)
    model.f32(_name(T.TIME_MIX_V0, i), n_embd, value=0.0)
    model.matrix(_name(T.TIME_MIX_V1, i), r, n_embd)
    model.matrix(_name(T.TIME_MIX_V2, i), n_embd, r)
    model.matrix(_name(T.TIME_MIX_G1, i), r, n_embd)
    model.matrix(_name(T.TIME_MIX_G2, i), n_embd, r)
    model.f32(_name(T.TIME_MIX_LERP_FUSED, i), lerp, 1, 1, n_embd, value=0.5)
    model.f32(_name(T.TIME_MIX_K_K, i), n_embd, value=1.0)
    model.f32(_name(T.TIME_MIX_K_A, i), n_embd, value=1.0)
    model.f32(_name(T.TIME_MIX_R_K, i), n_embd, value=0.1)
    model.matrix(_name(T.TIME_MIX_KEY, i), n_embd, n_embd)
    model.matrix(_name(T.TIME_MIX_VALUE, i), n_embd, n_embd)
    model.matrix(_name(T.TIME_MIX_RECEPTANCE, i), n_embd, n_embd)
    if ln:
        model.f32(_name(T.TIME_MIX_LN, i), n_embd, value=1.0)
        model.f32(_name(T.TIME_MIX_LN, i, "bias"), n_embd, value=0.0)
    model.matrix(_name(T.TIME_MIX_OUTPUT, i), n_embd, n_embd)


def _rwkv7_keys(w: gguf.GGUFWriter, token_shift_count: int | None) -> None:
    _rwkv_keys(w, token_shift_count)
    w.add_decay_lora_rank(RWKV["lora"])
    w.add_iclr_lora_rank(RWKV["lora"])
    w.add_value_residual_mix_lora_rank(RWKV["lora"])
    w.add_gate_lora_rank(RWKV["lora"])


@family("rwkv7", "rwkv7", "recurrent")
def rwkv7(path: Path) -> Path:
    p = RWKV
    n_embd, n_ff = p["n_embd"], p["n_ff"]
    with model_writer(path, "rwkv7", seed=33) as model:
        _rwkv7_keys(model.gguf, None)  # the default token_shift_count (2)
        model.gguf.add_layer_norm_eps(1e-5)
        _common(model, n_embd, output_norm_bias=True)
        model.f32(_name(T.TOKEN_EMBD_NORM, 0), n_embd, value=1.0)
        model.f32(_name(T.TOKEN_EMBD_NORM, 0, "bias"), n_embd, value=0.0)
        for i in range(p["n_layer"]):
            for norm in (T.ATTN_NORM, T.ATTN_NORM_2):
                model.f32(_name(norm, i), n_embd, value=1.0)
                model.f32(_name(norm, i, "bias"), n_embd, value=0.0)
            _rwkv7_time_mix(model, i, lerp=6, ln=True)
            model.f32(_name(T.CHANNEL_MIX_LERP_K, i), 1, 1, n_embd, value=0.5)
            model.matrix(_name(T.CHANNEL_MIX_KEY, i), n_ff, n_embd)
            model.matrix(_name(T.CHANNEL_MIX_VALUE, i), n_embd, n_ff)
    return path


@family("arwkv7", "arwkv7", "recurrent")
def arwkv7(path: Path) -> Path:
    p = RWKV
    n_embd, n_ff = p["n_embd"], p["n_ff"]
    with model_writer(path, "arwkv7", seed=34) as model:
        _rwkv7_keys(model.gguf, 1)  # conversion/rwkv.py writes 1 for ARWKV
        model.gguf.add_layer_norm_rms_eps(1e-6)
        _common(model, n_embd)
        for i in range(p["n_layer"]):
            model.f32(_name(T.ATTN_NORM, i), n_embd, value=1.0)
            _rwkv7_time_mix(model, i, lerp=6, ln=False)
            model.f32(_name(T.FFN_NORM, i), n_embd, value=1.0)
            model.matrix(_name(T.FFN_GATE, i), n_ff, n_embd)
            model.matrix(_name(T.FFN_UP, i), n_ff, n_embd)
            model.matrix(_name(T.FFN_DOWN, i), n_embd, n_ff)
    return path
