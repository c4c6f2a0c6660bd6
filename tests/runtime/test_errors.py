"""Every client mistake gets its documented status and a message that says what to fix."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import pytest
from parallama_runtime.serve import BackgroundServer
from runtime_helpers import SERVED_NAME, scrape, wait_for

pytestmark = pytest.mark.llama


def _post(url: str, payload: bytes | dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error), dict(error.headers)


def _message(body: dict[str, Any]) -> str:
    error = body["error"]
    return str(error["message"] if isinstance(error, dict) else error)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/api/generate", "/api/chat"])
def test_bad_json_is_400(server: BackgroundServer, path: str) -> None:
    status, body, _ = _post(server.url + path, b'{"model": "tiny", "prompt": ')
    assert status == 400
    assert "invalid JSON" in _message(body)
    status, body, _ = _post(server.url + path, b"[1, 2]")
    assert status == 400 and "JSON object" in _message(body)


def test_openai_error_shape(server: BackgroundServer) -> None:
    status, body, _ = _post(server.url + "/v1/completions", b"nope")
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == 400


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ("/v1/completions", {"prompt": "x"}),
        ("/api/generate", {"prompt": "x"}),
        ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}),
    ],
)
def test_unknown_model_is_404(server: BackgroundServer, path: str, payload: dict[str, Any]) -> None:
    status, body, _ = _post(server.url + path, {"model": "mistral:7b", **payload})
    assert status == 404
    assert "mistral:7b" in _message(body) and SERVED_NAME in _message(body)


def test_bad_option_types_are_400(server: BackgroundServer) -> None:
    status, body, _ = _post(server.url + "/api/generate", {"prompt": "x", "options": {"temperature": "hot"}})
    assert status == 400 and "options.temperature" in _message(body)
    status, body, _ = _post(server.url + "/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert status == 400 and "max_tokens" in _message(body)
    status, body, _ = _post(server.url + "/v1/chat/completions", {"messages": "hello"})
    assert status == 400 and "messages" in _message(body)


def test_prompt_longer_than_the_context(server: BackgroundServer) -> None:
    long_prompt = "word " * 400  # the shared server's slots hold 256 tokens
    status, body, _ = _post(server.url + "/v1/completions", {"prompt": long_prompt, "max_tokens": 4})
    assert status == 400
    assert "num_ctx" in _message(body) and "256" in _message(body)
    status, body, _ = _post(
        server.url + "/api/generate", {"prompt": long_prompt, "raw": True, "stream": False}
    )
    assert status == 400 and "truncate" in _message(body)
    status, body, headers = _post(
        server.url + "/api/generate",
        {
            "prompt": long_prompt,
            "raw": True,
            "stream": False,
            "truncate": True,
            "options": {"num_predict": 4, "ignore_eos": True},
        },
    )
    assert status == 200, body
    assert body["eval_count"] == 4 and body["prompt_eval_count"] < 256
    assert headers.get("X-Parallama-Truncated") == "true"


def test_num_ctx_option_is_ignored_with_a_note(server: BackgroundServer) -> None:
    status, body, headers = _post(
        server.url + "/api/generate",
        {"prompt": "x", "stream": False, "options": {"num_ctx": 8192, "num_predict": 2}},
    )
    assert status == 200
    assert "num_ctx" in headers.get("X-Parallama-Note", "")
    assert any("8192" in note for note in body["notes"])


async def test_full_queue_is_503_with_retry_after(make_server) -> None:  # type: ignore[no-untyped-def]
    server: BackgroundServer = make_server("--parallel", "1", "--max-queue", "1", "--num-ctx", "4096")
    engine = server.server.engine
    assert engine is not None
    long_body = {"model": SERVED_NAME, "prompt": "busy", "options": {"num_predict": 4000, "ignore_eos": True}}
    async with aiohttp.ClientSession() as session:
        running = [
            asyncio.create_task(session.post(server.url + "/api/generate", json=long_body)) for _ in range(2)
        ]
        assert await asyncio.to_thread(
            wait_for, lambda: engine.stats().slots_busy == 1 and engine.stats().queue_depth == 1
        ), engine.stats()
        async with session.post(server.url + "/v1/completions", json={"prompt": "one more"}) as response:
            assert response.status == 503
            assert int(response.headers["Retry-After"]) >= 1
            assert "busy" in (await response.json())["error"]["message"]
        async with session.post(server.url + "/api/generate", json={"prompt": "one more"}) as response:
            assert response.status == 503 and "max queue 1" in (await response.json())["error"]
        for task in running:
            (await task).close()
    assert await asyncio.to_thread(wait_for, lambda: engine.in_flight() == 0)
    assert scrape(server.url)['parallama_requests_total{api="openai",status="503"}'] == 1


async def test_sigterm_drains(make_server) -> None:  # type: ignore[no-untyped-def]
    server: BackgroundServer = make_server("--parallel", "1", "--num-ctx", "1024", "--shutdown-grace", "20")
    body = {
        "model": SERVED_NAME,
        "prompt": "finish me",
        "stream": False,
        "options": {"num_predict": 300, "ignore_eos": True},
    }
    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(session.post(server.url + "/api/generate", json=body))
        engine = server.server.engine
        assert engine is not None
        assert await asyncio.to_thread(wait_for, lambda: engine.in_flight() == 1)
        server.server.request_stop()  # what the SIGTERM handler calls
        assert await asyncio.to_thread(
            wait_for, lambda: server.server.api is not None and server.server.api.draining
        )
        async with session.get(server.url + "/readyz") as response:
            assert response.status == 503
        async with session.post(server.url + "/api/generate", json={"prompt": "late"}) as response:
            assert response.status == 503 and "shutting down" in (await response.json())["error"]
        response = await in_flight
        assert response.status == 200
        assert (await response.json())["eval_count"] == 300
    await asyncio.to_thread(server.stop)
    assert server.exit_code == 0
    assert engine.loaded is False  # llama.cpp objects freed
