"""Embeddings: a runtime serving a generated embedding model (llama with ``llama.pooling_type``, the
way Qwen3-Embedding is qwen3 with pooling "last"), through the official clients.

The weights are random, so nothing here says what a vector means; the tests rest on what holds
whatever the weights: shapes, unit length, the same input giving the same vector wherever it sits
(in a batch, across decodes, slots and requests), different inputs or poolings giving different
ones, truncation equal to embedding the kept tokens, and every bad request a 400 naming the field.
Vectors computed in different decodes may differ in the last float32 bits (the sums run in another
order), hence the tolerances.
"""

from __future__ import annotations

import asyncio
import base64
import math
import string
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import ollama
import openai
import pytest
from parallama_runtime import serve
from parallama_runtime.api.embeddings import (
    OLLAMA_EMBED,
    OLLAMA_EMBED_OPTIONS,
    OLLAMA_EMBEDDINGS,
    OPENAI_EMBEDDINGS,
)
from parallama_runtime.demo_model import DEMO_SHAPE, write_model
from parallama_runtime.engine import Engine, EngineConfig
from parallama_runtime.engine.embedding import (
    EmbeddingJob,
    EmbeddingQueue,
    EmptyInputError,
    InputTooLongError,
    embedding_batch_size,
    fit_input,
    fit_inputs,
    normalize,
    shorten,
)
from runtime_helpers import SERVED_NAME, have_llama, post_json, scrape, settings_for

EMBED = "embed"
NUM_CTX = 64
N_EMBD = DEMO_SHAPE.embedding_length
CLOSE = 1e-5
"""Largest difference allowed between two computations of one vector (unit vectors, float32)."""

TEXTS = ["the quick brown fox", "jumps over", "the lazy dog", "the quick brown fox", "!"]


@pytest.fixture(scope="module")
def embedding_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same weights with pooling mean, last and rank (the demo model's seed 7)."""
    if not have_llama():
        pytest.skip("llama-cpp-python is not installed")
    folder = tmp_path_factory.mktemp("embedding-models")
    return {
        name: write_model(folder / f"{name}.gguf", DEMO_SHAPE, seed=7, pooling_type=pooling)
        for name, pooling in (("mean", 1), ("last", 3), ("rank", 4))
    }


def _start(model: Path, *extra: str) -> serve.BackgroundServer:
    args = ("--served-name", EMBED, "--parallel", "2", "--num-ctx", str(NUM_CTX), *extra)
    return serve.BackgroundServer(settings_for(model, *args)).start()


@pytest.fixture(scope="module")
def embedder(embedding_models: dict[str, Path]) -> Iterator[serve.BackgroundServer]:
    """2 slots of 64 tokens serving the mean-pooling model."""
    running = _start(embedding_models["mean"], "--max-queue", "16")
    yield running
    running.stop()


def _ollama(server: serve.BackgroundServer) -> ollama.Client:
    return ollama.Client(host=server.url)


def _openai(server: serve.BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _tokens(server: serve.BackgroundServer, text: str) -> list[int]:
    engine = server.server.engine
    assert engine is not None
    return engine.tokenize(text, add_special=True, parse_special=True)


def _matrix(vectors: Any) -> np.ndarray:
    return np.asarray(vectors, dtype=np.float64)


def _distance(a: Any, b: Any) -> float:
    return float(np.max(np.abs(_matrix(a) - _matrix(b))))


# ------------------------------------------------------------------ the pure parts


def test_packing_fills_sequences_and_tokens_in_arrival_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        first = EmbeddingJob([[1] * 10, [1] * 10, [1] * 10], loop)
        second = EmbeddingJob([[1] * 30, [1] * 5], loop)
        queue = EmbeddingQueue()
        queue.add(first)
        queue.add(second)
        assert queue.waiting() == 2
        # three sequence ids: the first job's three inputs
        assert [(id(j), i) for j, i in queue.take(3, 64)] == [(id(first), 0), (id(first), 1), (id(first), 2)]
        # 40 tokens: the 30-token input fits, the next one does not
        assert [(id(j), i) for j, i in queue.take(4, 34)] == [(id(second), 0)]
        assert [(id(j), i) for j, i in queue.take(4, 34)] == [(id(second), 1)]
        assert queue.take(4, 34) == []
        # a cancelled job is dropped before it takes a sequence
        third = EmbeddingJob([[1] * 3], loop)
        queue.add(third)
        third.future.cancel()
        loop.run_until_complete(asyncio.sleep(0))  # the done callback runs on the loop
        assert queue.take(4, 64) == []
        assert third not in list(queue.drain())
    finally:
        loop.close()


def test_an_input_longer_than_the_batch_still_goes_alone() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = EmbeddingQueue()
        queue.add(EmbeddingJob([[1] * 100, [1] * 100], loop))
        assert len(queue.take(2, 64)) == 1
    finally:
        loop.close()


def test_truncation_keeps_the_beginning_and_the_end_token() -> None:
    assert fit_input([1, 2, 3], 3, truncate=False) == [1, 2, 3]
    assert fit_input([1, 2, 3, 4, 5], 3, truncate=True) == [1, 2, 3]
    assert fit_input([1, 2, 3, 4, 9], 3, truncate=True, end=9) == [1, 2, 9]
    assert fit_input([1, 2, 3, 4, 5], 3, truncate=True, end=9) == [1, 2, 3]
    with pytest.raises(ValueError):
        fit_input([1, 2, 3, 4], 3, truncate=False)
    assert fit_inputs([[1, 2], [1, 2, 3, 4]], 3, truncate=True) == ([[1, 2], [1, 2, 3]], True)
    assert fit_inputs([[1, 2]], 3, truncate=False) == ([[1, 2]], False)
    with pytest.raises(InputTooLongError) as too_long:
        fit_inputs([[1], [1, 2, 3, 4]], 3, truncate=False)
    assert (too_long.value.index, too_long.value.length, too_long.value.limit) == (1, 4, 3)
    with pytest.raises(EmptyInputError) as empty:
        fit_inputs([[1], [1], []], 3, truncate=True)
    assert empty.value.index == 2


def test_normalize_and_matryoshka_shortening() -> None:
    vector = np.array([3.0, 4.0, 12.0], dtype=np.float32)
    unit = normalize(vector)
    assert math.isclose(float(np.linalg.norm(unit)), 1.0, abs_tol=1e-6)
    assert np.allclose(unit, vector / 13.0)
    short = shorten(unit, 2)
    assert np.allclose(short, [0.6, 0.8])
    assert shorten(unit, 3) is unit and shorten(unit, None) is unit
    assert not np.any(normalize(np.zeros(4, dtype=np.float32)))
    with pytest.raises(ValueError, match="NaN"):
        normalize(np.array([1.0, np.nan], dtype=np.float32))


def test_the_batch_is_a_multiple_of_the_slots() -> None:
    assert embedding_batch_size(64, 2) == 64
    assert embedding_batch_size(64, 3) == 66
    assert embedding_batch_size(100, 1) == 100


def test_the_docs_list_every_embedding_field() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "runtime.md"
    text = docs.read_text()
    start = text.index("## Embeddings")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else len(text)]
    for fields in (OLLAMA_EMBED, OLLAMA_EMBEDDINGS, OPENAI_EMBEDDINGS):
        for name in fields.honoured | set(fields.refused_values) | fields.deployment:
            assert f"`{name}`" in section, name
    assert "`options`" in section and "sampling options" in section
    assert OLLAMA_EMBED_OPTIONS.deployment  # noted like generation's, listed in that section


# ------------------------------------------------------------------ Ollama


def test_ollama_embed_batch(embedder: serve.BackgroundServer) -> None:
    answer = _ollama(embedder).embed(model=EMBED, input=TEXTS)
    vectors = _matrix(answer.embeddings)
    assert vectors.shape == (len(TEXTS), N_EMBD)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _distance(vectors[0], vectors[3]) < CLOSE  # the same text twice in one request
    for i in range(len(TEXTS)):
        for j in range(i + 1, len(TEXTS)):
            if TEXTS[i] != TEXTS[j]:
                assert _distance(vectors[i], vectors[j]) > 1e-3, (i, j)
    assert answer.prompt_eval_count == sum(len(_tokens(embedder, text)) for text in TEXTS)
    assert answer.total_duration and answer.total_duration > 0
    assert answer.model == f"{EMBED}:latest"


def test_a_batch_larger_than_the_slots_takes_several_decodes(embedder: serve.BackgroundServer) -> None:
    """2 sequence ids per decode: 9 inputs take at least five decodes, and the same text gets the
    same vector in each of them, on whichever sequence id it lands."""
    texts = ["same text", "a", "same text", "bb", "ccc", "same text", "dddd", "eeeee", "same text"]
    vectors = _matrix(_ollama(embedder).embed(model=EMBED, input=texts).embeddings)
    assert vectors.shape == (len(texts), N_EMBD)
    same = [vectors[i] for i, text in enumerate(texts) if text == "same text"]
    assert all(_distance(same[0], other) < CLOSE for other in same[1:])
    reference = _matrix(_ollama(embedder).embed(model=EMBED, input="same text").embeddings[0])
    assert _distance(reference, same[0]) < CLOSE  # and across requests


def test_concurrent_requests_share_decodes_and_agree(embedder: serve.BackgroundServer) -> None:
    client = _ollama(embedder)
    reference = _matrix(client.embed(model=EMBED, input=TEXTS).embeddings)
    results: list[Any] = [None] * 6
    errors: list[BaseException] = []

    def run(slot: int) -> None:
        try:
            results[slot] = _matrix(_ollama(embedder).embed(model=EMBED, input=TEXTS).embeddings)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    for result in results:
        assert _distance(result, reference) < CLOSE
    engine = embedder.server.engine
    assert engine is not None
    stats = engine.stats()  # a request holds a slot while its inputs are computed, then frees it
    assert stats.slots_busy == 0 and stats.queue_depth == 0 and engine.in_flight() == 0
    assert 1 <= stats.slots_busy_max <= 2


def test_dimensions_shorten_and_renormalise(embedder: serve.BackgroundServer) -> None:
    client = _ollama(embedder)
    full = _matrix(client.embed(model=EMBED, input=TEXTS[:2]).embeddings)
    short = _matrix(client.embed(model=EMBED, input=TEXTS[:2], dimensions=16).embeddings)
    assert short.shape == (2, 16)
    assert np.allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    assert _distance(short, expected) < CLOSE


def test_truncate_keeps_the_first_num_ctx_tokens(embedder: serve.BackgroundServer) -> None:
    client = _ollama(embedder)
    long = "abcdefghij" * 12  # BOS, the space marker and 120 letters: 122 tokens
    tokens = _tokens(embedder, long)
    assert len(tokens) > NUM_CTX
    kept = long[: NUM_CTX - 2]
    assert _tokens(embedder, kept) == tokens[:NUM_CTX]  # one token per letter after BOS and "▁"
    answer = client.embed(model=EMBED, input=[long, "short"])  # truncate defaults to true
    assert answer.prompt_eval_count == NUM_CTX + len(_tokens(embedder, "short"))
    expected = client.embed(model=EMBED, input=kept).embeddings[0]
    assert _distance(answer.embeddings[0], expected) < CLOSE

    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model=EMBED, input=["short", long], truncate=False)
    assert caught.value.status_code == 400
    assert "input[1]" in caught.value.error and "num_ctx" in caught.value.error


def test_legacy_embeddings_are_the_pooled_vector_unnormalised(embedder: serve.BackgroundServer) -> None:
    client = _ollama(embedder)
    legacy = _matrix(client.embeddings(model=EMBED, prompt=TEXTS[0]).embedding)
    assert legacy.shape == (N_EMBD,)
    assert not math.isclose(float(np.linalg.norm(legacy)), 1.0, abs_tol=1e-3)  # as Ollama: not normalised
    unit = _matrix(client.embed(model=EMBED, input=TEXTS[0]).embeddings[0])
    assert _distance(legacy / np.linalg.norm(legacy), unit) < CLOSE
    assert client.embeddings(model=EMBED, prompt="").embedding == []  # Ollama's load answer

    long = "x" * 200
    status, answer = post_json(embedder.url + "/api/embeddings", {"model": EMBED, "prompt": long})
    assert status == 400 and "prompt" in answer["error"]


def test_ollama_empty_inputs(embedder: serve.BackgroundServer) -> None:
    client = _ollama(embedder)
    assert client.embed(model=EMBED, input="").embeddings == []  # Ollama's load answer
    assert client.embed(model=EMBED, input=[]).embeddings == []
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model=EMBED, input=["text", ""])
    assert caught.value.status_code == 400 and "input[1]" in caught.value.error


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"input": "x", "frobnicate": 1}, "frobnicate"),
        ({"input": "x", "options": {"mirostat_v9": 1}}, "options.mirostat_v9"),
        ({"input": 3}, "input"),
        ({"input": ["a", 3]}, "input"),
        ({"input": "x", "truncate": "yes"}, "truncate"),
        ({"input": "x", "dimensions": N_EMBD + 1}, "dimensions"),
        ({"input": "x", "dimensions": -1}, "dimensions"),
        ({"input": "x", "dimensions": 2.5}, "dimensions"),
        ({"input": "x", "options": "fast"}, "options"),
        ({"input": "x", "stream": True}, "stream"),
    ],
)
def test_ollama_bad_requests_name_the_field(
    embedder: serve.BackgroundServer, body: dict[str, Any], named: str
) -> None:
    status, answer = post_json(embedder.url + "/api/embed", {"model": EMBED, **body})
    assert status == 400, answer
    assert named in answer["error"]


def test_ollama_load_options_are_noted_and_sampling_options_accepted(
    embedder: serve.BackgroundServer,
) -> None:
    status, answer = post_json(
        embedder.url + "/api/embed",
        {"model": EMBED, "input": "x", "options": {"num_ctx": 8192, "temperature": 0.2}, "keep_alive": "5m"},
    )
    assert status == 200
    assert len(answer["embeddings"]) == 1
    assert any("options.num_ctx=8192" in note for note in answer["notes"])


# ------------------------------------------------------------------ OpenAI


def test_openai_embeddings(embedder: serve.BackgroundServer) -> None:
    client = _openai(embedder)
    answer = client.embeddings.create(model=EMBED, input=TEXTS)  # the client asks for base64
    vectors = _matrix([item.embedding for item in answer.data])
    assert vectors.shape == (len(TEXTS), N_EMBD)
    assert [item.index for item in answer.data] == list(range(len(TEXTS)))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _distance(vectors[0], vectors[3]) < CLOSE
    assert _distance(vectors[0], vectors[1]) > 1e-3
    assert answer.usage.prompt_tokens == sum(len(_tokens(embedder, t)) for t in TEXTS)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens
    assert answer.model == EMBED and answer.object == "list"

    floats = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    assert _distance([item.embedding for item in floats.data], vectors) < CLOSE
    ollama_vectors = _ollama(embedder).embed(model=EMBED, input=TEXTS).embeddings
    assert _distance(ollama_vectors, vectors) < CLOSE  # the same vectors in both APIs


def test_openai_base64_is_little_endian_float32(embedder: serve.BackgroundServer) -> None:
    client = _openai(embedder)
    floats = client.embeddings.create(model=EMBED, input=TEXTS[:2], encoding_format="float")
    encoded = client.embeddings.create(model=EMBED, input=TEXTS[:2], encoding_format="base64")
    for text_item, b64_item in zip(floats.data, encoded.data, strict=True):
        assert isinstance(b64_item.embedding, str)
        decoded = np.frombuffer(base64.b64decode(b64_item.embedding), dtype="<f4")
        assert decoded.shape == (N_EMBD,)
        assert _distance(decoded, text_item.embedding) < CLOSE


def test_openai_token_inputs_and_dimensions(embedder: serve.BackgroundServer) -> None:
    client = _openai(embedder)
    ids = _tokens(embedder, "hello there")
    by_text = client.embeddings.create(model=EMBED, input="hello there", encoding_format="float")
    by_ids = client.embeddings.create(model=EMBED, input=ids, encoding_format="float")
    by_lists = client.embeddings.create(model=EMBED, input=[ids, ids], encoding_format="float")
    assert _distance(by_text.data[0].embedding, by_ids.data[0].embedding) < CLOSE
    assert len(by_lists.data) == 2
    assert _distance(by_lists.data[1].embedding, by_ids.data[0].embedding) < CLOSE
    short = client.embeddings.create(model=EMBED, input="hello there", dimensions=32)
    assert len(short.data[0].embedding) == 32
    assert math.isclose(float(np.linalg.norm(short.data[0].embedding)), 1.0, abs_tol=1e-5)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["a", ""]}, "input[1]"),
        ({"input": [[1, 2], []]}, "input[1]"),
        ({"input": [1, 10**9]}, "input"),
        ({"input": [1.5]}, "input"),
        ({"input": "x" * 400}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "dimensions": N_EMBD + 1}, "dimensions"),
        ({"input": "x", "frobnicate": True}, "frobnicate"),
        ({}, "input"),
    ],
)
def test_openai_bad_requests_name_the_field(
    embedder: serve.BackgroundServer, body: dict[str, Any], param: str
) -> None:
    status, answer = post_json(embedder.url + "/v1/embeddings", {"model": EMBED, **body})
    assert status == 400, answer
    assert answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"


def test_openai_client_sees_a_bad_request(embedder: serve.BackgroundServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _openai(embedder).embeddings.create(model=EMBED, input="x" * 400)
    assert "num_ctx" in str(caught.value)


# ------------------------------------------------------------------ what each model serves


def test_an_embedding_model_does_not_generate(embedder: serve.BackgroundServer) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        _ollama(embedder).generate(model=EMBED, prompt="hi")
    assert caught.value.status_code == 400
    assert caught.value.error == "this model does not support generate"
    with pytest.raises(ollama.ResponseError) as caught:
        _ollama(embedder).chat(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as caught_openai:
        _openai(embedder).chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert "does not support generate" in str(caught_openai.value)
    with pytest.raises(openai.BadRequestError):
        _openai(embedder).completions.create(model=EMBED, prompt="hi")
    shown = _ollama(embedder).show(EMBED)
    assert shown.capabilities == ["embedding"]


def test_a_generative_model_does_not_embed(server: serve.BackgroundServer) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        _ollama(server).embed(model=SERVED_NAME, input="hi")
    assert caught.value.status_code == 400
    assert caught.value.error == "this model does not support embeddings"
    with pytest.raises(ollama.ResponseError) as caught:
        _ollama(server).embeddings(model=SERVED_NAME, prompt="hi")
    assert caught.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as caught_openai:
        _openai(server).embeddings.create(model=SERVED_NAME, input="hi")
    assert "does not support embeddings" in str(caught_openai.value)
    capabilities = _ollama(server).show(SERVED_NAME).capabilities or []
    assert "completion" in capabilities and "embedding" not in capabilities


def test_mean_and_last_pooling_differ(
    embedder: serve.BackgroundServer, embedding_models: dict[str, Path]
) -> None:
    last = _start(embedding_models["last"])
    try:
        by_last = _matrix(_ollama(last).embed(model=EMBED, input=TEXTS).embeddings)
        again = _matrix(_ollama(last).embed(model=EMBED, input=TEXTS).embeddings)
    finally:
        last.stop()
    by_mean = _matrix(_ollama(embedder).embed(model=EMBED, input=TEXTS).embeddings)
    assert by_last.shape == by_mean.shape
    assert _distance(by_last, again) < CLOSE
    assert _distance(by_last[0], by_last[3]) < CLOSE
    for i in range(len(TEXTS)):
        assert _distance(by_last[i], by_mean[i]) > 1e-3


def test_a_reranker_is_refused_at_load(embedding_models: dict[str, Path]) -> None:
    running = serve.BackgroundServer(settings_for(embedding_models["rank"], "--parallel", "1"))
    with pytest.raises(RuntimeError):
        running.start()
    running.stop()
    failure = running.server.failure
    assert failure is not None
    assert failure.reason.value == "unsupported-model"
    assert "rank" in failure.detail


def test_metrics_count_embedding_requests_and_tokens(embedder: serve.BackgroundServer) -> None:
    before = scrape(embedder.url)
    _ollama(embedder).embed(model=EMBED, input=TEXTS[:2])
    _openai(embedder).embeddings.create(model=EMBED, input=TEXTS[:3])
    post_json(embedder.url + "/api/embed", {"model": EMBED, "input": "x", "frobnicate": 1})
    after = scrape(embedder.url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('parallama_requests_total{api="ollama",status="200"}') == 1
    assert delta('parallama_requests_total{api="openai",status="200"}') == 1
    assert delta('parallama_requests_total{api="ollama",status="400"}') == 1
    tokens = sum(len(_tokens(embedder, t)) for t in TEXTS[:2] + TEXTS[:3])
    assert delta("parallama_prompt_tokens_total") == tokens


# ------------------------------------------------------------------ a non-causal encoder


def _write_bert(path: Path, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_ff: int = 128) -> Path:
    """A random-weight BERT with CLS pooling and a WordPiece vocabulary of single characters
    (``▁x`` starts a word, ``x`` continues one), CLS and SEP around every input, as llama.cpp's
    converter writes BERT models."""
    rng = np.random.default_rng(3)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = special + ["\u2581" + c for c in chars] + list(chars)
    types = [gguf.TokenType.CONTROL] * len(special) + [gguf.TokenType.NORMAL] * (2 * len(chars))
    types[1] = gguf.TokenType.UNKNOWN
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_context_length(512)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.CLS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(2)
    for add, token in (
        (writer.add_bos_token_id, 2),
        (writer.add_sep_token_id, 3),
        (writer.add_unk_token_id, 1),
    ):
        add(token)
    writer.add_pad_token_id(0)
    writer.add_mask_token_id(4)

    def tensor(name: str, *shape: int, scale: float = 0.02, value: float | None = None) -> None:
        data = (
            rng.standard_normal(shape, dtype=np.float32) * scale if value is None else np.full(shape, value)
        )
        writer.add_tensor(name, data.astype(np.float32))

    tensor("token_embd.weight", len(tokens), n_embd, scale=1.0)
    tensor("token_types.weight", 2, n_embd)
    tensor("position_embd.weight", 512, n_embd)
    tensor("token_embd_norm.weight", n_embd, value=1.0)
    tensor("token_embd_norm.bias", n_embd, value=0.0)
    for layer in range(n_layer):
        prefix = f"blk.{layer}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(prefix + name + ".weight", n_embd, n_embd)
            tensor(prefix + name + ".bias", n_embd)
        for norm in ("attn_output_norm", "layer_output_norm"):
            tensor(prefix + norm + ".weight", n_embd, value=1.0)
            tensor(prefix + norm + ".bias", n_embd, value=0.0)
        tensor(prefix + "ffn_up.weight", n_ff, n_embd)
        tensor(prefix + "ffn_up.bias", n_ff)
        tensor(prefix + "ffn_down.weight", n_embd, n_ff)
        tensor(prefix + "ffn_down.bias", n_embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_non_causal_encoder_embeds_whole_inputs(tmp_path: Path) -> None:
    """BERT attends both ways, so llama.cpp must see each input in one micro-batch: 3 slots of 50
    tokens make a batch of 51 (a multiple of the slots, else llama.cpp aborts at load), and every
    input, up to 50 tokens, is computed whole. The planner does not plan BERT yet, so this runs the
    engine itself rather than a server."""
    if not have_llama():
        pytest.skip("llama-cpp-python is not installed")
    engine = Engine(
        EngineConfig(str(_write_bert(tmp_path / "bert.gguf")), num_parallel=3, num_ctx=50, threads=2)
    )
    engine.load()
    engine.start()
    try:
        assert engine.embedding_model and engine.pooling_type == 2 and engine.n_embd == 64
        cls, sep = 2, 3

        def tokens(text: str) -> list[int]:
            return engine.tokenize(text, add_special=True, parse_special=True)

        assert tokens("ab c")[0] == cls and tokens("ab c")[-1] == sep
        long = tokens("abcdefghij " * 8)
        assert len(long) > 50
        kept = [*long[:49], sep]  # the first tokens, and SEP stays last
        inputs = [
            tokens("hello world"),
            tokens("other words"),
            tokens("hello world"),
            long,
            kept,
            tokens("z"),
        ]

        async def run() -> list[Any]:
            first = await engine.submit_embeddings(inputs, truncate=True)
            again = await engine.submit_embeddings([inputs[0]], truncate=False)
            return [first, again]

        first, again = asyncio.run(run())
        vectors = first.vectors
        assert len(vectors) == len(inputs) and all(v.shape == (64,) for v in vectors)
        assert first.truncated and first.prompt_tokens == sum(map(len, inputs)) - len(long) + 50
        assert _distance(vectors[0], vectors[2]) < CLOSE * 10
        assert _distance(vectors[0], again.vectors[0]) < CLOSE * 10
        assert _distance(vectors[3], vectors[4]) < CLOSE * 10  # truncation = embedding the kept tokens
        assert _distance(vectors[0], vectors[1]) > 1e-3
        assert engine.audit() == []
    finally:
        engine.close()


class _Counting:
    """An engine observer that counts the inputs admitted to a decode."""

    def __init__(self) -> None:
        self.admitted = 0

    def on_admitted(self, queue_seconds: float, prompt_tokens: int, cached_tokens: int) -> None:
        self.admitted += 1

    def on_first_token(self, seconds: float) -> None: ...

    def on_inter_token(self, seconds: Any) -> None: ...

    def on_finished(self, finish: Any) -> None: ...


def test_a_cancelled_request_drops_its_remaining_inputs(embedding_models: dict[str, Path]) -> None:
    """A client that goes away cancels the awaited future: inputs not yet decoded are dropped and
    the engine serves the next request."""
    observer = _Counting()
    config = EngineConfig(str(embedding_models["mean"]), num_parallel=1, num_ctx=NUM_CTX, threads=2)
    engine = Engine(config, observer=observer)
    engine.load()
    engine.start()
    try:
        many = [
            engine.tokenize(f"input number {i}", add_special=True, parse_special=True) for i in range(300)
        ]

        async def run() -> Any:
            doomed = engine.submit_embeddings(many, truncate=False)
            await asyncio.sleep(0)
            doomed.cancel()
            return await engine.submit_embeddings(many[:2], truncate=False)

        after = asyncio.run(run())
        assert len(after.vectors) == 2
        assert observer.admitted < len(many)
        assert engine.in_flight() == 0
    finally:
        engine.close()


def test_a_failed_decode_fails_its_requests_and_the_next_ones_run(
    embedding_models: dict[str, Path],
) -> None:
    running = _start(embedding_models["mean"])
    try:
        engine = running.server.engine
        assert engine is not None
        real = engine._decode
        codes = [1]  # llama.cpp's "no KV slot": the batch fails, the engine goes on

        def decode(ctx: Any, batch: Any) -> int:
            return codes.pop() if codes else real(ctx, batch)

        engine._decode = decode  # type: ignore[method-assign]
        status, answer = post_json(running.url + "/api/embed", {"model": EMBED, "input": TEXTS})
        assert status == 500 and "llama_decode failed (1)" in answer["error"]
        again = _ollama(running).embed(model=EMBED, input=TEXTS)
        assert len(again.embeddings) == len(TEXTS)
        assert engine.in_flight() == 0 and engine.audit() == []
    finally:
        running.stop()
