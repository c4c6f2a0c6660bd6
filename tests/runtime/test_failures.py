"""Each way the runtime can fail leaves its reason in the termination log, where Kubernetes keeps it
for the operator: unsupported model, unreadable file, out of memory at load and while serving.

A real CUDA out-of-memory cannot be produced on a CPU-only machine: the serving case injects
llama.cpp's failure through the engine's seam (``Engine._decode`` answering ``-2``, llama.cpp's
``GGML_STATUS_ALLOC_FAILED``) and feeds the engine the line ggml logs before it aborts.
"""

from __future__ import annotations

import asyncio
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from parallama_runtime import serve
from parallama_runtime.termination import Failure, FailureReason, parse_failure
from runtime_helpers import settings_for, wait_for

pytestmark = pytest.mark.llama


@pytest.fixture
def termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    path.touch()  # the kubelet creates it in a pod
    monkeypatch.setenv("PARALLAMA_TERMINATION_LOG", str(path))
    return path


def _serve(model: Path, *extra: str) -> int:
    return asyncio.run(serve.Server(settings_for(model, *extra)).serve(install_signals=False))


def _written(path: Path) -> Failure:
    failure = parse_failure(path.read_text())
    assert failure is not None, path.read_text()
    return failure


def test_message_round_trip_and_unknown_reasons() -> None:
    failure = Failure(FailureReason.GPU_OOM_LOAD, "cudaMalloc failed:\nout of memory", slots=4, num_ctx=8192)
    text = failure.format()
    assert text.startswith("parallama: reason=gpu-oom-load slots=4 num_ctx=8192: cudaMalloc")
    assert "\n" not in text
    assert parse_failure("some noise\n" + text) == Failure(
        FailureReason.GPU_OOM_LOAD, "cudaMalloc failed: out of memory", 4, 8192
    )
    assert len(Failure(FailureReason.LOAD_FAILED, "x" * 10_000).format()) <= 1024
    assert parse_failure("parallama: reason=from-the-future: ?") == Failure(FailureReason.LOAD_FAILED, "?")
    assert parse_failure("segfault") is None


def test_unsupported_architecture(tmp_path: Path, termination_log: Path) -> None:
    import gguf

    path = tmp_path / "frob.gguf"
    writer = gguf.GGUFWriter(str(path), "frobnicator")
    writer.add_block_count(1)
    writer.add_embedding_length(4)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert _serve(path) == 2
    failure = _written(termination_log)
    assert failure.reason == FailureReason.UNSUPPORTED_MODEL and "frobnicator" in failure.detail


def test_file_that_is_not_a_gguf(tmp_path: Path, termination_log: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"<html>404</html>" * 64)
    assert _serve(path) == 2
    assert _written(termination_log).reason == FailureReason.UNREADABLE_FILE


def test_truncated_file_llama_cpp_cannot_load(
    model_path: Path, tmp_path: Path, termination_log: Path
) -> None:
    """The header is intact (the runtime reads it), the tensor data are cut: llama.cpp refuses."""
    path = tmp_path / "cut.gguf"
    shutil.copy(model_path, path)
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    assert _serve(path, "--parallel", "1", "--num-ctx", "64") == 1
    failure = _written(termination_log)
    assert failure.reason == FailureReason.UNREADABLE_FILE, failure


def test_decode_out_of_memory_exits_with_the_reason(
    make_server: Callable[..., serve.BackgroundServer], termination_log: Path
) -> None:
    running = make_server("--parallel", "2", "--num-ctx", "128")
    engine = running.server.engine
    assert engine is not None
    engine._decode = lambda ctx, batch: -2  # type: ignore[method-assign]
    request = urllib.request.Request(
        running.url + "/v1/completions",
        data=b'{"prompt": "hello", "max_tokens": 4}',
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=30)
    assert wait_for(lambda: running.exit_code is not None, timeout=30), "the server did not exit"
    assert running.exit_code == 1
    failure = _written(termination_log)
    assert failure.reason == FailureReason.GPU_OOM_SERVING
    assert (failure.slots, failure.num_ctx) == (2, 128)


def test_logged_cuda_out_of_memory_is_reported_before_ggml_aborts(
    make_server: Callable[..., serve.BackgroundServer], termination_log: Path
) -> None:
    """ggml logs ``CUDA error: out of memory`` and then aborts the process: the message must already
    be on disk when the log line arrives (the engine's log watcher)."""
    running = make_server("--parallel", "1", "--num-ctx", "64")
    engine = running.server.engine
    assert engine is not None
    engine._on_log_line("llama.cpp: normal chatter")
    assert termination_log.read_text() == ""
    engine._on_log_line("CUDA error: out of memory")
    assert _written(termination_log).reason == FailureReason.GPU_OOM_SERVING
    assert wait_for(lambda: running.exit_code is not None, timeout=30) and running.exit_code == 1
