"""This machine as the planner sees it: its NVIDIA GPUs through NVML, else its RAM.

Used by ``parallama plan --gpus local`` and by ``parallama serve`` when parallelism is on auto.
Without ``nvidia-ml-py`` or without a driver, NVML fails to initialise and the machine is a CPU
node; nothing is faked. A GPU whose NVML query fails (NotSupported, GPU lost) is left out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

from .planning.planner import Node

__all__ = ["host_memory_bytes", "local_nodes", "nvml_gpus"]

log = logging.getLogger(__name__)


def host_memory_bytes() -> int:
    """Memory available to this process: the cgroup limit when set, else MemTotal."""
    total = 0
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except OSError:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            return int(text)
    return total


def nvml_gpus() -> list[dict[str, Any]]:
    """One dict per visible NVIDIA GPU: index, product, total and free bytes. Empty without NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        log.debug("NVML unavailable: %s", error)
        return []
    gpus: list[dict[str, Any]] = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = pynvml.nvmlDeviceGetName(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            except pynvml.NVMLError as error:
                log.warning("skipping GPU %d: %s", index, error)
                continue
            gpus.append(
                {
                    "index": index,
                    "product": name.decode() if isinstance(name, bytes) else str(name),
                    "total_bytes": int(memory.total),
                    "free_bytes": int(memory.free),
                }
            )
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return gpus


def local_nodes() -> list[Node]:
    """This machine as one node: its GPUs when NVML sees any, else a CPU node with its RAM."""
    name = socket.gethostname()
    ram = host_memory_bytes()
    gpus = nvml_gpus()
    if not gpus:
        return [Node(name=name, cpu_memory_bytes=ram)]
    products = {g["product"] for g in gpus}
    product = gpus[0]["product"] if len(products) == 1 else "mixed"
    return [
        Node(
            name=name,
            product=product.replace(" ", "-"),
            gpu_count=len(gpus),
            gpu_memory_bytes=min(g["total_bytes"] for g in gpus),
            gpu_free_bytes=tuple(g["free_bytes"] for g in gpus),
            cpu_memory_bytes=ram,
        )
    ]
