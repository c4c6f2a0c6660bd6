"""The runtime's last words, read by the operator: why a pod could not allocate its planned slots.

Kubernetes copies what a container writes to ``/dev/termination-log`` into the pod's
``status.containerStatuses[].lastState.terminated.message``. When llama.cpp cannot allocate the
model or the KV cache of the planned slots (the memory plan was wrong for this node), the runtime
writes one line in the format below and exits; the operator parses it, marks the ModelDeployment
Degraded and plans again with more reserve. The runtime needs no Kubernetes credentials for it.
"""

from __future__ import annotations

import logging
import os
import re

__all__ = ["format_allocation_failure", "parse_allocation_failure", "write_termination_message"]

log = logging.getLogger(__name__)

DEFAULT_PATH = "/dev/termination-log"
_PREFIX = "parallama: could not allocate"
_PATTERN = re.compile(re.escape(_PREFIX) + r" (\d+) slots? of (\d+) tokens")


def format_allocation_failure(slots: int, num_ctx: int, error: str) -> str:
    return f"{_PREFIX} {slots} slot{'s' if slots != 1 else ''} of {num_ctx} tokens: {error}"


def parse_allocation_failure(message: str) -> tuple[int, int] | None:
    """(slots, num_ctx) the runtime failed to allocate, or None if the message is not ours."""
    match = _PATTERN.search(message or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


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
