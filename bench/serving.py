"""Serving benchmarks: parallama against llama.cpp's llama-server and the bare decode ceiling.

Four scenarios, each run against both servers and the bare ``llama_decode`` reference in the same
run, on the same generated ~100M bench model and thread count (see docs/benchmarks.md):

* ``saturated``: 2N clients keep N slots busy with fixed-length answers: tokens/s, and the share
  of the bare ceiling (the runtime must keep 90 % or more);
* ``chat``: users hold multi-turn conversations that share one system prompt and resend their
  whole history every turn: wall time and time to first token of later turns;
* ``uneven``: 2N clients with answer lengths drawn from 8..128 tokens: tokens/s;
* ``long-prompt``: a ~3,000-token prompt arrives while N streams decode: the streams'
  inter-token latency while it is prefilled, and its own time to first token.

llama-server runs with its defaults except ``-np N -c num_ctx*N -t T --port P`` plus
``--kv-unified`` (see ``harness.llama_server_argv``) and ``--no-webui``.

    .venv/bin/python bench/serving.py --llama-server /tmp/lsbuild/bin/llama-server --scenario all
    .venv/bin/python bench/serving.py --quick --scenario chat     # a smoke run of a minute or two

Writes bench/out/<scenario>.json and bench/out/serving.png (if matplotlib is installed) and the
servers' logs to bench/out/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import harness
from harness import Bare, Server, Stream, percentile, ratio, table

SCENARIOS = ("saturated", "chat", "uneven", "long-prompt")
NAMES = (
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "mallory",
    "niaj",
)


class Bench:
    """The settings of one run and how to start each server under test."""

    def __init__(self, args: argparse.Namespace, model: Path) -> None:
        self.args = args
        self.model = model
        self.flags: set[str] = set()
        if args.llama_server:
            self.flags = harness.llama_server_flags(args.llama_server)

    def servers(self, scenario: str, slots: int, num_ctx: int) -> list[tuple[str, Callable[[], Server]]]:
        """(key, start) for each server under test, parallama first."""
        args = self.args
        out: list[tuple[str, Callable[[], Server]]] = [
            (
                "parallama",
                lambda: harness.start_parallama(
                    self.model, slots, num_ctx, args.threads, tag=f"{scenario}-{slots}-parallama"
                ),
            )
        ]
        if args.llama_server:
            binary: Path = args.llama_server
            out.append(
                (
                    "llama_server",
                    lambda: harness.start_llama_server(
                        binary,
                        self.model,
                        slots,
                        num_ctx,
                        args.threads,
                        kv=args.llama_server_kv,
                        flags=self.flags,
                        extra=args.llama_server_arg,
                        tag=f"{scenario}-{slots}-llama-server",
                    ),
                )
            )
        return out

    def settings(self, **extra: Any) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "threads": self.args.threads,
            "llama_server": str(self.args.llama_server) if self.args.llama_server else None,
            "llama_server_kv": self.args.llama_server_kv,
            "llama_server_extra": self.args.llama_server_arg,
            **extra,
        }


def served(server: Server) -> dict[str, Any]:
    return {"argv": server.argv[3:] if server.name == "parallama" else server.argv, "log": str(server.log)}


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ---------------------------------------------------------------------------- (a) saturated


async def saturated_clients(url: str, clients: int, requests_each: int, tokens: int) -> dict[str, float]:
    async with harness.session() as client:

        async def one_client() -> list[Stream]:
            out = []
            for _ in range(requests_each):
                body = {
                    "prompt": harness.unique_prompt(),
                    "max_tokens": tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                out.append(await harness.stream(client, url, "/v1/completions", body))
            return out

        start = time.perf_counter()
        streams = [
            s for batch in await asyncio.gather(*(one_client() for _ in range(clients))) for s in batch
        ]
        wall = time.perf_counter() - start
    generated = sum(s.completion_tokens or len(s.events) for s in streams)
    return {
        "tokens_per_second": generated / wall,
        "ttft_p50": percentile([s.ttft for s in streams], 50),
        "latency_p50": percentile([s.end - s.start for s in streams], 50),
        "generated": float(generated),
        "wall": wall,
    }


def side_by_side(
    bench: Bench, scenario: str, slots: int, num_ctx: int, measure: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    """Both servers up at once and measured in turn, ``--repeat`` rounds: on a small shared machine
    the noise between minutes is as large as the differences, so each round compares the two side by
    side. Per server the best round (with every round's tok/s); ``round_ratios``: parallama over
    llama-server, round by round (when llama-server runs)."""
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        servers = [
            (key, stack.enter_context(harness.running(start)))
            for key, start in bench.servers(scenario, slots, num_ctx)
        ]
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in servers}
        for _, server in servers:
            asyncio.run(harness.warm_up(server.url))
        for _ in range(bench.args.repeat):
            for key, server in servers:
                runs[key].append(measure(server.url))
                print(f"  {scenario} {key}: {runs[key][-1]['tokens_per_second']:.1f} tok/s", flush=True)
        for key, server in servers:
            out[key] = dict(max(runs[key], key=lambda r: r["tokens_per_second"]))
            out[key]["runs"] = [r["tokens_per_second"] for r in runs[key]]
            out[key]["server"] = served(server)
    if "llama_server" in runs:
        pairs = zip(runs["parallama"], runs["llama_server"], strict=True)
        out["round_ratios"] = [ratio(a["tokens_per_second"], b["tokens_per_second"]) for a, b in pairs]
    return out


def run_saturated(bench: Bench) -> dict[str, Any]:
    args = bench.args
    rows: list[dict[str, Any]] = []
    for slots in args.slots:
        clients = 2 * slots
        row: dict[str, Any] = {"slots": slots, "clients": clients}
        with Bare(bench.model, slots, args.num_ctx, args.threads) as bare:
            prompt = bare.tokenize("000 " + harness.PROMPT)
            row["bare"] = max(
                (bare.waves(prompt, args.tokens, 2 * args.requests) for _ in range(args.repeat)),
                key=lambda r: r["tokens_per_second"],
            )
        row.update(
            side_by_side(
                bench,
                "saturated",
                slots,
                args.num_ctx,
                lambda url, clients=clients: asyncio.run(
                    saturated_clients(url, clients, args.requests, args.tokens)
                ),
            )
        )
        row["load_average"] = os.getloadavg()[0]
        rows.append(row)
        print(f"  saturated slots={slots}: done", flush=True)

    header = ["slots", "clients", "bare tok/s", "parallama", "% of bare", "ttft p50 s"]
    if args.llama_server:
        header += ["llama-server", "% of bare", "ttft p50 s", "tok/s pl/ls", "ttft ls/pl"]
    lines = []
    for row in rows:
        bare_tps = row["bare"]["tokens_per_second"]
        ours = row["parallama"]
        line: list[object] = [
            row["slots"],
            row["clients"],
            bare_tps,
            ours["tokens_per_second"],
            fmt_pct(ratio(ours["tokens_per_second"], bare_tps)),
            ours["ttft_p50"],
        ]
        if "llama_server" in row:
            peer = row["llama_server"]
            line += [
                peer["tokens_per_second"],
                fmt_pct(ratio(peer["tokens_per_second"], bare_tps)),
                peer["ttft_p50"],
                fmt_x(ratio(ours["tokens_per_second"], peer["tokens_per_second"])),
                fmt_x(ratio(peer["ttft_p50"], ours["ttft_p50"])),
            ]
        lines.append(line)
    low = [
        r["slots"] for r in rows if r["parallama"]["tokens_per_second"] < 0.9 * r["bare"]["tokens_per_second"]
    ]
    text = table(
        "(a) saturated: generated tokens/s with 2N clients on N slots "
        "(tok/s pl/ls = parallama/llama-server, ttft ls/pl = llama-server/parallama: >1 favours parallama)",
        header,
        lines,
    )
    if low:
        text += f"\n  parallama below 90 % of the bare ceiling at {low} slot(s)"
    for row in rows:
        if "round_ratios" in row:
            rounds = row["round_ratios"]
            text += (
                f"\n  {row['slots']} slot(s): parallama/llama-server by round "
                f"{' '.join(fmt_x(r) for r in rounds)} (median {fmt_x(statistics.median(rounds))})"
            )
    settings = bench.settings(
        slots=args.slots, tokens=args.tokens, requests=args.requests, num_ctx=args.num_ctx, repeat=args.repeat
    )
    return {"scenario": "saturated", "settings": settings, "rows": rows, "table": text}


# ---------------------------------------------------------------------------- (b) multi-turn chat


def system_prompt(chars: int) -> str:
    head = "You are the benchmark assistant. Answer briefly and politely. "
    return (head + harness.filler(chars, "system"))[:chars]


def user_message(name: str, turn: int, turns: int, chars: int) -> str:
    """Each user's messages differ from the first characters on, so no cache can serve one
    user's turn from another user's history; only the system prompt is shared."""
    head = f"I am {name}, this is my turn {turn} of {turns}. "
    return head + harness.filler(max(chars - len(head), 0), f"{name}-{turn}")


async def chat_clients(url: str, args: argparse.Namespace) -> dict[str, Any]:
    system = system_prompt(args.system_chars)
    names = [NAMES[i] if i < len(NAMES) else f"user{i}" for i in range(args.chat_users)]
    turns: list[dict[str, Any]] = []

    async with harness.session() as client:

        async def user(name: str) -> None:
            messages: list[dict[str, str]] = [{"role": "system", "content": system}]
            for turn in range(1, args.chat_turns + 1):
                messages.append(
                    {"role": "user", "content": user_message(name, turn, args.chat_turns, args.user_chars)}
                )
                body = {
                    "messages": messages,
                    "max_tokens": args.answer_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                s = await harness.stream(client, url, "/v1/chat/completions", body)
                turns.append(
                    {
                        "user": name,
                        "turn": turn,
                        "ttft": s.ttft,
                        "latency": s.end - s.start,
                        "prompt_tokens": s.prompt_tokens,
                        "completion_tokens": s.completion_tokens,
                        "answer_chars": len(s.text),
                        "prompt_computed": s.timings.get("prompt_n"),
                        "prompt_cached": s.timings.get("cache_n"),
                    }
                )
                messages.append({"role": "assistant", "content": s.text})

        start = time.perf_counter()
        await asyncio.gather(*(user(n) for n in names))
        wall = time.perf_counter() - start

    first = [t["ttft"] for t in turns if t["turn"] == 1]
    later = [t["ttft"] for t in turns if t["turn"] > 1]
    result: dict[str, Any] = {
        "wall": wall,
        "ttft_turn1_p50": percentile(first, 50),
        "ttft_turn1_p95": percentile(first, 95),
        "ttft_later_p50": percentile(later, 50),
        "ttft_later_p95": percentile(later, 95),
        "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
        "completion_tokens": sum(t["completion_tokens"] for t in turns),
        "answer_chars": sum(t["answer_chars"] for t in turns),
        "turns": sorted(turns, key=lambda t: (t["user"], t["turn"])),
    }
    if all(t["prompt_computed"] is not None for t in turns):
        result["prompt_computed"] = sum(t["prompt_computed"] for t in turns)
    if all(t["prompt_cached"] is not None for t in turns):
        result["prompt_cached"] = sum(t["prompt_cached"] for t in turns)
    return result


def chat_floor(bench: Bench, measured: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """An estimate of the least time the chat workload can take on llama_decode alone.

    The prompt tokens that no cache can serve are the system prompt once plus what each turn
    appends to its user's history (the final turn's prompt of each user less the shared system
    prompt); they are timed at the bare prefill rate. Answers are decoded ``slots`` at a time at
    the bare step time of that many sequences at a typical depth. Real servers cannot do better
    than this except by luck of overlap, so it is a floor, not a target.
    """
    args = bench.args
    with Bare(bench.model, args.chat_slots, args.chat_num_ctx, args.threads) as bare:
        system_tokens = len(bare.tokenize(system_prompt(args.system_chars), bos=False))
        last_turns: dict[str, int] = {}
        for t in measured:
            if t["turn"] == args.chat_turns:
                last_turns[t["user"]] = t["prompt_tokens"]
        # the rate at the depth the chat's prompts have: attention makes long prompts slower per token
        length = int(statistics.mean(t["prompt_tokens"] for t in measured)) if measured else system_tokens
        probe = bare.tokenize(harness.filler(length, "probe"))[: args.chat_num_ctx - 64]
        prefill_rate = len(probe) / bare.prefill_time(probe)
        depth = int(statistics.mean(last_turns.values())) if last_turns else system_tokens
        step = bare.step_time(args.chat_slots, min(depth, args.chat_num_ctx - 64))
    unique = sum(last_turns.values()) - (len(last_turns) - 1) * system_tokens if last_turns else 0
    waves = math.ceil(args.chat_users * args.chat_turns / args.chat_slots)
    wall = unique / prefill_rate + waves * args.answer_tokens * step
    return {
        "wall": wall,
        "unique_prompt_tokens": unique,
        "system_tokens": system_tokens,
        "prefill_tokens_per_second": prefill_rate,
        "step_seconds": step,
        "estimate": True,
    }


def run_chat(bench: Bench) -> dict[str, Any]:
    args = bench.args
    results: dict[str, Any] = {}
    for key, start in bench.servers("chat", args.chat_slots, args.chat_num_ctx):
        with harness.running(start) as server:
            asyncio.run(harness.warm_up(server.url))
            before = harness.prometheus(server.url)
            results[key] = asyncio.run(chat_clients(server.url, args))
            after = harness.prometheus(server.url)
            results[key]["metrics_delta"] = {k: v - before.get(k, 0.0) for k, v in after.items()}
            results[key]["server"] = served(server)
        print(f"  chat {key}: {results[key]['wall']:.1f}s", flush=True)
    measured = next(iter(results.values()))["turns"]
    results["bare"] = chat_floor(bench, measured)

    header = ["", "wall s", "ttft t1 p50", "ttft t1 p95", "ttft t2+ p50", "ttft t2+ p95", "prompt tok"]
    rows: list[list[object]] = [["bare floor (est.)", results["bare"]["wall"], None, None, None, None, None]]
    keys = ("wall", "ttft_turn1_p50", "ttft_turn1_p95", "ttft_later_p50", "ttft_later_p95")
    for key, label in (("parallama", "parallama"), ("llama_server", "llama-server")):
        if key in results:
            r = results[key]
            rows.append([label, *(r[k] for k in keys), r["prompt_tokens"]])
    if "llama_server" in results:
        ours, peer = results["parallama"], results["llama_server"]
        rows.append(["llama-server/parallama", *(fmt_x(ratio(peer[k], ours[k])) for k in keys), None])
    text = table(
        f"(b) chat: {args.chat_users} users x {args.chat_turns} turns, {args.system_chars}-char shared "
        f"system prompt, {args.answer_tokens} tokens/answer, {args.chat_slots} slots of {args.chat_num_ctx} "
        "(seconds; ratio = llama-server/parallama: >1 favours parallama)",
        header,
        rows,
    )
    if "llama_server" in results and "prompt_computed" in results["llama_server"]:
        peer = results["llama_server"]
        text += (
            f"\n  llama-server computed {peer['prompt_computed']} of {peer['prompt_tokens']} prompt tokens "
            f"(cache served {peer.get('prompt_cached', '-')})"
        )
    delta = results["parallama"].get("metrics_delta", {})
    if delta:
        text += "\n  parallama metrics moved: " + ", ".join(
            f"{k} +{v:g}" for k, v in sorted(delta.items()) if v
        )
    settings = bench.settings(
        users=args.chat_users,
        turns=args.chat_turns,
        system_chars=args.system_chars,
        user_chars=args.user_chars,
        answer_tokens=args.answer_tokens,
        slots=args.chat_slots,
        num_ctx=args.chat_num_ctx,
    )
    return {"scenario": "chat", "settings": settings, "results": results, "table": text}


# ---------------------------------------------------------------------------- (c) uneven lengths


def uneven_lengths(args: argparse.Namespace) -> list[int]:
    rng = random.Random(args.seed)
    return [rng.randint(args.uneven_min, args.uneven_max) for _ in range(args.uneven_requests)]


async def uneven_clients(url: str, clients: int, lengths: Sequence[int]) -> dict[str, Any]:
    queue = list(reversed(lengths))  # pop() hands the lengths out in their seeded order
    streams: list[Stream] = []
    async with harness.session() as client:

        async def one_client() -> None:
            while queue:
                body = {
                    "prompt": harness.unique_prompt(),
                    "max_tokens": queue.pop(),
                    "temperature": 0,
                    "ignore_eos": True,
                }
                streams.append(await harness.stream(client, url, "/v1/completions", body))

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - start
    generated = sum(s.completion_tokens or len(s.events) for s in streams)
    return {
        "tokens_per_second": generated / wall,
        "generated": generated,
        "expected": sum(lengths),
        "wall": wall,
        "ttft_p50": percentile([s.ttft for s in streams], 50),
        "ttft_p95": percentile([s.ttft for s in streams], 95),
    }


def run_uneven(bench: Bench) -> dict[str, Any]:
    args = bench.args
    slots = args.uneven_slots
    clients = 2 * slots
    lengths = uneven_lengths(args)
    results: dict[str, Any] = {}
    with Bare(bench.model, slots, args.uneven_num_ctx, args.threads) as bare:
        prompt = bare.tokenize("000 " + harness.PROMPT)
        results["bare"] = max(
            (bare.waves(prompt, round(statistics.mean(lengths)), 2) for _ in range(2)),
            key=lambda r: r["tokens_per_second"],
        )
    results.update(
        side_by_side(
            bench,
            "uneven",
            slots,
            args.uneven_num_ctx,
            lambda url: asyncio.run(uneven_clients(url, clients, lengths)),
        )
    )
    round_ratios = results.pop("round_ratios", [])

    rows: list[list[object]] = [["bare ceiling (all slots busy)", results["bare"]["tokens_per_second"], None]]
    for key, label in (("parallama", "parallama"), ("llama_server", "llama-server")):
        if key in results:
            r = results[key]
            rows.append([label, r["tokens_per_second"], r["ttft_p50"]])
    if "llama_server" in results:
        ours, peer = results["parallama"], results["llama_server"]
        rows.append(
            [
                "parallama/llama-server (tok/s); llama-server/parallama (ttft)",
                fmt_x(ratio(ours["tokens_per_second"], peer["tokens_per_second"])),
                fmt_x(ratio(peer["ttft_p50"], ours["ttft_p50"])),
            ]
        )
    text = table(
        f"(c) uneven: {len(lengths)} requests, max_tokens {args.uneven_min}..{args.uneven_max} "
        f"(seed {args.seed}, {sum(lengths)} tokens), {clients} clients on {slots} slots "
        "(>1 favours parallama)",
        ["", "tok/s", "ttft p50 s"],
        rows,
    )
    if round_ratios:
        text += (
            f"\n  parallama/llama-server by round {' '.join(fmt_x(r) for r in round_ratios)} "
            f"(median {fmt_x(statistics.median(round_ratios))})"
        )
        results["round_ratios"] = round_ratios
    settings = bench.settings(
        slots=slots,
        clients=clients,
        requests=args.uneven_requests,
        min_tokens=args.uneven_min,
        max_tokens=args.uneven_max,
        seed=args.seed,
        num_ctx=args.uneven_num_ctx,
        lengths=lengths,
    )
    return {"scenario": "uneven", "settings": settings, "results": results, "table": text}


# ---------------------------------------------------------------------------- (d) long prompt


async def long_prompt_clients(url: str, args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    """N streams decode; once each has a few tokens (and a short baseline has passed), one
    client sends the long prompt. The window is from that send to the long prompt's first token;
    every gap between two tokens of a stream that overlaps the window counts as window ITL."""
    n = args.long_streams
    streams = [Stream() for _ in range(n)]
    decoding = asyncio.Event()

    def on_event(_: Stream) -> None:
        if all(len(s.events) >= args.warm_tokens for s in streams):
            decoding.set()

    async with harness.session() as client:
        tasks = [
            asyncio.create_task(
                harness.stream(
                    client,
                    url,
                    "/v1/completions",
                    {
                        "prompt": harness.unique_prompt(),
                        "max_tokens": args.long_stream_tokens,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                    into=s,
                    on_event=on_event,
                )
            )
            for s in streams
        ]
        try:
            waiter = asyncio.create_task(decoding.wait())
            done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                waiter.cancel()
                for t in done:
                    t.result()  # raises the stream's error
                raise RuntimeError("a stream ended before all were decoding: raise --long-stream-tokens")
            await asyncio.sleep(args.baseline_seconds)
            long = await harness.stream(
                client,
                url,
                "/v1/completions",
                {"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True},
            )
            await asyncio.sleep(args.baseline_seconds)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    opened, first = long.start, long.start + long.ttft
    window: list[float] = []
    before: list[float] = []
    ended_early = 0
    for s in streams:
        if s.finish_reason is not None and s.events and s.events[-1] < first:
            ended_early += 1
        for prev, cur in s.gaps:
            if cur > opened and prev < first:
                window.append(cur - prev)
            elif cur <= opened:
                before.append(cur - prev)
    return {
        "long_ttft": long.ttft,
        "long_prompt_tokens": long.prompt_tokens,
        "itl_window_p50": percentile(window, 50),
        "itl_window_p99": percentile(window, 99),
        "itl_window_max": max(window, default=math.nan),
        "itl_window_count": len(window),
        "itl_before_p50": percentile(before, 50),
        "streams_ended_in_window": ended_early,
    }


def run_long_prompt(bench: Bench) -> dict[str, Any]:
    args = bench.args
    slots = args.long_streams + 1  # the long prompt must find a free slot at once
    prompt = "A long document to summarise. " + harness.filler(args.long_prompt_chars, "long-document")
    results: dict[str, Any] = {}
    with Bare(bench.model, slots, args.long_num_ctx, args.threads) as bare:
        tokens = bare.tokenize(prompt)
        results["bare"] = {
            "long_ttft": bare.prefill_time(tokens),
            "long_prompt_tokens": len(tokens),
            "itl_window_p50": bare.step_time(args.long_streams, 160),
        }
    for key, start in bench.servers("long-prompt", slots, args.long_num_ctx):
        with harness.running(start) as server:
            asyncio.run(harness.warm_up(server.url))
            results[key] = asyncio.run(long_prompt_clients(server.url, args, prompt))
            results[key]["server"] = served(server)
        print(f"  long-prompt {key}: itl p99 {results[key]['itl_window_p99']:.3f}s", flush=True)

    keys = ("itl_window_p50", "itl_window_p99", "itl_window_max", "long_ttft")
    header = ["", "itl p50 s", "itl p99 s", "itl max s", "long ttft s", "gaps", "itl before s"]
    b = results["bare"]
    rows: list[list[object]] = [
        ["bare (step alone; prefill alone)", b["itl_window_p50"], None, None, b["long_ttft"], None, None]
    ]
    for key, label in (("parallama", "parallama"), ("llama_server", "llama-server")):
        if key in results:
            r = results[key]
            rows.append([label, *(r[k] for k in keys), r["itl_window_count"], r["itl_before_p50"]])
    if "llama_server" in results:
        ours, peer = results["parallama"], results["llama_server"]
        rows.append(["llama-server/parallama", *(fmt_x(ratio(peer[k], ours[k])) for k in keys), None, None])
    text = table(
        f"(d) long prompt: {b['long_prompt_tokens']}-token prompt arrives while {args.long_streams} streams "
        f"decode ({slots} slots of {args.long_num_ctx}); inter-token latency of the streams from its arrival "
        "to its first token (ratio = llama-server/parallama: >1 favours parallama)",
        header,
        rows,
    )
    for key in ("parallama", "llama_server"):
        if results.get(key, {}).get("streams_ended_in_window"):
            text += f"\n  warning: {key}: a stream ended inside the window; raise --long-stream-tokens"
    settings = bench.settings(
        streams=args.long_streams,
        slots=slots,
        num_ctx=args.long_num_ctx,
        prompt_chars=len(prompt),
        stream_tokens=args.long_stream_tokens,
        baseline_seconds=args.baseline_seconds,
    )
    return {"scenario": "long-prompt", "settings": settings, "results": results, "table": text}


# ---------------------------------------------------------------------------- main

RUNNERS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "saturated": run_saturated,
    "chat": run_chat,
    "uneven": run_uneven,
    "long-prompt": run_long_prompt,
}

QUICK = {
    "slots": [1, 2],
    "tokens": 16,
    "repeat": 1,
    "chat_users": 2,
    "chat_turns": 2,
    "system_chars": 300,
    "user_chars": 60,
    "answer_tokens": 8,
    "chat_slots": 2,
    "chat_num_ctx": 1024,
    "uneven_slots": 2,
    "uneven_requests": 8,
    "uneven_max": 32,
    "long_streams": 2,
    "long_prompt_chars": 600,
    "long_num_ctx": 1024,
    "long_stream_tokens": 400,
    "baseline_seconds": 0.5,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", nargs="+", default=["all"], choices=[*SCENARIOS, "all"])
    p.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary (omit: parallama only)")
    p.add_argument(
        "--llama-server-kv",
        choices=["unified", "split", "default"],
        default="unified",
        help="llama-server's KV layout: --kv-unified (its -np auto default; default here), "
        "--no-kv-unified, or no flag (split when -np is given)",
    )
    p.add_argument(
        "--llama-server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more llama-server argument (repeatable), e.g. --llama-server-arg=--no-repack: "
        "the runtime keeps CPU weights unrepacked (no AMX/repacked copies) for its memory plans",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", type=Path, help="GGUF to use (default: the generated ~100M bench model)")
    p.add_argument("--quick", action="store_true", help="tiny settings to check that everything runs")
    g = p.add_argument_group("(a) saturated")
    g.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4])
    g.add_argument("--tokens", type=int, default=48, help="tokens per answer")
    g.add_argument("--requests", type=int, default=1, help="requests per client")
    g.add_argument("--num-ctx", type=int, default=512)
    g.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best counts")
    g = p.add_argument_group("(b) chat")
    g.add_argument("--chat-users", type=int, default=8)
    g.add_argument("--chat-turns", type=int, default=4)
    g.add_argument("--system-chars", type=int, default=1500)
    g.add_argument("--user-chars", type=int, default=200, help="characters per user message")
    g.add_argument("--answer-tokens", type=int, default=32)
    g.add_argument("--chat-slots", type=int, default=4)
    g.add_argument("--chat-num-ctx", type=int, default=4096)
    g = p.add_argument_group("(c) uneven")
    g.add_argument("--uneven-slots", type=int, default=4, help="N: 2N clients")
    g.add_argument("--uneven-requests", type=int, default=64)
    g.add_argument("--uneven-min", type=int, default=8)
    g.add_argument("--uneven-max", type=int, default=128)
    g.add_argument("--uneven-num-ctx", type=int, default=512)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("(d) long prompt")
    g.add_argument("--long-streams", type=int, default=4, help="N decoding streams (slots: N + 1)")
    g.add_argument(
        "--long-prompt-chars",
        type=int,
        default=3000,
        help="~tokens: the bench vocabulary has a token per char",
    )
    g.add_argument("--long-num-ctx", type=int, default=4096)
    g.add_argument("--long-stream-tokens", type=int, default=2048, help="max_tokens of the streams")
    g.add_argument("--warm-tokens", type=int, default=4, help="tokens each stream has before the prompt")
    g.add_argument("--baseline-seconds", type=float, default=2.0, help="decode time before and after")
    args = p.parse_args(argv)
    if args.quick:
        explicit = {
            a.dest for a in p._actions if any(opt in (argv or sys.argv[1:]) for opt in a.option_strings)
        }
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(args, key, value)
    if "all" in args.scenario:
        args.scenario = list(SCENARIOS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model or harness.bench_model()
    if args.llama_server is None:
        print("no --llama-server: measuring parallama and the bare ceiling only", flush=True)
    elif not args.llama_server.exists():
        print(f"{args.llama_server} does not exist", file=sys.stderr)
        return 2
    bench = Bench(args, model)
    print(
        f"model {model} ({model.stat().st_size / 2**20:.0f} MiB), threads {args.threads}, "
        f"scenarios {' '.join(args.scenario)}",
        flush=True,
    )
    tables = []
    for name in args.scenario:
        started = time.perf_counter()
        result = RUNNERS[name](bench)
        result["seconds"] = time.perf_counter() - started
        result["load_average"] = os.getloadavg()
        path = harness.write_json(name.replace("-", "_"), result)
        print(result["table"], flush=True)
        print(f"  wrote {path} ({result['seconds']:.0f}s)\n", flush=True)
        tables.append(result["table"])
    if len(tables) > 1:
        print("\n\n".join(tables), flush=True)
    import plot

    print(plot.render_or_explain(harness.OUT), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
