"""What the planner needs to know about a model, read from its GGUF header.

A model is described by a :class:`ModelInfo`. It can come from three places:

* a local GGUF file, parsed by the ``gguf`` package's reader (the same code llama.cpp's own
  tooling uses), so that tensor sizes are the real ones, per layer;
* an ``http(s)`` URL: only the header is fetched, with Range requests that grow geometrically up to
  a bound, and the bytes are laid into a *sparse* file of the model's full length so the ``gguf``
  reader can parse them without the weights ever being downloaded;
* explicit metadata (a JSON object), for models that cannot be read at planning time.

Nothing here imports llama.cpp: the planner must run in the operator, where llama.cpp is absent.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "ModelInfo",
    "ModelSourceError",
    "model_info_from_gguf",
    "model_info_from_metadata",
    "model_info_from_url",
    "read_model_info",
]

DEFAULT_MAX_HEADER_BYTES = 64 * 1024 * 1024
"""Upper bound on how much of a remote file we read to find the end of its header.

Tokenizer arrays dominate GGUF headers: a 256k-token vocabulary with scores and merges is about
10 MiB, so 64 MiB is generous while still refusing to silently download a multi-GB file.
"""

_FIRST_RANGE_BYTES = 2 * 1024 * 1024
_GGUF_MAGIC = b"GGUF"


class ModelSourceError(ValueError):
    """The model could not be read: bad path, not GGUF, server without Range support, ..."""


class ModelInfo(BaseModel):
    """Shape and size of a model, everything the memory model depends on.

    ``head_count_kv`` may be a list with one entry per layer (some architectures vary it; a 0 means
    the layer keeps no KV cache). ``layer_bytes`` holds the weight bytes of each repeating block;
    ``embedding_bytes`` is the token embedding table (llama.cpp keeps it in host memory) and
    ``output_bytes`` the output head and final norm (offloaded with the last layer). When a model has
    tied embeddings llama.cpp duplicates the embedding table as the output head, and so do we.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: str
    name: str | None = None
    block_count: int = Field(gt=0)
    embedding_length: int = Field(gt=0)
    head_count: int = Field(gt=0)
    head_count_kv: int | list[int]
    key_length: int = Field(gt=0)
    value_length: int = Field(ge=0)
    context_length: int = Field(gt=0)
    vocab_size: int = Field(default=32000, gt=0)
    feed_forward_length: int | None = None
    expert_count: int = 0
    expert_used_count: int = 0
    sliding_window: int | None = None
    kv_lora_rank: int | None = None
    """Set for multi-head latent attention (DeepSeek 2/3): the cache then holds one compressed row."""
    rope_dimension_count: int | None = None
    file_type: int | None = None
    size_bytes: int = Field(gt=0)
    layer_bytes: list[int]
    embedding_bytes: int = 0
    output_bytes: int = 0
    source: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ModelInfo:
        if isinstance(self.head_count_kv, list) and len(self.head_count_kv) != self.block_count:
            raise ValueError(
                f"head_count_kv has {len(self.head_count_kv)} entries but the model has "
                f"{self.block_count} layers"
            )
        if len(self.layer_bytes) != self.block_count:
            raise ValueError(f"layer_bytes has {len(self.layer_bytes)} entries, expected {self.block_count}")
        return self

    def kv_heads(self, layer: int) -> int:
        if isinstance(self.head_count_kv, list):
            return self.head_count_kv[layer]
        return self.head_count_kv

    @property
    def is_mla(self) -> bool:
        return bool(self.kv_lora_rank)

    def k_elements(self, layer: int) -> int:
        """Elements of one K row (one cache cell) in ``layer``, as llama.cpp's n_embd_k_gqa."""
        if self.is_mla:
            heads = self.kv_heads(layer)
            return 0 if heads == 0 else int(self.kv_lora_rank or 0) + int(self.rope_dimension_count or 0)
        return self.key_length * self.kv_heads(layer)

    def v_elements(self, layer: int) -> int:
        """Elements of one V row; zero with MLA, where llama.cpp reads V as a view of the K cache."""
        if self.is_mla:
            return 0
        return self.value_length * self.kv_heads(layer)


# --------------------------------------------------------------------------------------------------
# explicit metadata


_METADATA_ALIASES = {
    "architecture": "architecture",
    "blockCount": "block_count",
    "embeddingLength": "embedding_length",
    "headCount": "head_count",
    "headCountKv": "head_count_kv",
    "keyLength": "key_length",
    "valueLength": "value_length",
    "contextLength": "context_length",
    "sizeBytes": "size_bytes",
    "vocabSize": "vocab_size",
    "feedForwardLength": "feed_forward_length",
    "expertCount": "expert_count",
    "expertUsedCount": "expert_used_count",
    "slidingWindow": "sliding_window",
    "kvLoraRank": "kv_lora_rank",
    "ropeDimensionCount": "rope_dimension_count",
    "name": "name",
}


def model_info_from_metadata(metadata: Mapping[str, Any], *, source: str = "metadata") -> ModelInfo:
    """Build a model from explicit metadata (snake_case or the CRD's camelCase keys).

    Without tensor sizes the weights are spread evenly over the layers and no bytes are assigned to
    the host-side embedding table: every byte counts against the GPUs, which errs on the safe side.
    """
    values: dict[str, Any] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        canonical = _METADATA_ALIASES.get(key, key)
        if canonical not in _METADATA_ALIASES.values():
            raise ModelSourceError(f"unknown model metadata key {key!r}")
        values[canonical] = value
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
    try:
        blocks = int(values["block_count"])
        head_count = int(values["head_count"])
        values.setdefault("head_count_kv", head_count)
        default_head = int(values["embedding_length"]) // max(head_count, 1)
        values.setdefault("key_length", default_head)
        values.setdefault("value_length", default_head)
        size = int(values["size_bytes"])
        per_layer = [size // blocks] * blocks
        per_layer[-1] += size - sum(per_layer)
        values["layer_bytes"] = per_layer
        return ModelInfo(source=source, **values)
    except (ValidationError, TypeError, ValueError, ZeroDivisionError) as error:
        raise ModelSourceError(f"invalid model metadata: {error}") from error


# --------------------------------------------------------------------------------------------------
# GGUF files


_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.")


def model_info_from_gguf(path: str | os.PathLike[str], *, source: str | None = None) -> ModelInfo:
    """Read a local GGUF file's header (tensor data are memory-mapped, never read)."""
    try:
        from gguf import GGUFReader
    except ImportError as error:  # pragma: no cover - gguf is a hard dependency
        raise ModelSourceError("the gguf package is required to read GGUF files") from error
    path = Path(path)
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ModelSourceError(f"cannot read model file {path}: {error.strerror or error}") from error
    if magic != _GGUF_MAGIC:
        raise ModelSourceError(f"{path} is not a GGUF file (magic {magic!r})")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError, TypeError) as error:
        raise ModelSourceError(f"{path}: malformed GGUF header: {error}") from error
    return _model_info_from_reader(reader, source=source or str(path))


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    return field.contents()


def _model_info_from_reader(reader: Any, *, source: str) -> ModelInfo:
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ModelSourceError(f"{source}: GGUF header has no general.architecture")

    def key(name: str) -> Any:
        return _field(reader, f"{arch}.{name}")

    block_count = key("block_count")
    embedding_length = key("embedding_length")
    head_count = key("attention.head_count")
    if block_count is None or embedding_length is None or head_count is None:
        raise ModelSourceError(f"{source}: {arch} header lacks block_count, embedding_length or head_count")
    if isinstance(head_count, list):  # per-layer query heads: the largest one sizes the compute graph
        head_count = max(head_count)
    head_count_kv = key("attention.head_count_kv")
    if head_count_kv is None:
        head_count_kv = head_count
    if isinstance(head_count_kv, list) and len(set(head_count_kv)) == 1:
        head_count_kv = head_count_kv[0]
    default_head = int(embedding_length) // int(head_count)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab_size = key("vocab_size") or (len(tokens.data) if tokens is not None else None) or 32000

    layer_bytes = [0] * int(block_count)
    embedding_bytes = output_bytes = total = 0
    has_output = False
    for tensor in reader.tensors:
        size = int(tensor.n_bytes)
        total += size
        match = _LAYER_TENSOR.match(tensor.name)
        if match and int(match.group(1)) < len(layer_bytes):
            layer_bytes[int(match.group(1))] += size
        elif tensor.name == "token_embd.weight":
            embedding_bytes += size
        else:
            has_output = has_output or tensor.name == "output.weight"
            output_bytes += size
    if not has_output:  # tied embeddings: llama.cpp loads a duplicate of token_embd as the output head
        output_bytes += embedding_bytes

    try:
        return ModelInfo(
            architecture=arch,
            name=_field(reader, "general.name"),
            block_count=int(block_count),
            embedding_length=int(embedding_length),
            head_count=int(head_count),
            head_count_kv=head_count_kv,
            key_length=int(key("attention.key_length") or default_head),
            value_length=int(key("attention.value_length") or default_head),
            context_length=int(key("context_length") or 2048),
            vocab_size=int(vocab_size),
            feed_forward_length=_scalar_max(key("feed_forward_length")),
            expert_count=int(key("expert_count") or 0),
            expert_used_count=int(key("expert_used_count") or 0),
            sliding_window=key("attention.sliding_window"),
            kv_lora_rank=key("attention.kv_lora_rank"),
            rope_dimension_count=key("rope.dimension_count"),
            file_type=_field(reader, "general.file_type"),
            size_bytes=max(total, 1),
            layer_bytes=layer_bytes,
            embedding_bytes=embedding_bytes,
            output_bytes=output_bytes,
            source=source,
        )
    except ValidationError as error:
        raise ModelSourceError(f"{source}: inconsistent GGUF header: {error}") from error


def _scalar_max(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, list):
        return int(max(value)) if value else None
    return int(value)


# --------------------------------------------------------------------------------------------------
# remote GGUF files


def model_info_from_url(
    url: str,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    timeout: float = 30.0,
) -> ModelInfo:
    """Read a remote GGUF header with HTTP Range requests, fetching at most ``max_header_bytes``.

    The fetched prefix is written into a sparse temporary file as long as the whole model; the gguf
    reader then parses it. The header is complete once the reader's data offset lies inside the
    fetched prefix; until then the range doubles.
    """
    fetched = b""
    total_size: int | None = None
    want = min(_FIRST_RANGE_BYTES, max_header_bytes)
    while True:
        chunk, total_size = _fetch_range(url, len(fetched), want - 1, timeout=timeout)
        fetched += chunk
        if len(fetched) >= 4 and fetched[:4] != _GGUF_MAGIC:
            raise ModelSourceError(f"{url} is not a GGUF file (magic {fetched[:4]!r})")
        info = _try_parse_prefix(fetched, total_size, source=url)
        if info is not None:
            return info
        if len(fetched) >= total_size:
            raise ModelSourceError(f"{url}: malformed GGUF header (file ends before its header does)")
        if want >= max_header_bytes:
            raise ModelSourceError(
                f"{url}: GGUF header is larger than the {max_header_bytes} byte bound; "
                "raise the bound or give the model's metadata explicitly"
            )
        want = min(want * 2, max_header_bytes, total_size)


def _fetch_range(url: str, start: int, end: int, *, timeout: float) -> tuple[bytes, int]:
    request = urllib.request.Request(
        url, headers={"Range": f"bytes={start}-{end}", "User-Agent": "parallama"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status != 206:
                raise ModelSourceError(
                    f"{url}: the server ignored the Range request (HTTP {response.status}); "
                    "refusing to download the whole model just to read its header"
                )
            content_range = response.headers.get("Content-Range", "")
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", content_range.strip())
            if not match or int(match.group(1)) != start:
                raise ModelSourceError(f"{url}: unexpected Content-Range {content_range!r}")
            body: bytes = response.read(end - start + 1)
            return body, int(match.group(3))
    except urllib.error.HTTPError as error:
        if error.code == 416:  # asked past the end: the file is shorter than the header claims
            raise ModelSourceError(f"{url}: file ends before its GGUF header does") from error
        raise ModelSourceError(f"{url}: HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        raise ModelSourceError(f"{url}: {error.reason}") from error
    except TimeoutError as error:
        raise ModelSourceError(f"{url}: timed out") from error


def _try_parse_prefix(prefix: bytes, total_size: int, *, source: str) -> ModelInfo | None:
    """Parse ``prefix`` as the start of a ``total_size`` byte GGUF file; None if it is too short."""
    from gguf import GGUFReader

    with tempfile.NamedTemporaryFile(suffix=".gguf") as sparse:
        sparse.write(prefix)
        sparse.truncate(total_size)  # a hole, not zeros on disk
        sparse.flush()
        try:
            reader = GGUFReader(sparse.name)
        except (ValueError, IndexError, KeyError, OverflowError, MemoryError, TypeError):
            return None
        if reader.data_offset > len(prefix):  # the parse ran into the hole: read more
            return None
        return _model_info_from_reader(reader, source=source)


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
