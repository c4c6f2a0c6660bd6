"""Fixtures: an emulated cluster (kmock + harness), a Range-capable model server, the real operator."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import kmock
import pytest
import pytest_asyncio
import yaml
from harness import Cluster, ClusterEmulator, running_operator
from parallama_runtime.demo_model import DEMO_SHAPE, write_model


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "demo.gguf", DEMO_SHAPE)


class ModelServer:
    """Serves the demo GGUF over HTTP; aiohttp's file responses honour Range requests."""

    def __init__(self, url: str, sha256: str) -> None:
        self.url = url
        self.sha256 = sha256
        self.ranges: list[str | None] = []

    @property
    def source(self) -> dict[str, str]:
        """``spec.model`` for this file: http:// needs its sha256 (the CRD and the operator insist)."""
        return {"uri": self.url, "sha256": self.sha256}


@pytest.fixture(scope="session")
def gguf_sha256(gguf_path: Path) -> str:
    return hashlib.sha256(gguf_path.read_bytes()).hexdigest()


@pytest_asyncio.fixture()
async def model_server(gguf_path: Path, gguf_sha256: str) -> AsyncIterator[ModelServer]:
    server: ModelServer | None = None

    @aiohttp.web.middleware
    async def record(request: aiohttp.web.Request, handler: Any) -> aiohttp.web.StreamResponse:
        assert server is not None
        server.ranges.append(request.headers.get("Range"))
        response: aiohttp.web.StreamResponse = await handler(request)
        return response

    app = aiohttp.web.Application(middlewares=[record])
    app.router.add_static("/models/", gguf_path.parent)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server = ModelServer(f"http://127.0.0.1:{port}/models/{gguf_path.name}", gguf_sha256)
    yield server
    await runner.cleanup()


@pytest.fixture()
def model_url(model_server: ModelServer) -> str:
    return model_server.url


@pytest.fixture()
def model(model_server: ModelServer) -> dict[str, str]:
    return model_server.source


@pytest_asyncio.fixture()
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        url = str(server.url).rstrip("/")
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": url}}],
                    "users": [{"name": "kmock", "user": {"token": "test-token"}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
                    "current-context": "kmock",
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        import kubernetes.config.kube_config

        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        monkeypatch.setenv("PARALLAMA_REPLAN_DEBOUNCE_SECONDS", "0.3")
        monkeypatch.setenv("PARALLAMA_RESYNC_SECONDS", "3600")
        emulator.objects["v1/namespaces", None, "default"] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "default", "resourceVersion": "1"},
        }
        yield Cluster(emulator, url)


@pytest.fixture()
def operator_factory() -> Callable[[], contextlib.AbstractAsyncContextManager[None]]:
    return running_operator


def pytest_configure(config: pytest.Config) -> None:
    # kmock 0.8 reads its bundled resource list with a deprecated importlib.resources call
    config.addinivalue_line("filterwarnings", "ignore:read_binary is deprecated:DeprecationWarning")
