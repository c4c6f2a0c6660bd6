"""Throughput and latency of parallama's slots against llama.cpp's own ceiling and the stock servers.

For every slot count N in --slots (default 1 2 4 8), with 2N concurrent streaming clients:

* ``parallama``: ``parallama serve --parallel N`` (a subprocess), clients on /v1/completions;
* ``stock``: ``python -m llama_cpp.server`` (llama-cpp-python's server, one sequence at a time),
  same clients, same context per request, same threads;
* ``bare``: a loop of ``llama_decode`` over N sequences in this process, no HTTP and no sampling,
  one token per sequence per step: the ceiling the runtime's batch loop is measured against;
* ``llama-server`` (optional, ``--llama-server PATH``): llama.cpp's own C++ server with its
  defaults and ``-np N`` (see ``harness.llama_server_argv``), the peer to beat.

The same saturated table, without the stock server, is scenario (a) of bench/serving.py, which
also runs the chat, uneven-length and long-prompt scenarios (docs/benchmarks.md).

Everything runs on one generated ~100M-parameter llama (``demo_model.BENCH_SHAPE`` with a 32000
token vocabulary), with the same thread count. Not part of CI: it takes minutes.

    .venv/bin/python bench/throughput.py --tokens 48 --slots 1 2 4 8

Writes bench/out/results.json and bench/out/throughput.png and prints a ratio table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
from harness import OUT, Bare, Server
from serving import saturated_clients


def start_stock(model: Path, num_ctx: int, threads: int) -> Server:
    port = harness.free_port()
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
    server = Server("stock", process, f"http://127.0.0.1:{port}", Path(os.devnull), argv)
    try:
        harness.wait_ready(server.url + "/v1/models", process)
    except BaseException:
        server.stop()
        raise
    return server


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slots = [r["slots"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(
        slots, [r["bare"]["tokens_per_second"] for r in results], "k--o", label="bare llama_decode (ceiling)"
    )
    for key, style, label in (
        ("parallama", "b-o", "parallama"),
        ("stock", "r-o", "llama_cpp.server"),
        ("llama_server", "g-o", "llama-server"),
    ):
        if all(key in r for r in results):
            left.plot(slots, [r[key]["tokens_per_second"] for r in results], style, label=label)
            right.plot(slots, [r[key]["ttft_p50"] for r in results], style, label=label)
    left.set(xlabel="slots (clients = 2 x slots)", ylabel="generated tokens/s", title="Aggregate throughput")
    right.set(xlabel="slots (clients = 2 x slots)", ylabel="seconds", title="Time to first token (median)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(slots, [str(n) for n in slots])
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure(args: argparse.Namespace, model: Path, slots: int) -> dict[str, Any]:
    """One row of the table: every reference at ``slots`` slots with twice as many clients."""
    clients = 2 * slots
    row: dict[str, Any] = {"slots": slots, "clients": clients}

    def best_of(run: Callable[[], dict[str, float]]) -> dict[str, float]:
        return max((run() for _ in range(args.repeat)), key=lambda r: r["tokens_per_second"])

    def served(start: Callable[[], Server]) -> dict[str, float]:
        with harness.running(start) as server:
            asyncio.run(harness.warm_up(server.url))
            return best_of(
                lambda: asyncio.run(saturated_clients(server.url, clients, args.requests, args.tokens))
            )

    with Bare(model, slots, args.num_ctx, args.threads) as bare:
        prompt = bare.tokenize("000 " + harness.PROMPT)
        row["bare"] = best_of(lambda: bare.waves(prompt, args.tokens, 2 * args.requests))
    row["parallama"] = served(
        lambda: harness.start_parallama(
            model, slots, args.num_ctx, args.threads, tag=f"throughput-{slots}-parallama"
        )
    )
    if not args.no_stock:
        row["stock"] = served(lambda: start_stock(model, args.num_ctx, args.threads))
    if args.llama_server:
        binary = args.llama_server
        row["llama_server"] = served(
            lambda: harness.start_llama_server(
                binary,
                model,
                slots,
                args.num_ctx,
                args.threads,
                kv=args.llama_server_kv,
                tag=f"throughput-{slots}-llama-server",
            )
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
    parser.add_argument("--llama-server-kv", choices=["unified", "split", "default"], default="unified")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    model = args.model or harness.bench_model()
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
    try:
        plot(results, OUT / "throughput.png")
        plotted = f" and {OUT / 'throughput.png'}"
    except ImportError:
        plotted = " (no plot: matplotlib is missing; `pip install -e '.[bench]'`)"
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
    print(f"wrote {OUT / 'results.json'}{plotted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
