"""Fixtures shared by every suite: generated GGUF models and a file server with Range support."""

from __future__ import annotations

import http.server
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from parallama_runtime.demo_model import DEMO_SHAPE, ModelShape, write_model

TINY_SHAPE = ModelShape(
    block_count=2, embedding_length=64, head_count=4, head_count_kv=2, feed_forward_length=192, name="tiny"
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer llama GGUF of about 200 KB: loads in milliseconds."""
    return write_model(tmp_path_factory.mktemp("models") / "tiny.gguf", TINY_SHAPE)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "demo.gguf", DEMO_SHAPE)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with single-range ``Range: bytes=a-b`` support, as model hosts do."""

    honour_range = True
    served_bytes = 0

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if not (self.honour_range and match):
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            return  # the body is never needed: the client must refuse to read it
        start = int(match.group(1))
        end = min(int(match.group(2) or size - 1), size - 1)
        if start >= size:
            self.send_error(416)
            return
        with path.open("rb") as handle:
            handle.seek(start)
            body = handle.read(end - start + 1)
        type(self).served_bytes += len(body)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FileServer:
    def __init__(self, directory: Path, honour_range: bool = True) -> None:
        handler = type("Handler", (_RangeHandler,), {"honour_range": honour_range, "served_bytes": 0})
        self.handler = handler

        def factory(*args: object, **kwargs: object) -> _RangeHandler:
            return handler(*args, directory=os.fspath(directory), **kwargs)  # type: ignore[arg-type]

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def served_bytes(self) -> int:
        return int(self.handler.served_bytes)

    def url(self, name: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def file_server_factory() -> Iterator[type[FileServer]]:
    """``factory(directory, honour_range=True)`` -> a running :class:`FileServer`, closed afterwards."""
    servers: list[FileServer] = []

    class Factory(FileServer):
        def __init__(self, directory: Path, honour_range: bool = True) -> None:
            super().__init__(directory, honour_range)
            servers.append(self)

    yield Factory
    for server in servers:
        server.close()
