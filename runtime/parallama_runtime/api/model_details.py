"""What Ollama's ``/api/show``, ``/api/tags`` and ``/api/ps`` say about a model, in Ollama's own
formats, from the GGUF header and from what llama.cpp measured. Nothing here is estimated: a fact the
file does not hold is left empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["model_info", "parameter_size", "quantization_level"]

_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
}
"""llama.cpp's ``llama_ftype`` values (llama.h) by the names Ollama gives them (``FileType.String``)."""

_MAX_SHOWN_ARRAY = 5
"""Ollama's ``/api/show`` (without ``verbose``) shows longer arrays as ``[]``."""

_HIDDEN_KEYS = frozenset({"general.name", "tokenizer.chat_template"})
"""Keys Ollama leaves out of ``model_info`` (the template is the response's own ``template``)."""


def quantization_level(file_type: int | None) -> str:
    """``general.file_type`` as Ollama names it ("Q4_K_M", "F16"...); "unknown" as in Ollama when
    the file does not say or says something llama.cpp has no name for."""
    if file_type is None:
        return "unknown"
    return _FILE_TYPES.get(int(file_type), "unknown")


def parameter_size(count: int) -> str:
    """Ollama's ``format.HumanNumber``: "8.0B" (8.03 billion), "8B" (exactly: whole numbers lose
    their decimals), "3.21M" (two decimals in millions), "12K"."""
    for scale, unit, decimals in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
        if count >= scale:
            number = count / scale
            if unit == "K" or number == int(number):
                return f"{number:.0f}{unit}"
            return f"{number:.{decimals}f}{unit}"
    return str(count)


def model_info(metadata: Mapping[str, Any], parameter_count: int = 0) -> dict[str, Any]:
    """``/api/show``'s ``model_info``: the GGUF header's key/values as Ollama shows them (arrays of
    more than 5 items empty, the name and the chat template left out) and ``general.parameter_count``,
    which Ollama adds from the tensors (here llama.cpp's count of the loaded model). Arrays the
    header reader skips (the tokenizer's vocabulary, merges and scores) are not listed."""
    info: dict[str, Any] = {}
    for key, value in metadata.items():
        if key in _HIDDEN_KEYS:
            continue
        if isinstance(value, list) and len(value) > _MAX_SHOWN_ARRAY:
            value = []
        info[key] = value
    if parameter_count > 0:
        info["general.parameter_count"] = parameter_count
    return dict(sorted(info.items()))
