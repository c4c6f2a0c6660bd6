"""A bounded reader for GGUF headers: what the planner needs, without the tokenizer.

The ``gguf`` package's ``GGUFReader`` turns every element of every array into numpy objects. A
Qwen2.5-sized header (152k tokens, 151k merges, ~6.8 MB) then costs ~10 s of CPU and ~540 MB of
memory, far beyond what the operator may spend on a plan. This reader walks the header with
``struct`` over a small sliding buffer and keeps only what planning reads:

* every scalar, as a python value;
* arrays as python lists, except *skipped* arrays: those whose key starts with ``tokenizer.``
  (vocabulary, merges, scores, token types: the bulk of every header, never needed to plan) and any
  other array longer than :data:`MAX_KEPT_ARRAY_LENGTH` elements. Per-layer arrays (head counts,
  feed-forward lengths, sliding-window patterns) have one entry per layer, a few hundred at most,
  so the limit keeps all of them while refusing to materialise an unexpected tokenizer-sized table
  under another prefix. Skipped arrays are walked, not decoded: a string array is stepped over
  string by string (each is length-prefixed), a numeric array in one step of count * item size (a
  seek where the source is a seekable file). The length of every array, skipped or not, is kept in
  :attr:`GGUFHeader.array_lengths`;
* every tensor's name, shape, type, offset and size in bytes.

Remote files are read through :class:`RangeReader`, a file-like object that fetches HTTP ranges on
demand, so only the header's bytes travel (plus the tail of the last range) and never more than a
bound. Corrupt or hostile headers are refused with :class:`ModelSourceError` before anything large
is allocated: counts and lengths are checked against hard limits and, when the file size is known,
against the bytes that remain.

Only GGUF v2 and v3 little-endian files are read (llama.cpp dropped v1 long ago; big-endian files
are for big-endian hosts). Nothing here imports llama.cpp.
"""

from __future__ import annotations

import functools
import http.client
import os
import re
import struct
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from types import TracebackType
from typing import Any, Protocol

from gguf import GGML_QUANT_SIZES

from parallama_runtime.planning.errors import ModelSourceError

__all__ = [
    "DEFAULT_ALIGNMENT",
    "DEFAULT_MAX_HEADER_BYTES",
    "MAX_KEPT_ARRAY_LENGTH",
    "GGUFHeader",
    "RangeReader",
    "TensorInfo",
    "read_gguf_header",
]

DEFAULT_MAX_HEADER_BYTES = 64 * 1024 * 1024
"""Upper bound on the bytes :class:`RangeReader` fetches by default.

Tokenizer arrays dominate GGUF headers: a 256k-token vocabulary with scores and merges is about
10 MiB, so 64 MiB is generous while still refusing to silently download a multi-GB file.
"""

DEFAULT_ALIGNMENT = 32
"""Alignment of the tensor data when the header has no ``general.alignment``."""

MAX_KEPT_ARRAY_LENGTH = 4096
"""Arrays longer than this (outside ``tokenizer.``) are skipped rather than materialised.

Arrays that planning reads hold one entry per layer, and the deepest models have a few hundred
layers; anything longer is a vocabulary-like table that costs memory and tells the planner nothing.
"""

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses tensors with more dimensions
_MAX_NAME_BYTES = 64 * 1024  # keys and tensor names (llama.cpp's tensor names are at most 63 bytes)
_MAX_KEPT_BYTES = 16 * 1024 * 1024  # all kept values together; a chat template is tens of KB
_MAX_KV_COUNT = 1 << 16  # real headers have tens of keys
_MAX_TENSOR_COUNT = 1 << 20  # the largest MoE files have a few thousand tensors
_MAX_ARRAY_LENGTH = 1 << 32  # the largest vocabularies have a few hundred thousand entries
_READ_CHUNK = 1024 * 1024  # what the buffer reads ahead from its source

# GGUF value types (gguf's GGUFValueType): struct format and size of the fixed-size ones
_TYPE_STRING = 8
_TYPE_ARRAY = 9
_FIXED_TYPES: dict[int, tuple[str, int]] = {
    0: ("B", 1),  # uint8
    1: ("b", 1),  # int8
    2: ("H", 2),  # uint16
    3: ("h", 2),  # int16
    4: ("I", 4),  # uint32
    5: ("i", 4),  # int32
    6: ("f", 4),  # float32
    7: ("?", 1),  # bool
    10: ("Q", 8),  # uint64
    11: ("q", 8),  # int64
    12: ("d", 8),  # float64
}
_UINT32 = struct.Struct("<I")
_UINT64 = struct.Struct("<Q")
_TENSOR_TAIL = struct.Struct("<IQ")  # ggml type, offset


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file, as its header describes it."""

    name: str
    shape: tuple[int, ...]
    """Dimensions in ggml order (``ne``: the fastest-varying first), as stored in the file."""
    ggml_type: int
    """A ``gguf.GGMLQuantizationType`` value."""
    offset: int
    """Offset of the tensor's data relative to :attr:`GGUFHeader.data_offset`, as stored in the file."""
    n_bytes: int
    """Size of the tensor's data: elements / block size * type size, from ``gguf.GGML_QUANT_SIZES``."""

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class GGUFHeader:
    """The parts of a GGUF header that planning needs.

    ``metadata`` holds every key/value pair except skipped arrays (see the module's docstring);
    ``array_lengths`` holds the length of every array, skipped or not, so that e.g. the vocabulary
    size is ``array_lengths["tokenizer.ggml.tokens"]``.
    """

    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[TensorInfo]
    data_offset: int
    """Absolute offset of the tensor data: the end of the header aligned to ``general.alignment``."""


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


# --------------------------------------------------------------------------------------------------
# parsing


class _Buffer:
    """Sequential reads over ``source`` through a small sliding window.

    Only the bytes being decoded are held: reads ahead are at most :data:`_READ_CHUNK`, and skipping
    reads through without keeping anything. Short reads from the source are fine (b"" means EOF).
    """

    def __init__(
        self, source: _Readable, name: str, size: int | None, seek: Callable[[int, int], int] | None = None
    ) -> None:
        self.source = source
        self.name = name
        self.size = size  # total bytes of the source, when known, to refuse absurd lengths early
        self.seek = seek if size is not None else None  # to skip without reading, within a known size
        self.data = b""
        self.pos = 0  # index of the next byte in data
        self.base = 0  # absolute offset of data[0]
        self.kept = 0  # bytes of values materialised so far, bounded by _MAX_KEPT_BYTES

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def remaining(self) -> int | None:
        size = self.size
        if size is None:
            size = getattr(self.source, "size", None)  # a RangeReader learns it on its first fetch
            if not isinstance(size, int):
                return None
        return size - self.offset

    def truncated(self) -> ModelSourceError:
        return ModelSourceError(f"{self.name}: file ends before its header does (at byte {self.offset})")

    def refuse(self, what: str) -> ModelSourceError:
        return ModelSourceError(f"{self.name}: malformed GGUF header at byte {self.offset}: {what}")

    def check_fits(self, count: int, item_bytes: int, what: str, limit: int) -> None:
        """Refuse ``count`` items of at least ``item_bytes`` each before anything is allocated."""
        if count > limit:
            raise self.refuse(f"{what} is {count}, more than the {limit} this reader accepts")
        remaining = self.remaining()
        if remaining is not None and count * item_bytes > remaining:  # truncated, or a corrupt count
            raise ModelSourceError(
                f"{self.name}: file ends before its header does: at byte {self.offset}, {what} is "
                f"{count}, but only {max(remaining, 0)} bytes remain"
            )

    def fill(self, n: int) -> None:
        """Make at least ``n`` bytes available from ``pos`` on."""
        if not self.fill_upto(n):
            raise self.truncated()

    def fill_upto(self, n: int) -> bool:
        """Make up to ``n`` bytes available from ``pos`` on; False if the source ends first."""
        have = len(self.data) - self.pos
        if have >= n:
            return True
        parts = [self.data[self.pos :]]
        while have < n:
            chunk = self.source.read(_READ_CHUNK)
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        self.base += self.pos
        self.data = b"".join(parts)
        self.pos = 0
        return have >= n

    def take(self, n: int) -> bytes:
        self.fill(n)
        start = self.pos
        self.pos = start + n
        return self.data[start : self.pos]

    def u32(self) -> int:
        self.fill(4)
        (value,) = _UINT32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def u64(self) -> int:
        self.fill(8)
        (value,) = _UINT64.unpack_from(self.data, self.pos)
        self.pos += 8
        return int(value)

    def skip(self, n: int) -> None:
        """Step over ``n`` bytes without keeping them."""
        have = len(self.data) - self.pos
        if n <= have:
            self.pos += n
            return
        remaining = self.remaining()
        if remaining is not None and n > remaining:
            raise self.truncated()
        n -= have
        self.base += len(self.data)
        self.data = b""
        self.pos = 0
        if self.seek is not None:  # the size is known: n bytes are there
            self.seek(n, os.SEEK_CUR)
            self.base += n
            return
        while n > 0:
            chunk = self.source.read(min(n, _READ_CHUNK))
            if not chunk:
                raise self.truncated()
            self.base += len(chunk)
            n -= len(chunk)

    def name_string(self, what: str) -> str:
        length = self.u64()
        self.check_fits(length, 1, f"the length of a {what}", _MAX_NAME_BYTES)
        raw = self.take(length)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise self.refuse(f"{what} {raw[:64]!r} is not UTF-8") from error

    def keep(self, n: int, what: str) -> None:
        """Account for ``n`` bytes about to be materialised; refuse past :data:`_MAX_KEPT_BYTES`."""
        self.check_fits(n, 1, what, _MAX_KEPT_BYTES - self.kept)
        self.kept += n

    def value_string(self) -> str:
        length = self.u64()
        self.keep(length, "the length of a string")
        return self.take(length).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Step over ``count`` length-prefixed strings without decoding them."""
        unpack_from = _UINT64.unpack_from
        for _ in range(count):
            if len(self.data) - self.pos < 8:
                self.fill(8)
            (length,) = unpack_from(self.data, self.pos)
            end = self.pos + 8 + length
            if end <= len(self.data):
                self.pos = end
            else:
                self.pos += 8
                self.skip(length)


def _read_value(buffer: _Buffer, value_type: int, key: str) -> Any:
    if value_type == _TYPE_STRING:
        return buffer.value_string()
    fixed = _FIXED_TYPES.get(value_type)
    if fixed is None:
        raise buffer.refuse(f"key {key!r} has unknown value type {value_type}")
    fmt, size = fixed
    buffer.fill(size)
    (value,) = struct.unpack_from("<" + fmt, buffer.data, buffer.pos)
    buffer.pos += size
    return value


def _read_array(buffer: _Buffer, key: str, metadata: dict[str, Any], lengths: dict[str, int]) -> None:
    item_type = buffer.u32()
    count = buffer.u64()
    if item_type == _TYPE_ARRAY:
        raise buffer.refuse(f"key {key!r} is an array of arrays, which llama.cpp does not read either")
    fixed = _FIXED_TYPES.get(item_type)
    if fixed is None and item_type != _TYPE_STRING:
        raise buffer.refuse(f"array {key!r} has unknown element type {item_type}")
    item_bytes = fixed[1] if fixed is not None else 8  # a string is at least its 8-byte length
    buffer.check_fits(count, item_bytes, f"the length of array {key!r}", _MAX_ARRAY_LENGTH)
    lengths[key] = count
    skip = key.startswith("tokenizer.") or count > MAX_KEPT_ARRAY_LENGTH
    if fixed is not None:
        fmt, size = fixed
        if skip:
            buffer.skip(count * size)
        else:
            buffer.keep(count * size, f"the size of array {key!r}")
            buffer.fill(count * size)
            metadata[key] = list(struct.unpack_from(f"<{count}{fmt}", buffer.data, buffer.pos))
            buffer.pos += count * size
    elif skip:
        buffer.skip_strings(count)
    else:
        metadata[key] = [buffer.value_string() for _ in range(count)]


def _parse(buffer: _Buffer) -> GGUFHeader:
    buffer.fill_upto(8)
    magic = buffer.data[buffer.pos : buffer.pos + 4]
    if magic != _MAGIC:
        if len(magic) < 4 and _MAGIC.startswith(magic):
            raise buffer.truncated()
        raise ModelSourceError(f"{buffer.name} is not a GGUF file (magic {magic!r})")
    buffer.pos += 4
    buffer.fill(4)
    (version,) = _UINT32.unpack_from(buffer.data, buffer.pos)
    if version & 0xFFFF == 0 and version != 0:
        raise ModelSourceError(
            f"{buffer.name} is a big-endian GGUF file; only little-endian files can be read "
            "(convert it on a little-endian host)"
        )
    if version == 1:
        raise ModelSourceError(
            f"{buffer.name} is a GGUF v1 file, which llama.cpp no longer loads; convert it to GGUF v3"
        )
    if version not in _SUPPORTED_VERSIONS:
        raise ModelSourceError(f"{buffer.name}: unsupported GGUF version {version} (v2 and v3 are read)")
    buffer.pos += 4
    tensor_count = buffer.u64()
    kv_count = buffer.u64()
    # a key/value pair takes at least 13 bytes (key length, type, one byte); tensor info 24
    buffer.check_fits(kv_count, 13, "the key/value count", _MAX_KV_COUNT)
    buffer.check_fits(tensor_count, 24, "the tensor count", _MAX_TENSOR_COUNT)

    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(kv_count):
        key = buffer.name_string("key")
        if key in metadata or key in lengths:
            raise buffer.refuse(f"key {key!r} appears twice")
        value_type = buffer.u32()
        if value_type == _TYPE_ARRAY:
            _read_array(buffer, key, metadata, lengths)
        else:
            metadata[key] = _read_value(buffer, value_type, key)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise buffer.refuse(f"general.alignment {alignment!r} is not a power of two")

    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for _ in range(tensor_count):
        name = buffer.name_string("tensor name")
        if name in names:
            raise buffer.refuse(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = buffer.u32()
        if n_dims > _MAX_DIMS:
            raise buffer.refuse(f"tensor {name!r} has {n_dims} dimensions, more than {_MAX_DIMS}")
        buffer.fill(8 * n_dims + _TENSOR_TAIL.size)
        shape = struct.unpack_from(f"<{n_dims}Q", buffer.data, buffer.pos)
        buffer.pos += 8 * n_dims
        ggml_type, offset = _TENSOR_TAIL.unpack_from(buffer.data, buffer.pos)
        buffer.pos += _TENSOR_TAIL.size
        sizes = GGML_QUANT_SIZES.get(ggml_type)
        if sizes is None:
            raise buffer.refuse(f"tensor {name!r} has unknown ggml type {ggml_type}")
        block_size, type_size = sizes
        if shape and shape[0] % block_size:
            raise buffer.refuse(
                f"tensor {name!r}: its first dimension {shape[0]} is not a multiple of its type's "
                f"block size {block_size}"
            )
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        tensors.append(
            TensorInfo(
                name=name,
                shape=tuple(int(dim) for dim in shape),
                ggml_type=int(ggml_type),
                offset=int(offset),
                n_bytes=n_elements * type_size // block_size,
            )
        )

    end = buffer.offset
    data_offset = end + (-end % alignment)
    return GGUFHeader(
        version=int(version),
        metadata=metadata,
        array_lengths=lengths,
        tensors=tensors,
        data_offset=data_offset,
    )


def read_gguf_header(source: str | os.PathLike[str] | _Readable) -> GGUFHeader:
    """Read the header of a GGUF file: a path, or a binary file-like object with ``read()``.

    A file-like object is read from its current position, which must be the file's start; it is
    not closed. Only the header's bytes are read (plus at most a read-ahead chunk). Raises
    :class:`ModelSourceError` when the source is not a readable, well-formed GGUF v2/v3 header.
    """
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        try:
            with open(path, "rb", buffering=0) as handle:
                size = os.fstat(handle.fileno()).st_size
                return _parse(_Buffer(handle, path, size, handle.seek))
        except OSError as error:
            raise ModelSourceError(f"cannot read model file {path}: {error.strerror or error}") from error
    name = getattr(source, "name", None)
    name = str(name) if name is not None else "GGUF stream"
    seekable: Any = getattr(source, "seekable", None)
    if seekable is not None and seekable():  # a local file or a BytesIO: learn its size
        stream: Any = source
        try:
            start = stream.tell()
            size = stream.seek(0, os.SEEK_END) - start
            stream.seek(start)
        except (OSError, ValueError) as error:
            raise ModelSourceError(f"cannot read {name}: {error}") from error
        return _parse(_Buffer(source, name, size, stream.seek))
    return _parse(_Buffer(source, name, None))


# --------------------------------------------------------------------------------------------------
# remote files


@functools.cache
def _user_agent() -> str:
    try:
        return f"parallama/{importlib_metadata.version('parallama')}"
    except importlib_metadata.PackageNotFoundError:
        return "parallama"


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class RangeReader:
    """A read-only file over an http(s) URL that fetches byte ranges as they are read.

    Each range is requested with ``Range: bytes=a-b``; the first is ``first_range`` bytes long and
    each next one twice the previous, so a header of n bytes takes O(log n) requests. A range's body
    is streamed, not buffered: memory stays small whatever the range size. At most ``max_bytes``
    are requested in total; reading past that raises :class:`ModelSourceError`. A server that
    answers without HTTP 206 and a matching ``Content-Range`` is refused rather than read: the
    whole model would follow. ``size`` is the file's length, known after the first request.
    """

    def __init__(
        self,
        url: str,
        *,
        max_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        timeout: float = 30.0,
        first_range: int = 2 * 1024 * 1024,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ModelSourceError(f"{url}: only http(s) URLs can be read by range")
        if max_bytes <= 0 or first_range <= 0:
            raise ValueError("max_bytes and first_range must be positive")
        self.url = url
        self.name = url
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.size: int | None = None
        self.requested = 0  # bytes asked for so far: the sum of the ranges
        self.requests = 0
        self._next_range = first_range
        self._position = 0
        self._response: http.client.HTTPResponse | None = None
        self._response_left = 0  # bytes of the current range not read yet
        self._user_agent = _user_agent()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None
            self._response_left = 0

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1, /) -> bytes:
        """Read up to ``size`` bytes, b"" at the end of the file (or of the file's ``size``).

        Reads are short at the end of a range: a read never starts a new request once it has bytes
        (a negative ``size`` reads to the end of the current range).
        """
        if size == 0:
            return b""
        if self._response_left == 0:
            if self.size is not None and self._position >= self.size:
                return b""
            self._open_next_range()
        want = self._response_left if size < 0 else min(size, self._response_left)
        assert self._response is not None
        try:
            data = self._response.read(want)
        except TimeoutError as error:
            raise ModelSourceError(f"{self.url}: timed out after {self.timeout:g} s") from error
        except (OSError, http.client.HTTPException) as error:
            raise ModelSourceError(f"{self.url}: reading the response failed: {error}") from error
        if not data:
            raise ModelSourceError(f"{self.url}: the server closed the connection in the middle of a range")
        self._position += len(data)
        self._response_left -= len(data)
        if self._response_left == 0:
            self.close()
        return data

    def _open_next_range(self) -> None:
        self.close()
        start = self._position
        budget = self.max_bytes - self.requested
        if budget <= 0:
            raise ModelSourceError(
                f"{self.url}: the GGUF header is larger than the {self.max_bytes} byte bound; "
                "raise the bound or give the model's metadata explicitly"
            )
        length = min(self._next_range, budget)
        if self.size is not None:
            length = min(length, self.size - start)
        end = start + length - 1
        request = urllib.request.Request(
            self.url, headers={"Range": f"bytes={start}-{end}", "User-Agent": self._user_agent}
        )
        self.requests += 1
        self.requested += length
        self._next_range *= 2
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            error.close()
            if error.code == 416:  # asked past the end: the file is shorter than its header
                raise ModelSourceError(f"{self.url}: file ends before its header does") from error
            raise ModelSourceError(f"{self.url}: HTTP {error.code} {error.reason}") from error
        except urllib.error.URLError as error:
            raise ModelSourceError(f"{self.url}: {error.reason}") from error
        except TimeoutError as error:
            raise ModelSourceError(f"{self.url}: timed out after {self.timeout:g} s") from error
        except (OSError, http.client.HTTPException) as error:
            raise ModelSourceError(f"{self.url}: {error}") from error
        try:
            if response.status != 206:
                raise ModelSourceError(
                    f"{self.url}: the server ignored the Range request (HTTP {response.status}); "
                    "refusing to download the whole model just to read its header"
                )
            content_range = response.headers.get("Content-Range", "")
            match = _CONTENT_RANGE.fullmatch(content_range.strip())
            if not match or int(match.group(1)) != start or not start <= int(match.group(2)) <= end:
                raise ModelSourceError(
                    f"{self.url}: unexpected Content-Range {content_range!r} for bytes {start}-{end}"
                )
        except BaseException:
            response.close()
            raise
        self.size = int(match.group(3))
        self._response = response
        self._response_left = int(match.group(2)) - start + 1
