"""What every generated family model shares: a byte-level vocabulary, seeded weights, a writer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
from parallama_runtime.demo_model import add_vocabulary

__all__ = ["ModelWriter", "model_writer"]


class ModelWriter:
    """A GGUFWriter with seeded random tensors in f16 (matrices) and f32 (norms, biases, 1-D)."""

    def __init__(self, writer: gguf.GGUFWriter, seed: int) -> None:
        self.gguf = writer
        self.rng = np.random.default_rng(seed)
        self.vocab_size = 0

    def matrix(self, name: str, *shape: int, scale: float = 0.02) -> None:
        """A weight of numpy shape ``shape`` (llama.cpp's ne reversed), stored as f16."""
        data = (self.rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)
        self.gguf.add_tensor(name, data)

    def f32(self, name: str, *shape: int, value: float | None = None, scale: float = 0.02) -> None:
        """An f32 tensor (norms, biases, SSM parameters): ``value`` everywhere, or random."""
        if value is None:
            data = self.rng.standard_normal(shape, dtype=np.float32) * scale
        else:
            data = np.full(shape, value, dtype=np.float32)
        self.gguf.add_tensor(name, data)


@contextmanager
def model_writer(
    path: Path, architecture: str, *, context_length: int = 8192, seed: int = 0, vocab_size: int = 0
) -> Iterator[ModelWriter]:
    """Open a GGUF for ``architecture`` with the byte-level SentencePiece vocabulary of the demo model.

    The caller adds the architecture's keys and tensors (``token_embd.weight`` included, whose row
    count is ``writer.vocab_size``); the file is written atomically when the block ends.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), architecture)
    writer.add_name(f"tiny-{architecture}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(context_length)
    model = ModelWriter(writer, seed)
    model.vocab_size = add_vocabulary(writer, vocab_size)
    yield model
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
