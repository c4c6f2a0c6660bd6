"""The runtime's last words, read by the operator: why the runtime stopped, in one parsable line.

Kubernetes copies what a container writes to ``/dev/termination-log`` into the pod's
``status.containerStatuses[].lastState.terminated.message`` (at most 4 KiB). The runtime writes one
line there before it exits on a failure the operator can act on::

    parallama: reason=gpu-oom-load slots=4 num_ctx=8192: <llama.cpp's words>

``reason`` is one of :class:`FailureReason`:

* ``gpu-oom-load``: llama.cpp could not allocate the model or the planned slots' context (the plan's
  device memory: the GPUs, or host memory on a CPU-only replica). The operator keeps more free.
* ``gpu-oom-serving``: an allocation failed while serving (``llama_decode`` answered
  ``GGML_STATUS_ALLOC_FAILED``, or llama.cpp logged a CUDA out-of-memory before aborting).
* ``unsupported-model``: the GGUF's architecture has no memory rules (``UnsupportedModelError``).
* ``unreadable-file``: the file is not a GGUF the runtime or llama.cpp can read (corrupt, truncated).
* ``load-failed``: anything else at load; the operator reports it and changes nothing.

The runtime needs no Kubernetes credentials for any of it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "Failure",
    "FailureReason",
    "allocation_failure_line",
    "parse_failure",
    "write_termination_message",
]

log = logging.getLogger(__name__)

DEFAULT_PATH = "/dev/termination-log"
MAX_MESSAGE = 1024
"""Well below the kubelet's 4 KiB: the first line is what the operator needs."""

_LINE = re.compile(
    r"^parallama: reason=(?P<reason>[a-z0-9-]+)(?P<fields>(?: [a-z_]+=\d+)*): ?(?P<detail>.*)$"
)

_ALLOCATION_FAILURE = re.compile(
    r"out of memory|failed to allocate|unable to allocate|cudaMalloc failed|OutOfDeviceMemory",
    re.IGNORECASE,
)
"""llama.cpp's and ggml's words for an allocation that failed: ``cudaMalloc failed: out of memory``,
``CUDA error: out of memory`` (ggml aborts right after), ``failed to allocate CUDA0 buffer of size``,
``unable to allocate CUDA0 buffer``, ``failed to allocate buffer for kv cache``, Vulkan's
``ErrorOutOfDeviceMemory``."""


class FailureReason(StrEnum):
    GPU_OOM_LOAD = "gpu-oom-load"
    GPU_OOM_SERVING = "gpu-oom-serving"
    UNSUPPORTED_MODEL = "unsupported-model"
    UNREADABLE_FILE = "unreadable-file"
    LOAD_FAILED = "load-failed"

    @property
    def out_of_memory(self) -> bool:
        return self in (FailureReason.GPU_OOM_LOAD, FailureReason.GPU_OOM_SERVING)


@dataclass(frozen=True)
class Failure:
    reason: FailureReason
    detail: str
    slots: int | None = None
    num_ctx: int | None = None

    def format(self) -> str:
        fields = "".join(
            f" {name}={value}" for name, value in (("slots", self.slots), ("num_ctx", self.num_ctx)) if value
        )
        head = f"parallama: reason={self.reason.value}{fields}: "
        detail = " ".join(self.detail.split())  # one line
        return (head + detail)[:MAX_MESSAGE]


def parse_failure(message: str) -> Failure | None:
    """The failure a runtime wrote, or None if the message is not ours. A reason this operator
    does not know (a newer runtime) reads as ``load-failed``: reported, nothing changed."""
    for line in (message or "").splitlines():
        match = _LINE.match(line.strip())
        if match is None:
            continue
        try:
            reason = FailureReason(match.group("reason"))
        except ValueError:
            reason = FailureReason.LOAD_FAILED
        fields = dict(part.split("=", 1) for part in match.group("fields").split())
        slots = fields.get("slots")
        num_ctx = fields.get("num_ctx")
        return Failure(
            reason=reason,
            detail=match.group("detail"),
            slots=int(slots) if slots else None,
            num_ctx=int(num_ctx) if num_ctx else None,
        )
    return None


def allocation_failure_line(lines: Iterable[str]) -> str | None:
    """The first log line that says an allocation failed (llama.cpp's or ggml's words), if any."""
    for line in lines:
        if _ALLOCATION_FAILURE.search(line):
            return line.strip()
    return None


def write_termination_message(text: str, path: str | None = None) -> bool:
    """Write ``text`` where Kubernetes looks; only if that file exists (outside a pod it does not)."""
    target = path or os.environ.get("PARALLAMA_TERMINATION_LOG", DEFAULT_PATH)
    if not os.path.exists(target):
        return False
    try:
        with open(target, "w") as handle:
            handle.write(text[:4000])  # the kubelet keeps at most 4096 bytes
    except OSError as error:
        log.debug("cannot write the termination message to %s: %s", target, error)
        return False
    return True
