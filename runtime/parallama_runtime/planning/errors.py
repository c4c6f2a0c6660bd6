"""Errors shared by the planning modules (kept apart so that every module can raise them)."""

from __future__ import annotations

__all__ = ["ModelSourceError", "UnsupportedModelError"]


class ModelSourceError(ValueError):
    """The model could not be read: bad path, not GGUF, server without Range support, ..."""


class UnsupportedModelError(ModelSourceError):
    """The model was read, but its architecture (or a feature of it) cannot be planned yet.

    Raised instead of planning with rules that would be wrong: a plan the runtime cannot honour is
    worse than no plan, because the operator would schedule pods that fail to create their context.
    """
