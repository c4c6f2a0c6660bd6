"""Work a request causes is bounded before it is done, big work stays off the event loop, and a dead
scheduler shows in /healthz (so that Kubernetes restarts the pod).

Everything runs against real servers on the generated model. Whether a step happened is observed by
wrapping ``engine.tokenize`` on the running engine (it is called on the server's threads), never by
timing it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from parallama_runtime.api import RequestLimits
from parallama_runtime.engine import Engine, SamplingParams
from parallama_runtime.serve import BackgroundServer
from runtime_helpers import wait_for

pytestmark = pytest.mark.llama

ROUTES = ["/v1/chat/completions", "/v1/completions", "/api/generate", "/api/chat"]


def _payload(path: str, text: str, **extra: Any) -> dict[str, Any]:
    if path.endswith("chat") or path.endswith("chat/completions"):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
    else:
        body = {"prompt": text}
    if path.startswith("/api/"):
        body["stream"] = False
        body["options"] = {"num_predict": 1}
    else:
        body["max_tokens"] = 1
    body.update(extra)
    return body


def _post(url: str, payload: bytes | dict[str, Any], timeout: float = 60) -> tuple[int, Any, dict[str, str]]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error), dict(error.headers)


def _get(url: str, timeout: float = 10) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def _message(path: str, body: dict[str, Any]) -> str:
    """The error text, checking the route's dialect: OpenAI nests an object, Ollama has a string."""
    error = body["error"]
    if path.startswith("/v1/"):
        assert isinstance(error, dict) and error["type"] == "invalid_request_error", body
        return str(error["message"])
    assert isinstance(error, str), body
    return error


def _engine(server: BackgroundServer) -> Engine:
    engine = server.server.engine
    assert engine is not None
    return engine


def _limits(server: BackgroundServer) -> RequestLimits:
    api = server.server.api
    assert api is not None
    return api.limits


@pytest.fixture
def tokenize_calls(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads the shared server's engine tokenized on, while the test runs."""
    engine = _engine(server)
    original = engine.tokenize
    calls: list[str] = []

    def wrapped(text: str, **kwargs: Any) -> list[int]:
        calls.append(threading.current_thread().name)
        return original(text, **kwargs)

    monkeypatch.setattr(engine, "tokenize", wrapped)
    return calls


# ---------------------------------------------------------------------------- body size


def test_body_limit_follows_num_ctx_with_a_floor() -> None:
    assert RequestLimits(256).max_body_bytes == RequestLimits(32768).max_body_bytes == 4 * 1024 * 1024
    assert RequestLimits(131072).max_body_bytes == 8 * 1024 * 1024
    assert RequestLimits(1 << 20).max_body_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize("path", ROUTES)
def test_too_large_a_body_is_413_before_it_is_read(
    server: BackgroundServer, tokenize_calls: list[str], path: str
) -> None:
    limit = _limits(server).max_body_bytes
    text = "x" * (limit + 1)
    status, body, _ = _post(server.url + path, _payload(path, text))
    assert status == 413, body
    message = _message(path, body)
    assert str(limit) in message and "num_ctx=256" in message
    assert tokenize_calls == []


def test_a_declared_size_over_the_limit_is_refused_without_waiting_for_the_body(
    server: BackgroundServer,
) -> None:
    """Only the headers and a few bytes are sent: the answer can only come from the Content-Length
    (a server that read the body first would still be waiting for it when the probe gives up)."""
    limit = _limits(server).max_body_bytes
    head = (
        f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {limit + 1}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + b'{"prompt": "')
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)
            assert data, reply
            reply += data
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


@pytest.mark.parametrize("path", ["/v1/completions", "/api/generate"])
async def test_too_large_a_chunked_body_is_413(server: BackgroundServer, path: str) -> None:
    """Without a Content-Length the limit is found while reading; the answer is the same."""
    limit = _limits(server).max_body_bytes
    head = json.dumps(_payload(path, ""))[:-1].encode() + b', "padding": "'

    async def chunks() -> AsyncIterator[bytes]:
        yield head
        for _ in range(limit // (1 << 16) + 2):
            yield b"y" * (1 << 16)
        yield b'"}'

    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + path, data=chunks(), headers={"Content-Type": "application/json"}) as r,
    ):
        assert r.status == 413
        body = await r.json()
    assert str(limit) in _message(path, body)


# ---------------------------------------------------------------------------- prompt length


@pytest.mark.parametrize("path", ROUTES)
def test_a_prompt_too_long_by_its_size_alone_is_refused_before_tokenizing(
    server: BackgroundServer, tokenize_calls: list[str], path: str
) -> None:
    limits = _limits(server)
    text = "word " * (limits.token_bytes * limits.num_ctx // 5 + 1)  # more bytes than num_ctx tokens can hold
    status, body, _ = _post(server.url + path, _payload(path, text))
    assert status == 400, body
    message = _message(path, body)
    assert "num_ctx" in message and "256" in message
    assert ('"truncate": true' in message) == path.startswith("/api/")
    assert tokenize_calls == []


def test_the_bound_uses_the_engines_longest_token(
    server: BackgroundServer, tokenize_calls: list[str]
) -> None:
    """With the vocabulary's longest token (6 bytes: ``<0xFF>`` in the generated model) a few KiB
    are refused unseen; a prompt the bound cannot rule out is tokenized, and the engine refuses it."""
    assert _engine(server).max_token_bytes == 6  # llama.cpp's "max token length" for this vocabulary
    status, body, _ = _post(server.url + "/api/generate", _payload("/api/generate", "word " * 400, raw=True))
    assert status == 400 and "at least 334 tokens" in body["error"], body
    assert tokenize_calls == []
    status, body, _ = _post(server.url + "/api/generate", _payload("/api/generate", "word " * 200, raw=True))
    assert status == 400 and "num_ctx" in body["error"], body
    assert len(tokenize_calls) == 1  # the engine's own check, after tokenizing


def test_the_lower_bound_never_exceeds_the_real_token_count(server: BackgroundServer) -> None:
    """The bound must only refuse what cannot fit: over texts made of the model's longest tokens,
    special tokens (parsed as one token each), spaces and multi-byte characters, the real count is
    never below it, with the engine's bound or the fallback."""
    engine = _engine(server)
    texts = [
        "<s>" * 50,
        "</s><unk>" * 40,
        "\u2581" * 100,
        " " * 300,
        "é中😀" * 60,
        "\udcff" * 3 + "a",
        "plain words " * 30,
        "",
    ]
    reported = engine.max_token_bytes
    for limits in (RequestLimits(256, reported), RequestLimits(256, 0)):
        for text in texts:
            try:
                tokens = engine.tokenize(text, add_special=False, parse_special=True)
            except UnicodeEncodeError:
                continue
            assert len(tokens) >= limits.min_tokens(text), (text[:20], limits)


def test_truncation_skips_the_size_check(server: BackgroundServer, tokenize_calls: list[str]) -> None:
    limits = _limits(server)
    text = "word " * (limits.token_bytes * limits.num_ctx // 5 + 1)
    status, body, headers = _post(
        server.url + "/api/generate",
        _payload("/api/generate", text, raw=True, truncate=True),
    )
    assert status == 200, body
    assert headers.get("X-Parallama-Truncated") == "true"
    assert body["prompt_eval_count"] < 256
    assert len(tokenize_calls) == 1


def test_lone_surrogates_are_400_not_500(server: BackgroundServer) -> None:
    status, body, _ = _post(server.url + "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 1}')
    assert status == 400 and "Unicode" in body["error"]["message"], body


# ---------------------------------------------------------------------------- off the event loop


@pytest.fixture(scope="module")
def roomy(model_path: Path) -> Iterator[BackgroundServer]:
    """One slot of 4096 tokens: a prompt of ~10 KiB passes the size check and is tokenized."""
    from runtime_helpers import settings_for

    running = BackgroundServer(settings_for(model_path, "--parallel", "1", "--num-ctx", "4096")).start()
    yield running
    running.stop()


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("large", [False, True])
def test_large_prompts_are_tokenized_off_the_event_loop(
    roomy: BackgroundServer, monkeypatch: pytest.MonkeyPatch, path: str, large: bool
) -> None:
    engine = _engine(roomy)
    original = engine.tokenize
    threads: list[str] = []

    def wrapped(text: str, **kwargs: Any) -> list[int]:
        threads.append(threading.current_thread().name)
        return original(text, **kwargs)

    monkeypatch.setattr(engine, "tokenize", wrapped)
    size = RequestLimits.OFFLOAD_BYTES + 1024 if large else 64
    text = "abcdefgh" * (size // 8)
    status, body, _ = _post(roomy.url + path, _payload(path, text))
    assert status in (200, 400), body  # 400: the engine's own length check, after tokenizing
    assert len(threads) == 1
    if large:
        assert threads[0].startswith("parallama-prep"), threads
    else:  # small prompts stay inline: the hop would cost more than the work
        assert threads[0] == "parallama-server", threads


def test_the_event_loop_answers_while_a_huge_prompt_is_tokenized(
    roomy: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokenizing is held until /healthz has answered: if it ran on the event loop, /healthz could
    not answer and the probe would time out (the tokenizer is released in any case)."""
    engine = _engine(roomy)
    original = engine.tokenize
    entered = threading.Event()
    release = threading.Event()

    def held(text: str, **kwargs: Any) -> list[int]:
        entered.set()
        release.wait(30)
        return original(text, **kwargs)

    monkeypatch.setattr(engine, "tokenize", held)
    path = "/api/chat"
    result: list[int] = []
    client = threading.Thread(
        target=lambda: result.append(_post(roomy.url + path, _payload(path, "z" * 20000))[0]), daemon=True
    )
    client.start()
    try:
        assert entered.wait(30), "the prompt never reached the tokenizer"
        status, body = _get(roomy.url + "/healthz", timeout=10)
        assert (status, body["status"]) == (200, "alive")
    finally:
        release.set()
        client.join(60)
    assert result and result[0] in (200, 400)


# ---------------------------------------------------------------------------- /healthz


class _Killed(BaseException):
    """Not an Exception: the scheduler's own handler cannot catch it, its thread just ends."""


def test_healthz_fails_once_the_scheduler_crashed(make_server: Callable[..., BackgroundServer]) -> None:
    running = make_server("--parallel", "1", "--num-ctx", "128", "--shutdown-grace", "0")
    engine = _engine(running)
    assert _get(running.url + "/healthz") == (200, {"status": "alive"})

    def crash(ctx: Any, batch: Any) -> int:
        raise RuntimeError("injected bug")

    engine._decode = crash  # type: ignore[method-assign]
    status, body, _ = _post(running.url + "/v1/completions", {"prompt": "hello", "max_tokens": 2})
    assert status >= 500, body
    assert wait_for(lambda: engine.failed, timeout=30)
    status, body = _get(running.url + "/healthz")
    assert status == 503 and body["status"] == "failed" and "scheduler" in body["error"], body
    status, body = _get(running.url + "/readyz")
    assert status == 503 and "scheduler" in body["error"]
    assert running.exit_code is None  # nothing else stops the pod: the probe must


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_healthz_fails_once_the_scheduler_thread_is_gone(
    make_server: Callable[..., BackgroundServer],
) -> None:
    running = make_server("--parallel", "1", "--num-ctx", "128", "--shutdown-grace", "0")
    engine = _engine(running)

    def die(ctx: Any, batch: Any) -> int:
        raise _Killed

    engine._decode = die  # type: ignore[method-assign]
    loop = running._loop
    assert loop is not None

    async def submit() -> None:  # a request with no client waiting on it: the thread dies silently
        engine.submit(engine.tokenize("hi"), SamplingParams(max_tokens=2))

    asyncio.run_coroutine_threadsafe(submit(), loop).result(10)
    assert wait_for(lambda: not engine.scheduler_alive(), timeout=30)
    assert engine.failed  # the engine marks itself failed on its way out, whatever killed it
    status, body = _get(running.url + "/healthz")
    assert status == 503 and "scheduler" in body["error"], body
    engine.failed = False  # a thread that died without a word (the probe's other half)
    status, body = _get(running.url + "/healthz")
    assert status == 503 and "stopped" in body["error"], body


def test_healthz_stays_alive_while_draining(make_server: Callable[..., BackgroundServer]) -> None:
    running = make_server("--parallel", "1", "--num-ctx", "64")
    api = running.server.api
    assert api is not None
    api.draining = True  # what SIGTERM sets first
    try:
        assert _get(running.url + "/healthz") == (200, {"status": "alive"})
        assert _get(running.url + "/readyz")[0] == 503
    finally:
        api.draining = False
