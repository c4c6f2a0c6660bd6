"""GGUF introspection from files, from URLs (header only, by Range), and from explicit metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from parallama_runtime.demo_model import ModelShape, write_model
from parallama_runtime.planning.model_info import (
    ModelSourceError,
    model_info_from_gguf,
    model_info_from_metadata,
    model_info_from_url,
    read_model_info,
)


def test_reads_shape_and_sizes_from_a_gguf_file(tiny_model: Path) -> None:
    info = model_info_from_gguf(tiny_model)
    assert info.architecture == "llama"
    assert (info.block_count, info.embedding_length, info.head_count) == (2, 64, 4)
    assert info.head_count_kv == 2
    assert info.key_length == info.value_length == 16
    assert info.vocab_size == 354
    assert info.feed_forward_length == 192
    # the tensors, counted by hand: norms are f32, the rest f32 in the tiny model
    n_embd, ff, vocab, kv = 64, 192, 354, 2 * 16
    per_layer = 4 * (2 * n_embd + 2 * n_embd * n_embd + 2 * kv * n_embd + 3 * ff * n_embd)
    assert info.layer_bytes == [per_layer, per_layer]
    assert info.embedding_bytes == 4 * vocab * n_embd
    assert info.output_bytes == 4 * (vocab * n_embd + n_embd)
    assert info.size_bytes == sum(info.layer_bytes) + info.embedding_bytes + info.output_bytes


def test_rejects_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        read_model_info(str(bogus))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="cannot read model file"):
        read_model_info(str(tmp_path / "absent.gguf"))


def test_url_reads_only_the_header(tmp_path: Path, file_server_factory) -> None:  # type: ignore[no-untyped-def]
    shape = ModelShape(
        block_count=3, embedding_length=256, head_count=4, head_count_kv=1, feed_forward_length=768
    )
    path = write_model(tmp_path / "remote.gguf", shape)
    server = file_server_factory(tmp_path)
    remote = model_info_from_url(server.url("remote.gguf"))
    local = model_info_from_gguf(path)
    assert remote.model_dump(exclude={"source"}) == local.model_dump(exclude={"source"})
    assert server.served_bytes < path.stat().st_size / 4, "more than the header was downloaded"


def test_url_header_larger_than_first_range_is_fetched_in_steps(tmp_path: Path, file_server_factory) -> None:  # type: ignore[no-untyped-def]
    # a 120k-token vocabulary makes a header of about 3 MiB: more than the first 2 MiB range
    shape = ModelShape(block_count=1, embedding_length=32, head_count=2, head_count_kv=1, vocab_size=120_000)
    path = write_model(tmp_path / "big-header.gguf", shape)
    server = file_server_factory(tmp_path)
    info = model_info_from_url(server.url("big-header.gguf"))
    assert info.vocab_size == 120_000
    assert server.served_bytes < path.stat().st_size


def test_url_header_over_the_bound_is_refused(tmp_path: Path, file_server_factory) -> None:  # type: ignore[no-untyped-def]
    shape = ModelShape(block_count=1, embedding_length=32, head_count=2, head_count_kv=1, vocab_size=120_000)
    write_model(tmp_path / "big-header.gguf", shape)
    server = file_server_factory(tmp_path)
    with pytest.raises(ModelSourceError, match="larger than the 1048576 byte bound"):
        model_info_from_url(server.url("big-header.gguf"), max_header_bytes=1024 * 1024)


def test_server_ignoring_range_is_refused(tiny_model: Path, tmp_path: Path, file_server_factory) -> None:  # type: ignore[no-untyped-def]
    shutil.copy(tiny_model, tmp_path / "m.gguf")
    server = file_server_factory(tmp_path, honour_range=False)
    with pytest.raises(ModelSourceError, match="ignored the Range request"):
        model_info_from_url(server.url("m.gguf"))


def test_url_to_a_non_gguf_file_is_refused(tmp_path: Path, file_server_factory) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "index.html").write_text("<html>" + "x" * 5000)
    server = file_server_factory(tmp_path)
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        model_info_from_url(server.url("index.html"))


def test_url_404_is_reported(tmp_path: Path, file_server_factory) -> None:  # type: ignore[no-untyped-def]
    server = file_server_factory(tmp_path)
    with pytest.raises(ModelSourceError, match="HTTP 404"):
        model_info_from_url(server.url("absent.gguf"))


def test_truncated_gguf_is_reported(tiny_model: Path, tmp_path: Path, file_server_factory) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "cut.gguf").write_bytes(tiny_model.read_bytes()[:600])
    server = file_server_factory(tmp_path)
    with pytest.raises(ModelSourceError, match="ends before its header"):
        model_info_from_url(server.url("cut.gguf"))


def test_explicit_metadata_defaults_key_and_value_length() -> None:
    info = model_info_from_metadata(
        {
            "architecture": "llama",
            "blockCount": 32,
            "embeddingLength": 4096,
            "headCount": 32,
            "headCountKv": 8,
            "contextLength": 131072,
            "sizeBytes": 4_920_734_016,
        }
    )
    assert info.key_length == info.value_length == 128
    assert sum(info.layer_bytes) == 4_920_734_016
    assert len(info.layer_bytes) == 32


def test_metadata_file_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "model.json"
    good.write_text(
        json.dumps(
            {
                "architecture": "qwen2",
                "block_count": 4,
                "embedding_length": 512,
                "head_count": 8,
                "head_count_kv": [2, 2, 0, 2],
                "key_length": 64,
                "value_length": 64,
                "context_length": 4096,
                "size_bytes": 10_000_000,
            }
        )
    )
    info = read_model_info(str(good))
    assert info.k_elements(2) == 0 and info.k_elements(1) == 128

    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"architecture": "llama", "blockCount": 2}))
    with pytest.raises(
        ModelSourceError, match="lacks embedding_length, head_count, context_length, size_bytes"
    ):
        read_model_info(str(missing))

    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"architecture": "llama", "layers": 2}))
    with pytest.raises(ModelSourceError, match="unknown model metadata key 'layers'"):
        read_model_info(str(unknown))

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ModelSourceError, match="invalid JSON"):
        read_model_info(str(broken))

    wrong_length = tmp_path / "wrong.json"
    wrong_length.write_text(json.dumps({**json.loads(good.read_text()), "head_count_kv": [2, 2]}))
    with pytest.raises(ModelSourceError, match="head_count_kv has 2 entries"):
        read_model_info(str(wrong_length))
