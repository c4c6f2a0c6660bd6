"""Tiny random-weight GGUF models of every family the memory model covers, for llama.cpp to load.

Each family module registers writers with :func:`family`; :data:`FAMILIES` maps a case name (an
architecture plus a variant, e.g. ``deepseek2-mla`` or ``gemma3``) to its :class:`Family`. Models are
a few hundred KB: llama.cpp loads them in milliseconds, so the memory tests can create contexts over
a whole matrix of settings. Weights are seeded, so a file is the same bytes on every run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FAMILIES", "Family", "family", "load_all"]


@dataclass(frozen=True)
class Family:
    name: str
    """Case name: unique, used as the test id."""
    architecture: str
    """The GGUF ``general.architecture`` llama.cpp loads it as."""
    write: Callable[[Path], Path]
    """Writes the model to the given path and returns it."""
    features: frozenset[str] = field(default_factory=frozenset)
    """Any of: dense, gqa, tied, per_layer_kv, swa, mla, mla_legacy, moe, recurrent, hybrid, embedding
    (a pooling GGUF), rank (a reranker's pooling)."""


FAMILIES: dict[str, Family] = {}


def family(
    name: str, architecture: str, *features: str
) -> Callable[[Callable[[Path], Path]], Callable[[Path], Path]]:
    """Register the decorated writer as the family ``name``."""

    def decorate(write: Callable[[Path], Path]) -> Callable[[Path], Path]:
        if name in FAMILIES:
            raise ValueError(f"family {name!r} registered twice")
        FAMILIES[name] = Family(name, architecture, write, frozenset(features))
        return write

    return decorate


def load_all() -> dict[str, Family]:
    """Import every family module (which registers its writers) and return the registry."""
    from . import dense, embedding, hybrid, mla_recurrent  # noqa: F401

    return FAMILIES
