"""Small llama-architecture GGUF models with random weights, made on the spot.

No model can be downloaded in CI or on an air-gapped laptop, yet the runtime, its tests and its
benchmarks need a real GGUF that llama.cpp loads. These models have llama's exact tensor layout and
a byte-level SentencePiece vocabulary (every byte is a token, printable ASCII also has a token of
its own), so any text tokenizes and the output is gibberish of the right shape. The weights are
seeded: the same shape and seed give the same file, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import gguf

__all__ = ["BENCH_SHAPE", "DEMO_SHAPE", "ModelShape", "add_vocabulary", "cached_demo_model", "write_model"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<' + message['role'] + '>' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of a generated llama model."""

    block_count: int = 2
    embedding_length: int = 64
    head_count: int = 4
    head_count_kv: int = 2
    feed_forward_length: int = 128
    context_length: int = 8192
    dtype: str = "f32"  # f32 | f16
    name: str = "parallama-demo"
    vocab_size: int = 0
    """Pad the byte-level vocabulary with unused tokens up to this size (0: no padding)."""

    @property
    def head_dim(self) -> int:
        return self.embedding_length // self.head_count

    def digest(self, seed: int) -> str:
        text = repr(sorted(asdict(self).items())) + f"seed={seed}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


DEMO_SHAPE = ModelShape(
    block_count=4, embedding_length=256, head_count=8, head_count_kv=4, feed_forward_length=768, dtype="f16"
)
"""What ``parallama serve`` runs without a model: ~3 M parameters, loads in milliseconds."""

BENCH_SHAPE = ModelShape(
    block_count=12,
    embedding_length=768,
    head_count=12,
    head_count_kv=4,
    feed_forward_length=3072,
    dtype="f16",
    name="parallama-bench-100m",
)
"""A ~100 M parameter llama, big enough that decode time is dominated by matrix products."""


def _vocabulary(size: int = 0) -> tuple[list[bytes], list[float], list[int]]:
    from gguf import TokenType

    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(TokenType.BYTE)
    tokens.append("\u2581".encode())  # SentencePiece's space marker
    types.append(TokenType.NORMAL)
    for code in range(33, 127):
        tokens.append(chr(code).encode())
        types.append(TokenType.NORMAL)
    while len(tokens) < size:
        tokens.append(f"<unused{len(tokens)}>".encode())
        types.append(TokenType.UNUSED)
    scores = [0.0] * len(tokens)
    for index, kind in enumerate(types):
        if kind == TokenType.NORMAL:
            scores[index] = -float(index)
    return tokens, scores, types


def add_vocabulary(writer: gguf.GGUFWriter, size: int = 0, chat_template: str = CHAT_TEMPLATE) -> int:
    """Add the byte-level SentencePiece vocabulary and chat template to ``writer``; its token count."""
    tokens, scores, types = _vocabulary(size)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)
    return len(tokens)


def write_model(
    path: str | os.PathLike[str],
    shape: ModelShape = DEMO_SHAPE,
    *,
    seed: int = 0,
    pooling_type: int | None = None,
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Write a GGUF model of ``shape`` to ``path`` (atomically) and return the path.

    ``pooling_type`` (llama.cpp's ``{arch}.pooling_type``: 1 mean, 2 cls, 3 last, 4 rank) makes it
    an embedding model, the way Qwen3-Embedding is a qwen3 with pooling "last": llama.cpp pools the
    final hidden states of a decoder model per sequence. ``chat_template`` replaces the demo's own
    (tests of what a model's template does: a real model's tool-calling template, say)."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = np.float16 if shape.dtype == "f16" else np.float32
    file_type = gguf.LlamaFileType.MOSTLY_F16 if shape.dtype == "f16" else gguf.LlamaFileType.ALL_F32
    vocab = len(_vocabulary(shape.vocab_size)[0])
    hd = shape.head_dim
    n_embd = shape.embedding_length

    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(shape.name)
    writer.add_file_type(file_type)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(shape.block_count)
    writer.add_feed_forward_length(shape.feed_forward_length)
    writer.add_head_count(shape.head_count)
    writer.add_head_count_kv(shape.head_count_kv)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if pooling_type is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling_type))
    add_vocabulary(writer, shape.vocab_size, chat_template)

    def weight(rows: int, cols: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(dtype)

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)  # llama.cpp wants norms in f32

    writer.add_tensor("token_embd.weight", weight(vocab, n_embd, 1.0))
    for layer in range(shape.block_count):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", norm())
        writer.add_tensor(prefix + "attn_q.weight", weight(shape.head_count * hd, n_embd))
        writer.add_tensor(prefix + "attn_k.weight", weight(shape.head_count_kv * hd, n_embd))
        writer.add_tensor(prefix + "attn_v.weight", weight(shape.head_count_kv * hd, n_embd))
        writer.add_tensor(prefix + "attn_output.weight", weight(n_embd, shape.head_count * hd))
        writer.add_tensor(prefix + "ffn_norm.weight", norm())
        writer.add_tensor(prefix + "ffn_gate.weight", weight(shape.feed_forward_length, n_embd))
        writer.add_tensor(prefix + "ffn_up.weight", weight(shape.feed_forward_length, n_embd))
        writer.add_tensor(prefix + "ffn_down.weight", weight(n_embd, shape.feed_forward_length))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(vocab, n_embd, 0.5))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def cache_dir() -> Path:
    base = os.environ.get("PARALLAMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "parallama"
    )
    return Path(base)


def cached_demo_model(shape: ModelShape = DEMO_SHAPE, *, seed: int = 0) -> Path:
    """The demo model for ``shape``, generated on first use and reused afterwards."""
    path = cache_dir() / f"{shape.name}-{shape.digest(seed)}.gguf"
    if not path.exists():
        write_model(path, shape, seed=seed)
    return path
