"""The autoscaler's signal from a real runtime: ``parallama serve`` (real llama.cpp) driven by the
official OpenAI client, read with the operator's own scraper (parallama_operator.replica_load), the
code that reads every ready replica in a cluster.

While more requests run than there are slots, the scraper must see every slot busy and requests
queued; once they are answered, both must fall back to zero. What the random-weight model says is
irrelevant: ``ignore_eos`` and ``max_tokens`` fix how long each request holds its slot.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import openai
import pytest
from parallama_operator.autoscaling import Policy, recommend
from parallama_operator.replica_load import ReplicaLoad, Scrape, observation, scrape
from runtime_helpers import SERVED_NAME

pytestmark = [pytest.mark.llama, pytest.mark.slow]

SLOTS = 2
CLIENTS = 6


def read(url: str) -> Any:
    async def once() -> Any:
        async with aiohttp.ClientSession() as session:
            return await scrape(session, {"replica": f"{url}/metrics"}, within=5)

    return asyncio.run(once())


def test_the_operators_scraper_sees_the_load_move_with_real_clients(make_server: Any) -> None:
    server = make_server("--parallel", str(SLOTS), "--num-ctx", "256", "--max-queue", "8")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    idle = read(server.url)
    assert idle.failures == {}
    assert idle.loads["replica"] == ReplicaLoad(slots=SLOTS, busy=0, queued=0)

    def complete(i: int) -> int:
        response = client.completions.create(
            model=SERVED_NAME,
            prompt=f"request {i}:",
            max_tokens=160,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert response.usage is not None
        return response.usage.completion_tokens

    seen: list[ReplicaLoad] = []
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(complete, i) for i in range(CLIENTS)]
        while not all(f.done() for f in futures):
            result = read(server.url)
            assert result.failures == {}, result.failures
            seen.append(result.loads["replica"])
            time.sleep(0.02)
        tokens = [f.result() for f in futures]
    assert tokens == [160] * CLIENTS

    assert max(load.busy for load in seen) == SLOTS, seen
    assert max(load.queued for load in seen) >= 1, seen
    after = read(server.url).loads["replica"]
    assert after == ReplicaLoad(slots=SLOTS, busy=0, queued=0)

    # what the operator makes of the busiest moment: more replicas than the one serving
    busiest = max(seen, key=lambda load: load.busy + load.queued)
    policy = Policy(1, 8, target_utilization=0.8)
    wanted = recommend(observation(Scrape(loads={"replica": busiest}), SLOTS), policy, at=0.0)
    assert wanted.up >= 2 and wanted.up == wanted.down
    assert recommend(observation(Scrape(loads={"replica": after}), SLOTS), policy, at=0.0).up == 0
