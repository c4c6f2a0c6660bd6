"""The bounded GGUF header reader, against files written (and read) by the gguf package itself."""

from __future__ import annotations

import contextlib
import io
import random
import re
import shutil
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parallama_runtime.planning.errors import ModelSourceError
from parallama_runtime.planning.gguf_header import (
    MAX_KEPT_ARRAY_LENGTH,
    GGUFHeader,
    RangeReader,
    read_gguf_header,
)

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _write(path: Path, fill: Any, *, endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> Path:
    writer = gguf.GGUFWriter(path, "llama", endianess=endianess)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rich(writer: gguf.GGUFWriter) -> None:
    """Every scalar type, small arrays, per-layer arrays, and f32/f16/q8_0 tensors."""
    writer.add_uint8("test.u8", 200)
    writer.add_int8("test.i8", -100)
    writer.add_uint16("test.u16", 60000)
    writer.add_int16("test.i16", -30000)
    writer.add_uint32("test.u32", 4_000_000_000)
    writer.add_int32("test.i32", -2_000_000_000)
    writer.add_float32("test.f32", 0.1)
    writer.add_uint64("test.u64", 2**63 + 5)
    writer.add_int64("test.i64", -(2**62))
    writer.add_float64("test.f64", 1e-300)
    writer.add_bool("test.true", True)
    writer.add_bool("test.false", False)
    writer.add_string("test.unicode", "naïve — 日本語 🦙")
    writer.add_array("test.strings", ["a", "", "ünï", "x" * 300])
    writer.add_array("test.floats", [0.5, -1.25, 3.0])
    writer.add_key_value("test.bools", [True, False, True], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)
    writer.add_key_value("test.i16s", [-1, 2, -3], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT16)
    writer.add_block_count(80)
    writer.add_embedding_length(64)
    writer.add_head_count([8] * 80)
    writer.add_head_count_kv([0 if i % 4 == 3 else 2 for i in range(80)])  # per-layer, some layers without KV
    writer.add_feed_forward_length([128 + i for i in range(80)])
    writer.add_context_length(4096)
    writer.add_name("rich")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"tok{i}" for i in range(300)])
    writer.add_token_scores([float(i) for i in range(300)])
    writer.add_token_types([1] * 300)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((300, 64), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64, dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float16))
    writer.add_tensor(
        "blk.0.odd.weight", rng.standard_normal((3, 5, 7)).astype(np.float16)
    )  # odd sizes: padding
    q8 = gguf.quantize(rng.standard_normal((96, 64), dtype=np.float32), Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", q8, raw_shape=q8.shape, raw_dtype=Q8_0)
    writer.add_tensor("output.weight", rng.standard_normal((300, 64)).astype(np.float16))


@pytest.fixture
def rich_model(tmp_path: Path) -> Path:
    return _write(tmp_path / "rich.gguf", _rich)


def _assert_matches_gguf_reader(path: Path, header: GGUFHeader) -> None:
    reader = gguf.GGUFReader(path)
    assert header.data_offset == reader.data_offset
    assert header.version == reader.fields["GGUF.version"].contents()
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert ours.shape == tuple(int(d) for d in theirs.shape)
        assert ours.ggml_type == int(theirs.tensor_type)
        assert ours.n_bytes == theirs.n_bytes
        assert ours.n_elements == theirs.n_elements
        assert header.data_offset + ours.offset == theirs.data_offset
    keys = [key for key in reader.fields if not key.startswith("GGUF.")]
    assert sorted(keys) == sorted(header.array_lengths.keys() | header.metadata.keys())
    for key in keys:
        field = reader.fields[key]
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            assert header.array_lengths[key] == len(field.data)
        if key in header.metadata:
            assert header.metadata[key] == field.contents(), key


def test_round_trip_against_gguf_reader(rich_model: Path) -> None:
    header = read_gguf_header(rich_model)
    _assert_matches_gguf_reader(rich_model, header)
    meta = header.metadata
    assert header.version == 3
    assert meta["general.architecture"] == "llama"
    assert (meta["test.u8"], meta["test.i8"], meta["test.u16"], meta["test.i16"]) == (
        200,
        -100,
        60000,
        -30000,
    )
    assert (meta["test.u32"], meta["test.i32"]) == (4_000_000_000, -2_000_000_000)
    assert (meta["test.u64"], meta["test.i64"]) == (2**63 + 5, -(2**62))
    assert meta["test.f32"] == pytest.approx(0.1) and meta["test.f64"] == 1e-300
    assert meta["test.true"] is True and meta["test.false"] is False
    assert meta["test.unicode"] == "naïve — 日本語 🦙"
    assert meta["test.strings"] == ["a", "", "ünï", "x" * 300]
    assert meta["test.floats"] == [0.5, -1.25, 3.0]
    assert meta["test.bools"] == [True, False, True]
    assert meta["test.i16s"] == [-1, 2, -3]
    assert meta["llama.attention.head_count_kv"] == [0 if i % 4 == 3 else 2 for i in range(80)]
    assert meta["llama.feed_forward_length"][-1] == 207
    assert header.array_lengths["llama.attention.head_count"] == 80
    q8 = next(t for t in header.tensors if t.name == "blk.0.ffn_up.weight")
    assert (q8.shape, q8.ggml_type, q8.n_bytes) == ((64, 96), int(Q8_0), 96 * 64 // 32 * 34)
    odd = next(t for t in header.tensors if t.name == "blk.0.odd.weight")
    assert (odd.shape, odd.n_bytes) == ((7, 5, 3), 2 * 105)
    assert header.data_offset % 32 == 0


def test_tokenizer_arrays_are_skipped_but_their_lengths_kept(rich_model: Path) -> None:
    header = read_gguf_header(rich_model)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert key not in header.metadata
        assert header.array_lengths[key] == 300
    assert header.metadata["tokenizer.ggml.model"] == "llama"  # scalars are always kept


def test_long_arrays_outside_the_tokenizer_are_skipped(tmp_path: Path) -> None:
    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_array("test.at_limit", list(range(MAX_KEPT_ARRAY_LENGTH)))
        writer.add_array("test.over_limit", list(range(MAX_KEPT_ARRAY_LENGTH + 1)))
        writer.add_array("test.strings_over_limit", ["s"] * (MAX_KEPT_ARRAY_LENGTH + 1))
        writer.add_uint32("test.after", 7)

    path = _write(tmp_path / "long.gguf", fill)
    header = read_gguf_header(path)
    assert header.metadata["test.at_limit"] == list(range(MAX_KEPT_ARRAY_LENGTH))
    assert "test.over_limit" not in header.metadata and "test.strings_over_limit" not in header.metadata
    assert header.array_lengths["test.over_limit"] == header.array_lengths["test.strings_over_limit"] == 4097
    assert header.metadata["test.after"] == 7  # the walk past skipped arrays lands on the next key


def test_custom_alignment(tmp_path: Path) -> None:
    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_custom_alignment(256)
        writer.add_tensor("a", np.ones(3, dtype=np.float32))
        writer.add_tensor("b", np.ones(5, dtype=np.float32))

    path = _write(tmp_path / "aligned.gguf", fill)
    header = read_gguf_header(path)
    _assert_matches_gguf_reader(path, header)
    assert header.data_offset % 256 == 0 and header.tensors[1].offset == 256


def test_version_2_is_read(rich_model: Path, tmp_path: Path) -> None:
    data = bytearray(rich_model.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share the layout
    path = tmp_path / "v2.gguf"
    path.write_bytes(data)
    header = read_gguf_header(path)
    assert header.version == 2
    assert header.tensors == read_gguf_header(rich_model).tensors


def test_file_like_source_reads_as_the_path(rich_model: Path) -> None:
    from_path = read_gguf_header(rich_model)
    assert read_gguf_header(io.BytesIO(rich_model.read_bytes())) == from_path
    assert read_gguf_header(_Stream(rich_model.read_bytes())) == from_path
    with rich_model.open("rb") as handle:
        assert read_gguf_header(handle) == from_path


def test_not_gguf_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelSourceError, match=r"not a GGUF file \(magic b'PK"):
        read_gguf_header(bogus)
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        read_gguf_header(io.BytesIO(b"<h"))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="cannot read model file"):
        read_gguf_header(tmp_path / "absent.gguf")


def test_version_1_is_refused() -> None:
    v1 = b"GGUF" + struct.pack("<III", 1, 0, 0)
    with pytest.raises(ModelSourceError, match="GGUF v1"):
        read_gguf_header(io.BytesIO(v1))


def test_unknown_version_is_refused() -> None:
    with pytest.raises(ModelSourceError, match="unsupported GGUF version 4"):
        read_gguf_header(io.BytesIO(b"GGUF" + struct.pack("<IQQ", 4, 0, 0)))


def test_big_endian_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "be.gguf", lambda w: w.add_uint32("test.x", 1), endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ModelSourceError, match="big-endian"):
        read_gguf_header(path)


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.1, 0.3, 0.6, 0.9, 0.999])
def test_truncated_header_is_refused(rich_model: Path, tmp_path: Path, fraction: float) -> None:
    end = read_gguf_header(rich_model).data_offset
    cut = tmp_path / "cut.gguf"
    data = rich_model.read_bytes()
    # cut inside the header: kv pairs, the skipped tokenizer arrays, the tensor infos
    cut.write_bytes(data[: max(int(end * fraction), 0) if fraction else 6])
    with pytest.raises(ModelSourceError, match="file ends before its header does"):
        read_gguf_header(cut)
    with pytest.raises(ModelSourceError, match="file ends before its header does"):
        read_gguf_header(io.BytesIO(cut.read_bytes()))  # size known by seeking
    with pytest.raises(ModelSourceError, match="file ends before its header does"):
        read_gguf_header(_Stream(cut.read_bytes()))  # no size known: found by reading


def test_empty_file_is_truncated(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="file ends before its header does"):
        read_gguf_header(tmp_path / "empty.gguf")


def _header(*kv: bytes, tensors: int = 0, kv_count: int | None = None) -> bytes:
    count = len(kv) if kv_count is None else kv_count
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, count) + b"".join(kv)


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


_MALFORMED = [
    (_header(kv_count=2**60), "key/value count is 1152921504606846976"),
    (_header(tensors=2**40), "tensor count is 1099511627776"),
    (_header(_key("a") + struct.pack("<IIQ", 9, 4, 2**62)), "length of array 'a'"),
    (_header(_key("a") + struct.pack("<IIQ", 9, 8, 2**40)), "length of array 'a'"),
    (_header(_key("a") + struct.pack("<IQ", 8, 2**50)), "the length of a string"),
    (_header(struct.pack("<Q", 2**50) + bytes(16)), "the length of a key"),
    (_header(_key("a") + struct.pack("<II", 9, 9) + struct.pack("<Q", 1)), "array of arrays"),
    (_header(_key("a") + struct.pack("<I", 13)), "unknown value type 13"),
    (_header(_key("a") + struct.pack("<IB", 0, 1), _key("a") + struct.pack("<IB", 0, 1)), "twice"),
    (_header(_key("general.alignment") + struct.pack("<II", 4, 48)), "not a power of two"),
    (_header(tensors=1) + _key("t") + struct.pack("<I", 5) + bytes(60), "5 dimensions"),
    (_header(tensors=1) + _key("t") + struct.pack("<IQIQ", 1, 4, 99, 0), "unknown ggml type 99"),
    (_header(tensors=1) + _key("t") + struct.pack("<IQIQ", 1, 33, int(Q8_0), 0), "block size 32"),
    (_header(struct.pack("<Q", 2) + b"\xff\xfe" + bytes(16)), "is not UTF-8"),
]


@pytest.mark.parametrize(("data", "message"), _MALFORMED, ids=[message for _, message in _MALFORMED])
def test_absurd_or_malformed_headers_are_refused(data: bytes, message: str) -> None:
    tracemalloc.start()
    try:
        for source in (_Stream(data), io.BytesIO(data)):
            with pytest.raises(ModelSourceError, match=re.escape(message)):
                read_gguf_header(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, "refused only after allocating"


class _Stream:
    """A stream that can only be read: no size, no seeking (a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1, /) -> bytes:
        return self._data.read(min(size, 1000))  # short reads too


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corrupted_bytes_give_a_header_or_a_model_source_error(rich_model: Path, data: st.DataObject) -> None:
    raw = bytearray(rich_model.read_bytes()[: read_gguf_header(rich_model).data_offset])
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(4, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ModelSourceError):
        read_gguf_header(io.BytesIO(bytes(raw)))


# --------------------------------------------------------------------------------------------------
# a Qwen2.5-sized vocabulary


BIG_VOCAB, BIG_MERGES = 152_064, 151_387


@pytest.fixture(scope="session")
def big_vocab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """152,064 tokens of realistic lengths, 151,387 merges, scores and types: a ~6.8 MB header."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    lengths = rng.choices(
        [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16], [4, 9, 13, 14, 13, 11, 9, 8, 8, 6, 5], k=BIG_VOCAB
    )
    tokens = [("Ġ" if i % 3 == 0 else "") + "".join(rng.choices(letters, k=n)) for i, n in enumerate(lengths)]

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_block_count(2)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_merges([f"{rng.choice(tokens)} {rng.choice(tokens)}" for _ in range(BIG_MERGES)])
        writer.add_token_scores([-float(i) for i in range(BIG_VOCAB)])
        writer.add_token_types([1] * BIG_VOCAB)
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float16))
        writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
        writer.add_tensor("blk.1.attn_norm.weight", np.ones(32, dtype=np.float32))

    return _write(tmp_path_factory.mktemp("big-vocab") / "big-vocab.gguf", fill)


def _traced(read: Any) -> tuple[GGUFHeader, int]:
    tracemalloc.start()
    try:
        header = read()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return header, peak


def test_big_vocabulary_header_is_read_in_little_memory(big_vocab_model: Path) -> None:
    header, peak = _traced(lambda: read_gguf_header(big_vocab_model))
    assert header.data_offset > 6 * 2**20
    assert header.array_lengths["tokenizer.ggml.tokens"] == BIG_VOCAB
    assert header.array_lengths["tokenizer.ggml.merges"] == BIG_MERGES
    assert header.array_lengths["tokenizer.ggml.scores"] == header.array_lengths["tokenizer.ggml.token_type"]
    assert [t.name for t in header.tensors] == [
        "token_embd.weight",
        "blk.0.attn_norm.weight",
        "blk.1.attn_norm.weight",
    ]
    assert header.tensors[0].n_bytes == 4 * 32 * 2
    assert peak < 32 * 2**20, f"reading the header allocated {peak / 2**20:.1f} MiB at peak"


# --------------------------------------------------------------------------------------------------
# remote files


def test_remote_read_equals_local_read(rich_model: Path, file_server_factory: Any) -> None:
    server = file_server_factory(rich_model.parent)
    with RangeReader(server.url(rich_model.name)) as source:
        remote = read_gguf_header(source)
        assert source.size == rich_model.stat().st_size
        assert source.requests == 1
    assert remote == read_gguf_header(rich_model)


def test_big_remote_header_is_fetched_in_growing_ranges(
    big_vocab_model: Path, file_server_factory: Any
) -> None:
    server = file_server_factory(big_vocab_model.parent)
    source = RangeReader(server.url(big_vocab_model.name))
    header, peak = _traced(lambda: read_gguf_header(source))
    source.close()
    assert header == read_gguf_header(big_vocab_model)
    assert source.requests == 3  # 2 + 4 + 8 MiB cover a ~7 MB header
    assert source.requested == min(14 * 2**20, big_vocab_model.stat().st_size)
    assert peak < 32 * 2**20, f"reading the header allocated {peak / 2**20:.1f} MiB at peak"


def test_remote_header_over_the_bound_is_refused(big_vocab_model: Path, file_server_factory: Any) -> None:
    server = file_server_factory(big_vocab_model.parent)
    with (
        RangeReader(server.url(big_vocab_model.name), max_bytes=3 * 2**20) as source,
        pytest.raises(ModelSourceError, match=r"larger than the 3145728 byte bound.*metadata explicitly"),
    ):
        read_gguf_header(source)
    assert source.requested == 3 * 2**20
    assert server.served_bytes <= 3 * 2**20


def test_server_ignoring_range_is_refused(rich_model: Path, file_server_factory: Any) -> None:
    server = file_server_factory(rich_model.parent, honour_range=False)
    with (
        RangeReader(server.url(rich_model.name)) as source,
        pytest.raises(ModelSourceError, match="ignored the Range request"),
    ):
        read_gguf_header(source)


def test_remote_errors(tmp_path: Path, rich_model: Path, file_server_factory: Any) -> None:
    (tmp_path / "index.html").write_text("<html>" + "x" * 5000)
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "cut.gguf").write_bytes(rich_model.read_bytes()[:700])
    server = file_server_factory(tmp_path)
    cases = {
        "index.html": "not a GGUF file",
        "absent.gguf": "HTTP 404",
        "empty.gguf": "file ends before its header does",  # HTTP 416
        "cut.gguf": "file ends before its header does",
    }
    for name, message in cases.items():
        with RangeReader(server.url(name)) as source, pytest.raises(ModelSourceError, match=message):
            read_gguf_header(source)


def test_unreachable_server_and_bad_scheme() -> None:
    with pytest.raises(ModelSourceError, match="only http"):
        RangeReader("ftp://example.com/model.gguf")
    with RangeReader("http://127.0.0.1:9/model.gguf", timeout=2) as source, pytest.raises(ModelSourceError):
        read_gguf_header(source)


def test_user_agent_names_parallama(rich_model: Path, file_server_factory: Any) -> None:
    server = file_server_factory(rich_model.parent)
    seen: list[str] = []
    original = server.handler.do_GET

    def do_get(handler: Any) -> None:
        seen.append(handler.headers.get("User-Agent", ""))
        original(handler)

    server.handler.do_GET = do_get
    with RangeReader(server.url(rich_model.name)) as source:
        read_gguf_header(source)
    assert seen and all(agent.startswith("parallama") for agent in seen)


def test_a_small_header_takes_one_range_of_a_big_model(
    rich_model: Path, tmp_path: Path, file_server_factory: Any
) -> None:
    # a model much larger than its header: only the first range is requested, and the file's size is known
    big = tmp_path / "big.gguf"
    shutil.copy(rich_model, big)
    with big.open("r+b") as handle:
        handle.truncate(3 * 2**30)  # a sparse 3 GiB model
    server = file_server_factory(tmp_path)
    with RangeReader(server.url("big.gguf")) as source:
        header = read_gguf_header(source)
        assert source.size == 3 * 2**30 and source.requested == 2 * 2**20
    assert header.tensors == read_gguf_header(rich_model).tensors
