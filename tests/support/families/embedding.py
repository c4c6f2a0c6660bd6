"""Tiny embedding models: decoder families whose GGUF sets ``{arch}.pooling_type``.

llama.cpp reads the pooling type into ``hparams.pooling_type``; a context created with
``embeddings = true`` then appends ``build_pooling`` (mean, cls or last) to the architecture's own
graph, whose logits stay in it (``src/models/llama.cpp`` builds them for pooled contexts too). The
runtime serves such a model as an embedding model (docs/memory-model.md, "Embedding models"). Rank
pooling (rerankers) is written too, for the refusal tests.
"""

from __future__ import annotations

from pathlib import Path

from gguf import PoolingType

from . import family
from .common import model_writer
from .dense import Shape, _attention, _embeddings, _ffn, _keys

__all__ = ["write_embedding_model"]

LLAMA = Shape(n_layer=4, n_embd=256, n_head=8, n_head_kv=2, n_ff=512)
QWEN3 = Shape(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, head_k=64)


def write_embedding_model(
    path: Path, pooling: PoolingType, *, arch: str = "llama", shape: Shape = LLAMA, tied: bool = False
) -> Path:
    """A llama (or qwen3: Q/K norms) model with ``pooling_type`` = ``pooling``."""
    with model_writer(path, arch) as w:
        _keys(w, shape)
        w.gguf.add_pooling_type(pooling)
        _embeddings(w, shape, tied=tied)
        for il in range(shape.n_layer):
            _attention(w, shape, il, qk_norm=arch == "qwen3")
            _ffn(w, shape, il)
    return path


@family("llama-embed-mean", "llama", "dense", "gqa", "embedding")
def llama_embed_mean(path: Path) -> Path:
    return write_embedding_model(path, PoolingType.MEAN)


@family("llama-embed-cls", "llama", "dense", "gqa", "embedding")
def llama_embed_cls(path: Path) -> Path:
    return write_embedding_model(path, PoolingType.CLS)


@family("llama-embed-last", "llama", "dense", "gqa", "embedding")
def llama_embed_last(path: Path) -> Path:
    return write_embedding_model(path, PoolingType.LAST)


@family("qwen3-embed-last", "qwen3", "dense", "gqa", "tied", "embedding")
def qwen3_embed_last(path: Path) -> Path:
    """Qwen3-Embedding's form: qwen3, last-token pooling, tied embeddings."""
    return write_embedding_model(path, PoolingType.LAST, arch="qwen3", shape=QWEN3, tied=True)


@family("llama-rank", "llama", "dense", "gqa", "rank")
def llama_rank(path: Path) -> Path:
    """A reranker's pooling (4): refused by the planner and the runtime."""
    return write_embedding_model(path, PoolingType.RANK)
