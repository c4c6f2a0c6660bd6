"""llama.cpp's per-architecture memory rules, as data the memory model can add up.

llama.cpp decides per architecture which layers keep an attention (KV) cache and how wide its rows
are, which layers keep recurrent state (Mamba's conv/SSM state, RWKV's token shift and WKV state),
which layers slide a window, and whether attention is multi-head latent (MLA). Those rules live in
``src/llama-model.cpp`` (hparams and ``create_memory``), ``src/llama-hparams.cpp`` (``n_embd_k_gqa``,
``n_embd_r``, ``n_embd_s``...) and ``src/models/<arch>.cpp``. This package mirrors them for the pinned
llama.cpp (the one vendored by llama-cpp-python 0.3.36): one small module per family of
architectures, each registering a rule per GGUF ``general.architecture`` name.

A rule reads :class:`Hparams` (the GGUF metadata) and returns a :class:`CacheLayout`: one
:class:`LayerMemory` per layer plus the model-wide facts (MLA, sliding window). The memory model then
needs no knowledge of any architecture. An architecture without a rule raises
:class:`~parallama_runtime.planning.errors.UnsupportedModelError` naming it: never a silent plan.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedModelError

__all__ = [
    "CacheLayout",
    "ComputeQuery",
    "Hparams",
    "LayerMemory",
    "cache_layout",
    "compute_rule",
    "register",
    "register_compute",
    "supported_architectures",
]


class Hparams:
    """GGUF metadata as llama.cpp's model loader reads it: ``{arch}.key`` lookups, scalar-or-array."""

    def __init__(self, architecture: str, metadata: Mapping[str, Any]) -> None:
        self.arch = architecture
        self.metadata = metadata

    def get(self, key: str, default: Any = None) -> Any:
        """``{arch}.{key}``, or ``default`` when absent (llama.cpp's ``get_key(..., required=false)``)."""
        value = self.metadata.get(f"{self.arch}.{key}")
        return default if value is None else value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UnsupportedModelError(f"{self.arch} model lacks the GGUF key {self.arch}.{key}")
        return value

    def int(self, key: str, default: builtins.int = 0) -> builtins.int:
        """An integer key; for a per-layer array, its largest entry."""
        value = self.get(key, default)
        if isinstance(value, list):
            return max((int(v) for v in value), default=default)
        return int(value)

    def per_layer(
        self, key: str, n_layer: builtins.int, default: builtins.int | list[builtins.int] = 0
    ) -> list[builtins.int]:
        """llama.cpp's ``get_key_or_arr``: a scalar repeated for every layer, or one entry per layer."""
        value = self.get(key)
        if value is None:
            value = default
        if isinstance(value, list):
            if len(value) != n_layer:
                raise UnsupportedModelError(
                    f"{self.arch}.{key} has {len(value)} entries but the model has {n_layer} layers"
                )
            return [int(v) for v in value]
        return [int(value)] * n_layer

    @property
    def n_layer(self) -> builtins.int:
        return int(self.require("block_count"))

    @property
    def n_embd(self) -> builtins.int:
        return int(self.require("embedding_length"))


@dataclass(frozen=True)
class LayerMemory:
    """What one layer keeps: per cache cell (attention) and per sequence (recurrent state).

    Element counts are those of one row, as llama.cpp's hparams give them: ``n_embd_k_gqa(il)`` and
    ``n_embd_v_gqa(il)`` for attention, ``n_embd_r()`` and ``n_embd_s()`` for recurrent state. A layer
    with neither keeps nothing (llama.cpp skips it).
    """

    k_elements: int = 0
    """Elements of one K row; 0 means the layer has no attention cache."""
    v_elements: int = 0
    """Elements of one V row; 0 with MLA, where llama.cpp reads V as a view of the K cache."""
    head_k: int = 0
    """K head size: a quantized K cache with flash attention needs it to be a multiple of the block."""
    head_v: int = 0
    swa: bool = False
    """A sliding-window layer: its cache is small unless ``swa_full``."""
    r_elements: int = 0
    """Recurrent conv / token-shift state per sequence (f32)."""
    s_elements: int = 0
    """Recurrent SSM / WKV state per sequence (f32)."""
    kv: bool | None = None
    """Whether llama.cpp creates K/V tensors for this layer. None means "when it has K elements"; a
    layer with zero KV heads that llama.cpp still keeps in its cache (so that, without flash attention,
    its V rows are padded to the widest layer's) sets True."""

    @property
    def in_kv_cache(self) -> bool:
        return self.k_elements > 0 if self.kv is None else self.kv

    @property
    def has_kv(self) -> bool:
        return self.in_kv_cache

    @property
    def is_recurrent(self) -> bool:
        return self.r_elements > 0 or self.s_elements > 0


@dataclass(frozen=True)
class CacheLayout:
    """An architecture's memory layout for one model: a :class:`LayerMemory` per layer and the rest."""

    layers: tuple[LayerMemory, ...]
    is_mla: bool = False
    """Multi-head latent attention: one compressed K row per cell, no V cache, and K and V types
    must be equal (llama.cpp refuses the context otherwise)."""
    sliding_window: int = 0
    """``n_swa``: tokens a sliding-window layer attends to."""
    swa_type: str = "none"
    """``standard`` (the last ``n_swa`` positions), ``chunked``, ``symmetric`` or ``none``."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Facts worth a line in a plan's warnings (e.g. an older MLA conversion caching full K and V)."""

    @property
    def has_swa(self) -> bool:
        return any(layer.swa for layer in self.layers)

    @property
    def has_recurrent(self) -> bool:
        return any(layer.is_recurrent for layer in self.layers)

    @property
    def has_attention(self) -> bool:
        return any(layer.has_kv for layer in self.layers)


@dataclass(frozen=True)
class ComputeQuery:
    """The inputs of a compute-buffer estimate for one device (see :func:`compute_rule`)."""

    n_ubatch: int
    """Tokens of the worst-case micro-batch (``n_ubatch``, capped at the context)."""
    n_seqs: int
    """Sequence ids of the context (``n_seq_max``): the reserved micro-batch is split over that many
    sequences, and a recurrent layer gathers that many states. ``llama_context::sched_reserve`` takes
    ``n_seqs = cparams.n_seq_max`` whether or not the KV cache is unified (it is not 1 for a unified
    pool); only the KQ mask's stream dimension is 1 there (``build_input_kq_mask``)."""
    n_kv: int
    """Cells a full-attention layer attends over in the worst case: the whole pool with the unified
    cache (the runtime's layout), one slot's stream otherwise."""
    n_kv_swa: int
    """Cells a sliding-window layer attends over in the worst case."""
    flash_attention: bool
    with_output: bool
    """This device computes the output head (logits of the micro-batch)."""
    n_vocab: int
    type_k: str = "f16"
    """KV cache types (``f16``, ``q8_0``...): a quantized cache rotates its heads with Hadamard
    matrices when the head size allows, which adds graph inputs and products."""
    type_v: str = "f16"
    pooling: int = 0
    """An embedding context's pooling (llama.cpp's ``llama_pooling_type``: 1 mean, 2 cls, 3 last),
    which ``build_pooling`` appends to the graph; 0 for a generative context (none)."""

    @property
    def n_tokens(self) -> int:
        """Tokens of the reserved graph: ``llama_context::graph_reserve`` rounds ``n_ubatch`` up to a
        multiple of ``n_seqs`` (``ubatch_reserve(n_tokens / n_seqs, n_seqs)``), so 20 sequence ids
        reserve 520 tokens for a micro-batch of 512."""
        n_seqs = max(self.n_seqs, 1)
        return -(-self.n_ubatch // n_seqs) * n_seqs

    @property
    def n_outputs(self) -> int:
        """Output rows (logits) of the worst-case graph: ``n_ubatch`` of the rounded batch's tokens
        (``sched_reserve``'s ``n_outputs_pp``, the runtime's ``n_batch`` being ``n_ubatch``), or
        ``n_seqs`` when there are more sequence ids than that, from the token-generation graph
        (``graph_reserve(n_seqs, n_seqs, n_seqs)``), which then is the larger one; the compute
        buffer only grows over the reserves."""
        return min(self.n_tokens, max(self.n_ubatch, self.n_seqs))


LayoutRule = Callable[[Hparams], CacheLayout]
ComputeRule = Callable[[Hparams, CacheLayout, ComputeQuery], int]

_LAYOUTS: dict[str, LayoutRule] = {}
_COMPUTE: dict[str, ComputeRule] = {}


def register(*architectures: str, compute: ComputeRule | None = None) -> Callable[[LayoutRule], LayoutRule]:
    """Register ``rule`` as the layout of ``architectures`` (and ``compute`` as their compute rule)."""

    def decorate(rule: LayoutRule) -> LayoutRule:
        for name in architectures:
            _LAYOUTS[name] = rule
            if compute is not None:
                _COMPUTE[name] = compute
        return rule

    return decorate


def register_compute(*architectures: str) -> Callable[[ComputeRule], ComputeRule]:
    """Register ``rule`` as the compute rule of ``architectures`` (whose layouts are registered apart)."""

    def decorate(rule: ComputeRule) -> ComputeRule:
        for name in architectures:
            _COMPUTE[name] = rule
        return rule

    return decorate


def _load_families() -> None:
    # importing a family module registers its rules; the order does not matter
    from . import dense, graph_replay, hybrid, mla, recurrent  # noqa: F401


def cache_layout(hparams: Hparams) -> CacheLayout:
    """The layout of ``hparams.arch``; :class:`UnsupportedModelError` when llama.cpp's rules for it
    are not mirrored here."""
    _load_families()
    rule = _LAYOUTS.get(hparams.arch)
    if rule is None:
        raise UnsupportedModelError(
            f"architecture {hparams.arch!r} cannot be planned yet: its memory rules are not mirrored "
            f"from llama.cpp (supported: {', '.join(supported_architectures())})"
        )
    return rule(hparams)


def compute_rule(architecture: str) -> ComputeRule | None:
    """The architecture's own compute-buffer rule, or None for the memory model's generic one."""
    _load_families()
    return _COMPUTE.get(architecture)


def supported_architectures() -> list[str]:
    _load_families()
    return sorted(_LAYOUTS)
