"""Slots, queueing, cancellation and batch-invariance against a real llama.cpp engine."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest
from parallama_runtime.serve import BackgroundServer
from runtime_helpers import SERVED_NAME, scrape, wait_for

pytestmark = pytest.mark.llama


def _engine(server: BackgroundServer):  # type: ignore[no-untyped-def]
    engine = server.server.engine
    assert engine is not None
    return engine


async def _generate(session: aiohttp.ClientSession, url: str, prompt: str, tokens: int) -> dict[str, object]:
    body = {
        "model": SERVED_NAME,
        "prompt": prompt,
        "stream": False,
        "options": {"num_predict": tokens, "temperature": 0, "ignore_eos": True},
    }
    async with session.post(url + "/api/generate", json=body) as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def test_six_requests_on_two_slots(server: BackgroundServer) -> None:
    engine = _engine(server)
    await asyncio.to_thread(wait_for, lambda: engine.in_flight() == 0)
    engine.reset_peaks()
    before = scrape(server.url)
    async with aiohttp.ClientSession() as session:
        replies = await asyncio.gather(
            *(_generate(session, server.url, f"request number {i}", 48) for i in range(6))
        )
    assert all(r["done"] and r["eval_count"] == 48 for r in replies)
    after = scrape(server.url)
    assert after["parallama_slots_busy_max"] == 2
    assert after["parallama_queue_depth_max"] > 0
    assert after["parallama_slots_busy"] == 0
    assert after["parallama_generation_tokens_total"] - before["parallama_generation_tokens_total"] == 6 * 48
    assert after["parallama_queue_time_seconds_count"] - before["parallama_queue_time_seconds_count"] == 6
    ok = 'parallama_requests_total{api="ollama",status="200"}'
    assert after[ok] - before.get(ok, 0) == 6


async def test_disconnects_free_their_slots(server: BackgroundServer) -> None:
    engine = _engine(server)
    rng = random.Random(1234)
    before = scrape(server.url)

    async def stream_then_leave(session: aiohttp.ClientSession, index: int) -> int:
        body = {
            "model": SERVED_NAME,
            "prompt": f"cancel me {index}",
            "options": {"num_predict": 400, "ignore_eos": True},
        }
        keep = rng.randint(0, 30)
        async with session.post(server.url + "/api/generate", json=body) as response:
            if response.status != 200:  # the queue may be full: that is fine here
                return 0
            seen = 0
            async for raw in response.content:
                if raw.strip():
                    seen += 1
                    if seen > keep:
                        break
            response.close()  # drop the connection mid-stream
            return seen

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(stream_then_leave(session, i) for i in range(16)))

    assert await asyncio.to_thread(wait_for, lambda: engine.in_flight() == 0, 10.0), engine.stats()
    after = scrape(server.url)
    assert after["parallama_slots_busy"] == 0
    assert after["parallama_queue_depth"] == 0
    assert after["parallama_kv_cache_usage_ratio"] == 0
    gone = 'parallama_requests_total{api="ollama",status="499"}'
    assert after.get(gone, 0) - before.get(gone, 0) >= 1
    # nothing leaked: both slots still take work and finish it
    async with aiohttp.ClientSession() as session:
        replies = await asyncio.gather(*(_generate(session, server.url, f"after {i}", 8) for i in range(2)))
    assert all(r["eval_count"] == 8 for r in replies)


async def _completion(session: aiohttp.ClientSession, url: str, prompt: str, tokens: int) -> str:
    body = {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with session.post(url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["choices"][0]["text"])


async def test_greedy_output_does_not_depend_on_batching(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server("--parallel", "4", "--num-ctx", "256")
    prompt = "The same prompt, alone and batched."
    async with aiohttp.ClientSession() as session:
        alone = await _completion(session, server.url, prompt, 32)
        # beside it: a long prompt being prefilled and two sequences being decoded
        batched = await asyncio.gather(
            _completion(session, server.url, "a much longer neighbour prompt " * 4, 40),
            _completion(session, server.url, "neighbour", 48),
            _completion(session, server.url, prompt, 32),
            _completion(session, server.url, "x", 20),
        )
    assert len(alone) > 0
    assert batched[2] == alone
    assert scrape(server.url)["parallama_slots_busy_max"] >= 2


async def test_stream_is_ndjson_with_final_stats(server: BackgroundServer) -> None:
    body = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": 3, "ignore_eos": True},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + "/api/chat", json=body) as response,
    ):
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in (await response.text()).splitlines() if line]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 3
    assert all(line["done"] is False for line in lines[:-1])


async def test_non_streaming_client_that_leaves_is_cancelled(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server("--parallel", "1", "--num-ctx", "2048")
    engine = _engine(server)
    body = {
        "model": SERVED_NAME,
        "prompt": "slow",
        "stream": False,
        "options": {"num_predict": 2000, "ignore_eos": True},
    }
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(
                server.url + "/api/generate", json=body, timeout=aiohttp.ClientTimeout(total=0.2)
            ) as response:
                await response.read()
    assert await asyncio.to_thread(wait_for, lambda: engine.in_flight() == 0, 5.0)
    generated = scrape(server.url)["parallama_generation_tokens_total"]
    assert 0 < generated < 2000  # stopped by the disconnect, not by num_predict
