"""The memory model against llama.cpp for embedding models (a GGUF that pools: mean, cls or last).

The runtime creates an embedding model's context as ``binding`` does and the plan assumes
(:meth:`MemoryConfig.for_model`): ``embeddings = true`` with the model's pooling, one sequence id per
slot, ``n_ctx = num_ctx x slots`` in one unified pool, and ``n_batch = n_ubatch`` = ``num_ctx``
rounded up to a multiple of the slots (:func:`embedding_batch`). Here llama.cpp creates exactly that
context for generated llama and qwen3 models with each pooling, over context sizes, slot counts, KV
types and flash attention, and the plan must agree:

* the KV pool's cells and bytes at llama.cpp's printed precision (as for a generative context);
* the compute buffer to the printed precision: the replayed graph with ``build_pooling`` appended
  (the logits of the whole micro-batch stay in the graph);
* the output buffer: created with ``n_seq_max`` rows of ``n_vocab + n_embd`` floats (printed), and
  grown by a full batch, every token an output, to ``n_batch`` rows: the plan's figure. The rows are
  read from llama.cpp's own layout (the embeddings follow the logits in the one buffer).

Plus the rounding's reason, in a child process: mean pooling over a micro-batch that is not a
multiple of the sequence ids aborts llama.cpp at context creation.
"""

from __future__ import annotations

import ctypes
import itertools
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="the runtime extra (llama-cpp-python) is not installed")

from memory.harness import PRINTED, MiB, capture, load  # noqa: E402
from parallama_runtime.engine.llama_log import ParsedReports, parse_buffer_reports  # noqa: E402
from parallama_runtime.planning.errors import UnsupportedModelError  # noqa: E402
from parallama_runtime.planning.memory import (  # noqa: E402
    KVCacheType,
    MemoryConfig,
    embedding_batch,
    estimate_memory,
    output_buffer_bytes,
)
from parallama_runtime.planning.model_info import ModelInfo, model_info_from_gguf  # noqa: E402
from support.families import FAMILIES, load_all  # noqa: E402

pytestmark = pytest.mark.llama

EMBED = ("llama-embed-mean", "llama-embed-cls", "llama-embed-last", "qwen3-embed-last")
load_all()


@dataclass(frozen=True)
class EmbedSetting:
    num_ctx: int
    slots: int
    kv: KVCacheType
    flash_attention: bool

    def config(self) -> MemoryConfig:
        """What the runtime's EngineConfig gives the memory model: nothing embedding-specific, the
        model's pooling decides."""
        return MemoryConfig(
            num_ctx=self.num_ctx,
            num_parallel=self.slots,
            kv_cache_type=self.kv,
            flash_attention=self.flash_attention,
            gpu_layers=0,
        )

    def __str__(self) -> str:
        return f"{self.num_ctx}x{self.slots}-{self.kv.value}-{'fa' if self.flash_attention else 'nofa'}"


SETTINGS = [
    EmbedSetting(num_ctx, slots, kv, fa)
    for (num_ctx, slots), (kv, fa) in itertools.product(
        [(512, 1), (512, 4), (2048, 4), (1000, 3)],
        [(KVCacheType.F16, False), (KVCacheType.F16, True), (KVCacheType.Q8_0, True)],
    )
]
CASES = [pytest.param(name, s, id=f"{name}-{s}") for name in EMBED for s in SETTINGS]


@dataclass
class EmbedMeasured:
    reports: ParsedReports
    output_rows: int
    """Rows of the output buffer after a full batch: the offset of the embeddings past the logits."""
    pooled: int
    """Sequences that got a pooled vector."""


def measure_embedding(path: Path, setting: EmbedSetting, n_vocab: int) -> EmbedMeasured:
    """Create the runtime's embedding context, read its buffers, then decode one full batch (the
    batch's tokens split over every slot's sequence, every token an output) and read how many rows
    the output buffer then holds."""
    loaded = load(path)
    log = capture()
    log.lines.clear()
    n_batch = embedding_batch(setting.num_ctx, setting.slots)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = setting.num_ctx * setting.slots
    params.n_seq_max = setting.slots
    params.n_batch = params.n_ubatch = n_batch
    params.kv_unified = True
    params.embeddings = True
    params.flash_attn_type = 1 if setting.flash_attention else 0
    config = setting.config()
    params.type_k = config.type_k.ggml_type
    params.type_v = config.type_v.ggml_type
    params.n_threads = params.n_threads_batch = 2
    mark = log.mark()
    ctx = llama_cpp.llama_init_from_model(loaded.model, params)
    lines = log.since(mark)
    assert ctx, "\n".join(lines[-5:])
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    try:
        reports = parse_buffer_reports(lines)
        per_sequence = n_batch // setting.slots
        for i in range(n_batch):
            batch.token[i] = 3 + i % 200
            batch.pos[i] = i % per_sequence
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = i // per_sequence
            batch.logits[i] = 1
        batch.n_tokens = n_batch
        assert llama_cpp.llama_decode(ctx, batch) == 0
        logits = ctypes.cast(llama_cpp.llama_get_logits(ctx), ctypes.c_void_p).value or 0
        vectors = ctypes.cast(llama_cpp.llama_get_embeddings(ctx), ctypes.c_void_p).value or 0
        assert logits and vectors > logits
        pooled = sum(bool(llama_cpp.llama_get_embeddings_seq(ctx, s)) for s in range(setting.slots))
        return EmbedMeasured(reports, (vectors - logits) // 4 // n_vocab, pooled)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, ModelInfo]]:
    directory = tmp_path_factory.mktemp("embedding")
    written = {}
    for name in EMBED:
        path = FAMILIES[name].write(directory / f"{name}.gguf")
        written[name] = (path, model_info_from_gguf(path))
    return written


@pytest.mark.parametrize(("name", "setting"), CASES)
def test_plan_matches_llama_cpp(
    models: dict[str, tuple[Path, ModelInfo]], name: str, setting: EmbedSetting
) -> None:
    path, info = models[name]
    assert info.task == "embed"
    estimate = estimate_memory(info, setting.config())
    resolved = estimate.config
    n_batch = embedding_batch(setting.num_ctx, setting.slots)
    assert resolved.embeddings is True and estimate.n_seq_max == setting.slots
    assert resolved.n_ubatch == n_batch and n_batch % setting.slots == 0 and n_batch >= setting.num_ctx

    measured = measure_embedding(path, setting, info.vocab_size)
    assert measured.pooled == setting.slots
    (cache,) = measured.reports.kv_caches
    assert cache.cells == estimate.kv_cells_per_slot and cache.seqs == 1  # one unified stream
    assert abs(measured.reports.total_mib("kv_cache") - estimate.kv_cache_bytes / MiB) <= PRINTED
    compute = measured.reports.total_mib("compute")
    assert abs(compute - estimate.compute_bytes / MiB) <= PRINTED, (compute, estimate.compute_bytes / MiB)

    row = 4 * (info.vocab_size + info.embedding_output_length)
    created = measured.reports.total_mib("output")
    assert abs(created - row * setting.slots / MiB) <= PRINTED  # n_seq_max rows when created
    assert measured.output_rows == n_batch  # a full batch outputs every token
    assert (
        estimate.output_buffer_bytes
        == row * n_batch
        == output_buffer_bytes(info, setting.slots, embeddings=True, n_outputs=n_batch)
    )
    assert [d.output_bytes for d in estimate.devices] == [estimate.output_buffer_bytes]  # a CPU plan


def test_embedding_context_costs_more_than_generation(models: dict[str, tuple[Path, ModelInfo]]) -> None:
    """The same file planned as a generative context (``embeddings=False``): the 512-token batch
    and a logits row per sequence id; the embedding context's whole-input batch and full output
    buffer are what the plan adds for an embedding model."""
    _, info = models["llama-embed-mean"]
    config = MemoryConfig(num_ctx=4096, num_parallel=4, gpu_layers=0)
    embedding = estimate_memory(info, config)
    generation = estimate_memory(
        info, MemoryConfig(num_ctx=4096, num_parallel=4, gpu_layers=0, embeddings=False)
    )
    assert embedding.config.n_ubatch == 4096 and generation.config.n_ubatch == 512
    assert generation.n_seq_max == 16 and embedding.n_seq_max == 4  # no prompt-cache ids
    assert embedding.kv_cache_bytes == generation.kv_cache_bytes
    assert embedding.compute_bytes > 4 * generation.compute_bytes
    assert generation.output_buffer_bytes == 4 * info.vocab_size * 16
    assert embedding.output_buffer_bytes == 4 * (info.vocab_size + 256) * 4096


_MEAN_OVER_AN_UNEVEN_BATCH = """
import llama_cpp
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_default_params()
params.n_gpu_layers = 0
model = llama_cpp.llama_model_load_from_file({path!r}.encode(), params)
assert model
ctx_params = llama_cpp.llama_context_default_params()
ctx_params.n_ctx = {num_ctx} * {slots}
ctx_params.n_seq_max = {slots}
ctx_params.n_batch = ctx_params.n_ubatch = {n_batch}
ctx_params.kv_unified = True
ctx_params.embeddings = True
ctx = llama_cpp.llama_init_from_model(model, ctx_params)
print("created" if ctx else "refused", flush=True)
"""


@pytest.mark.parametrize("rounded", [False, True], ids=["num_ctx", "embedding_batch"])
def test_mean_pooling_needs_the_batch_rounded_to_the_slots(
    models: dict[str, tuple[Path, ModelInfo]], rounded: bool
) -> None:
    """Why :func:`embedding_batch` rounds: llama.cpp's reserve rounds the micro-batch's tokens up to a
    multiple of the sequence ids but keeps ``n_ubatch`` outputs, and mean pooling's matrix then
    does not fit the rows: the process aborts (``ggml_can_mul_mat``) creating the context."""
    path, _ = models["llama-embed-mean"]
    n_batch = embedding_batch(1000, 3) if rounded else 1000
    script = _MEAN_OVER_AN_UNEVEN_BATCH.format(path=str(path), num_ctx=1000, slots=3, n_batch=n_batch)
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120
    )
    if rounded:
        assert child.returncode == 0 and "created" in child.stdout, child.stderr[-2000:]
    else:
        assert child.returncode != 0 and "created" not in child.stdout
        assert "ggml_can_mul_mat" in child.stderr


def test_the_header_says_what_the_model_serves(
    models: dict[str, tuple[Path, ModelInfo]], tmp_path: Path
) -> None:
    poolings = {name: (info.task, info.pooling) for name, (_, info) in models.items()}
    assert poolings == {
        "llama-embed-mean": ("embed", "mean"),
        "llama-embed-cls": ("embed", "cls"),
        "llama-embed-last": ("embed", "last"),
        "qwen3-embed-last": ("embed", "last"),
    }
    rank = FAMILIES["llama-rank"].write(tmp_path / "rank.gguf")
    with pytest.raises(UnsupportedModelError, match="rank"):
        model_info_from_gguf(rank)
    plain = FAMILIES["llama"].write(tmp_path / "llama.gguf")
    assert (model_info_from_gguf(plain).task, model_info_from_gguf(plain).pooling) == ("generate", None)
