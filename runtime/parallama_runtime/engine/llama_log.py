"""llama.cpp's log, captured and read for the buffer sizes it reports.

llama.cpp prints what it allocates while it loads a model and creates a context::

    load_tensors:   CPU_Mapped model buffer size =     4.85 MiB
    llama_kv_cache:        CPU KV buffer size =    16.00 MiB
    llama_kv_cache: size =   16.00 MiB (  2048 cells,   4 layers,  4/4 seqs), K (f16): ...
    sched_reserve:        CPU compute buffer size =    39.01 MiB

These reports are the "measured" side of planned-versus-measured memory: they are what the
allocator really reserved, per buffer type (``CPU``, ``CUDA0``, ``CUDA_Host``...). Sizes are printed
in MiB with two decimals, so a reported value is exact to +-0.005 MiB.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BufferReport", "LlamaLogCapture", "parse_buffer_reports"]

MiB = 1024 * 1024

_BUFFER_LINE = re.compile(
    r"^(?P<func>\w+):\s+(?P<buffer>\S+)\s+(?P<kind>model|KV|RS|compute|output) buffer size ="
    r"\s+(?P<mib>[0-9.]+) MiB"
)
_KV_SUMMARY = re.compile(
    r"^llama_kv_cache: size =\s+(?P<mib>[0-9.]+) MiB \(\s*(?P<cells>\d+) cells,\s+(?P<layers>\d+) layers,"
    r"\s+(?P<used>\d+)/(?P<seqs>\d+) seqs\), K \((?P<type_k>\w+)\):\s+(?P<k_mib>[0-9.]+) MiB, "
    r"V \((?P<type_v>\w+)\):\s+(?P<v_mib>[0-9.]+) MiB"
)
_RS_SUMMARY = re.compile(
    r"^llama_memory_recurrent: size =\s+(?P<mib>[0-9.]+) MiB "
    r"\(\s*(?P<cells>\d+) cells,\s+(?P<layers>\d+) layers,"
    r"\s+(?P<seqs>\d+) seqs\s+(?P<rs_seq>\d+) rs_seq\), R \((?P<type_r>\w+)\):\s+(?P<r_mib>[0-9.]+) MiB, "
    r"S \((?P<type_s>\w+)\):\s+(?P<s_mib>[0-9.]+) MiB"
)
_KEEP_HEAD = 10000
_KEEP_TAIL = 5000
_COMPONENTS = {
    "model": "weights",
    "KV": "kv_cache",
    "RS": "recurrent",
    "compute": "compute",
    "output": "output",
}


@dataclass(frozen=True)
class BufferReport:
    """One buffer llama.cpp reported: component (weights, kv_cache, compute, output), device, MiB."""

    component: str
    device: str
    mib: float

    @property
    def bytes(self) -> int:
        return round(self.mib * MiB)


@dataclass
class KVSummary:
    mib: float
    cells: int
    layers: int
    seqs: int
    type_k: str
    type_v: str
    k_mib: float
    v_mib: float


@dataclass
class RecurrentSummary:
    mib: float
    cells: int
    layers: int
    seqs: int
    r_mib: float
    s_mib: float


@dataclass
class ParsedReports:
    buffers: list[BufferReport] = field(default_factory=list)
    kv_caches: list[KVSummary] = field(default_factory=list)
    """One summary per KV cache: a sliding-window model has two (full layers, then SWA layers)."""
    recurrent: RecurrentSummary | None = None

    @property
    def kv(self) -> KVSummary | None:
        """The (first) KV cache: the only one unless the model has sliding-window layers."""
        return self.kv_caches[0] if self.kv_caches else None

    def total_mib(self, component: str) -> float:
        return sum(b.mib for b in self.buffers if b.component == component)

    @property
    def total_bytes(self) -> int:
        """Every buffer llama.cpp reported (weights, caches, compute, output), host and devices:
        what the loaded model holds, Ollama's ``size`` in ``/api/ps``."""
        return sum(report.bytes for report in self.buffers)

    @property
    def device_bytes(self) -> int:
        """The part in accelerator memory (Ollama's ``size_vram``): every buffer but the host's,
        ``CPU`` and the pinned host buffers (``CUDA_Host``...) a GPU build stages data in."""
        return sum(report.bytes for report in self.buffers if not _host(report.device))

    def by_device(self, component: str) -> dict[str, float]:
        result: dict[str, float] = {}
        for report in self.buffers:
            if report.component == component:
                result[report.device] = result.get(report.device, 0.0) + report.mib
        return result


def _host(device: str) -> bool:
    return device.startswith("CPU") or device.endswith("_Host")


def parse_buffer_reports(lines: list[str]) -> ParsedReports:
    parsed = ParsedReports()
    for raw in lines:
        line = raw.strip()
        match = _BUFFER_LINE.match(line)
        if match:
            device = match.group("buffer").removesuffix("_Mapped").removesuffix("_REPACK")
            parsed.buffers.append(
                BufferReport(_COMPONENTS[match.group("kind")], device, float(match.group("mib")))
            )
            continue
        summary = _KV_SUMMARY.match(line)
        if summary:
            parsed.kv_caches.append(
                KVSummary(
                    mib=float(summary.group("mib")),
                    cells=int(summary.group("cells")),
                    layers=int(summary.group("layers")),
                    seqs=int(summary.group("seqs")),
                    type_k=summary.group("type_k"),
                    type_v=summary.group("type_v"),
                    k_mib=float(summary.group("k_mib")),
                    v_mib=float(summary.group("v_mib")),
                )
            )
            continue
        recurrent = _RS_SUMMARY.match(line)
        if recurrent:
            parsed.recurrent = RecurrentSummary(
                mib=float(recurrent.group("mib")),
                cells=int(recurrent.group("cells")),
                layers=int(recurrent.group("layers")),
                seqs=int(recurrent.group("seqs")),
                r_mib=float(recurrent.group("r_mib")),
                s_mib=float(recurrent.group("s_mib")),
            )
    return parsed


class LlamaLogCapture:
    """Routes llama.cpp's log into Python; keeps every line and forwards to a logger callback.

    llama.cpp emits partial lines (a message may arrive in pieces); pieces are joined until a newline.
    The callback object must outlive the process's use of llama.cpp, so one instance is installed
    process-wide with :meth:`install` and kept in a module global.
    """

    _installed: LlamaLogCapture | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = ""
        self.lines: list[str] = []
        self._dropped = 0
        self._callback: Any = None
        self._watchers: list[Callable[[str], None]] = []

    @classmethod
    def install(cls) -> LlamaLogCapture:
        if cls._installed is not None:
            return cls._installed
        import llama_cpp

        capture = cls()

        def forward(level: int, text: bytes, user_data: Any) -> None:
            capture._feed(text.decode("utf-8", errors="replace"))

        callback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(forward)
        capture._callback = callback  # ctypes does not keep the trampoline alive: we must
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        cls._installed = capture
        return capture

    def watch(self, watcher: Callable[[str], None]) -> None:
        """Call ``watcher`` with every complete line from now on (on the thread that logs it, often
        inside a llama.cpp call: it must be quick and must not call into llama.cpp)."""
        with self._lock:
            self._watchers.append(watcher)

    def unwatch(self, watcher: Callable[[str], None]) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def tail(self, count: int) -> list[str]:
        """The last ``count`` lines."""
        with self._lock:
            return list(self.lines[-count:])

    def _feed(self, text: str) -> None:
        complete: list[str] = []
        with self._lock:
            self._pending += text
            while "\n" in self._pending:
                line, self._pending = self._pending.split("\n", 1)
                self.lines.append(line)
                complete.append(line)
            watchers = list(self._watchers) if complete else []
            if len(self.lines) > _KEEP_HEAD + 2 * _KEEP_TAIL:
                # a long-lived process: keep the start (model load, context) and the latest lines;
                # positions stay absolute, so marks taken before a trim keep their meaning
                cut = len(self.lines) - _KEEP_TAIL
                self._dropped += cut - _KEEP_HEAD
                del self.lines[_KEEP_HEAD:cut]
        for watcher in watchers:
            for line in complete:
                watcher(line)

    def mark(self) -> int:
        """A position in the log (lines seen so far); :meth:`since` returns the lines after it."""
        with self._lock:
            return len(self.lines) + self._dropped

    def since(self, position: int) -> list[str]:
        """Lines logged after ``position``; lines trimmed since then are gone, the rest are kept."""
        with self._lock:
            if position <= _KEEP_HEAD:
                return list(self.lines[position:])
            return list(self.lines[max(_KEEP_HEAD, position - self._dropped) :])
