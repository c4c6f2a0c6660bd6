"""Fixtures for the runtime suite: a generated GGUF and real servers on free loopback ports.

The servers run in-process on their own thread and event loop (``serve.BackgroundServer``), so the
tests can use blocking clients (openai, ollama) and also look at the engine's state directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import ollama
import openai
import pytest
from parallama_runtime import serve
from parallama_runtime.demo_model import DEMO_SHAPE, write_model
from runtime_helpers import SERVED_NAME, have_llama, settings_for


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not have_llama():
        pytest.skip("llama-cpp-python is not installed")
    return write_model(tmp_path_factory.mktemp("models") / f"{SERVED_NAME}.gguf", DEMO_SHAPE, seed=7)


@pytest.fixture(scope="session")
def server(model_path: Path) -> Iterator[serve.BackgroundServer]:
    """2 slots of 256 tokens, up to 4 waiting: the shared server most tests talk to."""
    running = serve.BackgroundServer(
        settings_for(model_path, "--parallel", "2", "--num-ctx", "256", "--max-queue", "4")
    ).start()
    yield running
    running.stop()


@pytest.fixture
def make_server(model_path: Path) -> Iterator[Callable[..., serve.BackgroundServer]]:
    started: list[serve.BackgroundServer] = []

    def make(*extra: str) -> serve.BackgroundServer:
        running = serve.BackgroundServer(settings_for(model_path, *extra)).start()
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def oai(server: serve.BackgroundServer) -> openai.OpenAI:
    """The official OpenAI client on the shared server."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def oll(server: serve.BackgroundServer) -> ollama.Client:
    """The official Ollama client on the shared server."""
    return ollama.Client(host=server.url)
