"""What the planner needs to know about a model, read from its GGUF header.

A model is described by a :class:`ModelInfo`. It can come from three places:

* a local GGUF file, whose header alone is parsed by :mod:`.gguf_header` (tokenizer arrays are
  skipped, not decoded: a 152k-token header costs a few MB and a fraction of a second), so that
  tensor sizes are the real ones, per layer;
* an ``http(s)`` URL: the same reader over Range requests that grow geometrically up to a bound,
  so the weights are never downloaded;
* explicit metadata (a JSON object), for models that cannot be read at planning time.

Either way the metadata goes through llama.cpp's per-architecture rules (:mod:`.architectures`);
an architecture without rules is an :class:`UnsupportedModelError` naming it, never a guess.

Nothing here imports llama.cpp: the planner must run in the operator, where llama.cpp is absent.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from .architectures import CacheLayout, Hparams, cache_layout
from .errors import ModelSourceError, UnsupportedModelError
from .gguf_header import DEFAULT_MAX_HEADER_BYTES, GGUFHeader, RangeReader, read_gguf_header

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "EMBEDDING_POOLING",
    "ModelInfo",
    "ModelSourceError",
    "Task",
    "UnsupportedModelError",
    "model_info_from_gguf",
    "model_info_from_metadata",
    "model_info_from_url",
    "read_model_info",
]


_GGUF_MAGIC = b"GGUF"

Task = Literal["generate", "embed"]
EMBEDDING_POOLING = {1: "mean", 2: "cls", 3: "last"}
"""llama.cpp's ``llama_pooling_type`` values that make a model an embedding model for the runtime.
0 (none) and -1 (unspecified) leave a generative model; 4 (rank: rerankers) is refused."""


def _check_pooling(architecture: str, value: Any) -> None:
    """Refuse what the runtime cannot serve, as for an unknown architecture: a plan for a model the
    pod would refuse to load is worse than none."""
    if value is None:
        pooling = None
    else:
        try:
            pooling = int(value)
        except (TypeError, ValueError):
            raise UnsupportedModelError(f"{architecture}.pooling_type {value!r} is not a number") from None
    if pooling == 4:
        raise UnsupportedModelError(
            f"{architecture}.pooling_type is 4 (rank): rerankers are not supported, only embedding "
            "models (pooling mean, cls or last) and generative ones"
        )
    if pooling is not None and pooling not in (-1, 0, *EMBEDDING_POOLING):
        raise UnsupportedModelError(f"{architecture}.pooling_type {pooling} is not one llama.cpp knows")


class ModelInfo(BaseModel):
    """Shape and size of a model, everything the memory model depends on.

    ``metadata`` holds the GGUF key/values llama.cpp's loader reads (tokenizer arrays excluded), and
    :attr:`layout` is what llama.cpp keeps per layer for it, by the architecture's own rules (see
    :mod:`.architectures`); the scalar fields are a summary for people and for the compute estimate.
    ``layer_bytes`` holds the weight bytes of each repeating block; ``embedding_bytes`` is the token
    embedding table (llama.cpp keeps it in host memory) and ``output_bytes`` the output head and final
    norm (offloaded with the last layer). When a model has tied embeddings llama.cpp duplicates the
    embedding table as the output head, and so do we.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str
    name: str | None = None
    block_count: int = Field(gt=0)
    embedding_length: int = Field(gt=0)
    head_count: int = Field(ge=0)
    context_length: int = Field(gt=0)
    vocab_size: int = Field(default=32000, gt=0)
    feed_forward_length: int | None = None
    expert_count: int = 0
    expert_used_count: int = 0
    file_type: int | None = None
    size_bytes: int = Field(gt=0)
    layer_bytes: list[int]
    embedding_bytes: int = 0
    output_bytes: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict)
    """GGUF metadata with full key names (``llama.block_count``...), as the architecture rules read it."""
    source: str = ""

    _layout: CacheLayout = PrivateAttr()

    @model_validator(mode="after")
    def _consistent(self) -> ModelInfo:
        if len(self.layer_bytes) != self.block_count:
            raise ValueError(f"layer_bytes has {len(self.layer_bytes)} entries, expected {self.block_count}")
        _check_pooling(self.architecture, self.metadata.get(f"{self.architecture}.pooling_type"))
        self._layout = cache_layout(self.hparams)
        if len(self._layout.layers) != self.block_count:
            raise ValueError(
                f"the {self.architecture} rules gave {len(self._layout.layers)} layers, "
                f"expected {self.block_count}"
            )
        return self

    @property
    def hparams(self) -> Hparams:
        return Hparams(self.architecture, self.metadata)

    @property
    def layout(self) -> CacheLayout:
        """What llama.cpp keeps per layer: KV rows, recurrent state, sliding windows."""
        return self._layout

    @property
    def head_count_kv(self) -> int | list[int]:
        value = self.hparams.get("attention.head_count_kv", self.head_count)
        if isinstance(value, list):
            return value[0] if len(set(value)) == 1 else [int(v) for v in value]
        return int(value)

    @property
    def key_length(self) -> int:
        return max((layer.head_k for layer in self.layout.layers), default=0)

    @property
    def value_length(self) -> int:
        return max((layer.head_v for layer in self.layout.layers), default=0)

    @property
    def sliding_window(self) -> int | None:
        return self.layout.sliding_window or None

    @property
    def is_mla(self) -> bool:
        return self.layout.is_mla

    @property
    def pooling_type(self) -> int | None:
        """``{arch}.pooling_type`` (llama.cpp's ``hparams.pooling_type``): None when absent."""
        value = self.hparams.get("pooling_type")
        return None if value is None else int(value)

    @property
    def task(self) -> Task:
        """What a runtime serving this model does: ``embed`` when the GGUF pools its hidden states
        into one vector per input (mean, CLS or last token), ``generate`` otherwise. The runtime
        decides the same way at load, and creates an embedding context then (see
        :class:`~parallama_runtime.planning.memory.MemoryConfig`)."""
        return "embed" if self.pooling_type in EMBEDDING_POOLING else "generate"

    @property
    def pooling(self) -> str | None:
        """The pooling's name (``mean``, ``cls``, ``last``) for an embedding model, else None."""
        return EMBEDDING_POOLING.get(self.pooling_type or 0)

    @property
    def embedding_output_length(self) -> int:
        """llama.cpp's ``n_embd_out()``: ``embedding_length_out`` when set, else ``n_embd``."""
        return int(self.hparams.get("embedding_length_out") or self.embedding_length)

    def k_elements(self, layer: int) -> int:
        """Elements of one K row (one cache cell) in ``layer``, as llama.cpp's n_embd_k_gqa."""
        return self.layout.layers[layer].k_elements

    def v_elements(self, layer: int) -> int:
        """Elements of one V row; zero with MLA, where llama.cpp reads V as a view of the K cache."""
        return self.layout.layers[layer].v_elements


# --------------------------------------------------------------------------------------------------
# explicit metadata


_METADATA_KEYS = {
    # camelCase (the CRD's) -> (snake_case, GGUF key under the architecture)
    "blockCount": ("block_count", "block_count"),
    "embeddingLength": ("embedding_length", "embedding_length"),
    "headCount": ("head_count", "attention.head_count"),
    "headCountKv": ("head_count_kv", "attention.head_count_kv"),
    "keyLength": ("key_length", "attention.key_length"),
    "valueLength": ("value_length", "attention.value_length"),
    "keyLengthMla": ("key_length_mla", "attention.key_length_mla"),
    "valueLengthMla": ("value_length_mla", "attention.value_length_mla"),
    "contextLength": ("context_length", "context_length"),
    "vocabSize": ("vocab_size", "vocab_size"),
    "feedForwardLength": ("feed_forward_length", "feed_forward_length"),
    "expertCount": ("expert_count", "expert_count"),
    "expertUsedCount": ("expert_used_count", "expert_used_count"),
    "slidingWindow": ("sliding_window", "attention.sliding_window"),
    "kvLoraRank": ("kv_lora_rank", "attention.kv_lora_rank"),
    "ropeDimensionCount": ("rope_dimension_count", "rope.dimension_count"),
    "poolingType": ("pooling_type", "pooling_type"),
}
_POOLING_NAMES = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
"""``poolingType`` by name (the CRD's form) or by llama.cpp's number (the GGUF's)."""
_OTHER_KEYS = {"architecture", "name", "size_bytes", "sizeBytes", "gguf"}


def model_info_from_metadata(metadata: Mapping[str, Any], *, source: str = "metadata") -> ModelInfo:
    """Build a model from explicit metadata (snake_case or the CRD's camelCase keys).

    The keys are turned into the GGUF keys llama.cpp would read, so the same architecture rules apply
    as for a file. ``gguf`` may add raw GGUF key/values without the architecture prefix (for example
    ``{"attention.sliding_window_pattern": 6}``) for what the named keys do not cover. Without tensor
    sizes the weights are spread evenly over the layers and no bytes are assigned to the host-side
    embedding table: every byte counts against the GPUs, which errs on the safe side.
    """
    by_snake = {snake: (camel, gguf_key) for camel, (snake, gguf_key) in _METADATA_KEYS.items()}
    values: dict[str, Any] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if key in _METADATA_KEYS:
            key = _METADATA_KEYS[key][0]
        elif key == "sizeBytes":
            key = "size_bytes"
        if key not in by_snake and key not in _OTHER_KEYS:
            raise ModelSourceError(f"unknown model metadata key {key!r}")
        if key == "pooling_type" and isinstance(value, str):
            if value not in _POOLING_NAMES:
                raise ModelSourceError(
                    f"unknown poolingType {value!r} (one of {', '.join(_POOLING_NAMES)}, or a number)"
                )
            value = _POOLING_NAMES[value]
        values[key] = value
    required = [
        "architecture",
        "block_count",
        "embedding_length",
        "head_count",
        "context_length",
        "size_bytes",
    ]
    missing = [k for k in required if k not in values]
    if missing:
        raise ModelSourceError(f"model metadata lacks {', '.join(missing)}")
    arch = str(values["architecture"])
    gguf: dict[str, Any] = {"general.architecture": arch}
    for snake, (_, gguf_key) in by_snake.items():
        if snake in values:
            gguf[f"{arch}.{gguf_key}"] = values[snake]
    extra = values.get("gguf") or {}
    if not isinstance(extra, Mapping):
        raise ModelSourceError("model metadata 'gguf' must be an object of GGUF keys")
    for key, value in extra.items():
        gguf[key if key.startswith(("general.", f"{arch}.")) else f"{arch}.{key}"] = value
    try:
        blocks = int(values["block_count"])
        size = int(values["size_bytes"])
        per_layer = [size // blocks] * blocks
        per_layer[-1] += size - sum(per_layer)
        return ModelInfo(
            architecture=arch,
            name=values.get("name"),
            block_count=blocks,
            embedding_length=int(values["embedding_length"]),
            head_count=_scalar_max(values["head_count"]) or 0,
            context_length=int(values["context_length"]),
            vocab_size=int(values.get("vocab_size", 32000)),
            feed_forward_length=_scalar_max(values.get("feed_forward_length")),
            expert_count=int(values.get("expert_count", 0)),
            expert_used_count=int(values.get("expert_used_count", 0)),
            size_bytes=size,
            layer_bytes=per_layer,
            metadata=gguf,
            source=source,
        )
    except (ValidationError, TypeError, ValueError, ZeroDivisionError) as error:
        _raise_unsupported(error, source)
        raise ModelSourceError(f"invalid model metadata: {_first_error(error)}") from error


def _raise_unsupported(error: Exception, source: str) -> None:
    """Re-raise an :class:`UnsupportedModelError` that pydantic wrapped into a validation error."""
    cause: object = error
    if isinstance(error, ValidationError):
        cause = next((e.get("ctx", {}).get("error") for e in error.errors() if e.get("ctx")), None)
    if isinstance(cause, UnsupportedModelError):
        message = str(cause)
        raise UnsupportedModelError(
            message if message.startswith(source) else f"{source}: {message}"
        ) from error


def _first_error(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else str(first["msg"])
    return str(error)


# --------------------------------------------------------------------------------------------------
# GGUF files (local or remote): the header alone, read by the bounded reader


_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.")


def model_info_from_gguf(path: str | os.PathLike[str], *, source: str | None = None) -> ModelInfo:
    """Read a local GGUF file's header; tensor data are never read."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
            if magic != _GGUF_MAGIC:
                raise ModelSourceError(f"{path} is not a GGUF file (magic {magic!r})")
            handle.seek(0)
            header = read_gguf_header(handle)
    except OSError as error:
        raise ModelSourceError(f"cannot read model file {path}: {error.strerror or error}") from error
    except ModelSourceError as error:
        if str(path) in str(error):
            raise
        raise type(error)(f"{path}: {error}") from error
    return model_info_from_header(header, source=source or str(path))


def model_info_from_url(
    url: str,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    timeout: float = 30.0,
) -> ModelInfo:
    """Read a remote GGUF header with HTTP Range requests, fetching at most ``max_header_bytes``."""
    try:
        with RangeReader(url, max_bytes=max_header_bytes, timeout=timeout) as reader:
            header = read_gguf_header(reader)
    except ModelSourceError as error:
        if url in str(error):
            raise
        raise type(error)(f"{url}: {error}") from error
    return model_info_from_header(header, source=url)


def model_info_from_header(header: GGUFHeader, *, source: str) -> ModelInfo:
    """The planner's view of a parsed header: per-layer tensor bytes and the metadata the rules read."""
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelSourceError(f"{source}: GGUF header has no general.architecture")

    def key(name: str) -> Any:
        return meta.get(f"{arch}.{name}")

    block_count = key("block_count")
    embedding_length = key("embedding_length")
    if block_count is None or embedding_length is None:
        raise ModelSourceError(f"{source}: {arch} header lacks block_count or embedding_length")
    vocab_size = key("vocab_size") or header.array_lengths.get("tokenizer.ggml.tokens") or 32000

    layer_bytes = [0] * int(block_count)
    embedding_bytes = output_bytes = total = 0
    has_output = False
    for tensor in header.tensors:
        total += tensor.n_bytes
        match = _LAYER_TENSOR.match(tensor.name)
        if match and int(match.group(1)) < len(layer_bytes):
            layer_bytes[int(match.group(1))] += tensor.n_bytes
        elif tensor.name == "token_embd.weight":
            embedding_bytes += tensor.n_bytes
        else:
            has_output = has_output or tensor.name == "output.weight"
            output_bytes += tensor.n_bytes
    if not has_output:  # tied embeddings: llama.cpp loads a duplicate of token_embd as the output head
        output_bytes += embedding_bytes

    try:
        return ModelInfo(
            architecture=arch,
            name=meta.get("general.name"),
            block_count=int(block_count),
            embedding_length=int(embedding_length),
            head_count=_scalar_max(key("attention.head_count")) or 0,
            context_length=int(key("context_length") or 2048),
            vocab_size=int(vocab_size),
            feed_forward_length=_scalar_max(key("feed_forward_length")),
            expert_count=int(key("expert_count") or 0),
            expert_used_count=_scalar_max(key("expert_used_count")) or 0,
            file_type=meta.get("general.file_type"),
            size_bytes=max(total, 1),
            layer_bytes=layer_bytes,
            embedding_bytes=embedding_bytes,
            output_bytes=output_bytes,
            metadata=dict(meta),
            source=source,
        )
    except (ValidationError, UnsupportedModelError) as error:
        _raise_unsupported(error, source)
        raise ModelSourceError(f"{source}: inconsistent GGUF header: {_first_error(error)}") from error


def _scalar_max(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, list):
        return int(max(value)) if value else None
    return int(value)


# --------------------------------------------------------------------------------------------------


def read_model_info(source: str, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> ModelInfo:
    """Read a model from a GGUF path, an http(s) URL, or a ``.json`` metadata file."""
    if source.startswith(("http://", "https://")):
        return model_info_from_url(source, max_header_bytes=max_header_bytes)
    if source.startswith("file://"):
        source = source[len("file://") :]
    if source.endswith(".json"):
        try:
            metadata = json.loads(Path(source).read_text())
        except OSError as error:
            raise ModelSourceError(f"cannot read {source}: {error.strerror or error}") from error
        except json.JSONDecodeError as error:
            raise ModelSourceError(f"{source}: invalid JSON: {error}") from error
        if not isinstance(metadata, dict):
            raise ModelSourceError(f"{source}: model metadata must be a JSON object")
        return model_info_from_metadata(metadata, source=source)
    return model_info_from_gguf(source)
