"""Fake runtime ``/metrics`` endpoints on loopback addresses, for the autoscaler's tests.

Every address of 127.0.0.0/8 is local on Linux, so each fake replica gets its own address
(127.0.0.2, 127.0.0.3, ...) and the same port, as pods have their own IPs and one container port.
A test writes those addresses into the pods' ``status.podIP``; the operator then reads them exactly
as it reads real runtimes. The text is what ``parallama_runtime.metrics`` exports (gauges, with the
``_max`` high-water marks beside them so a parser that matches prefixes would be caught).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import aiohttp.web

__all__ = ["FakeRuntimes", "Load", "loopback"]


def loopback(index: int) -> str:
    """The address of fake replica ``index`` (0 -> 127.0.0.2: 127.0.0.1 stays the API server's)."""
    return f"127.0.0.{index + 2}"


@dataclass
class Load:
    slots: int = 4
    busy: int = 0
    queued: int = 0


def _free_port(addresses: list[str]) -> int:
    """A port free on every address (one container port for every pod)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((addresses[0], 0))
            port: int = probe.getsockname()[1]
        try:
            for address in addresses[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port is free on every loopback address")


class FakeRuntimes:
    """``/metrics`` of several replicas. ``set`` changes a replica's load; ``stop`` makes it
    unreachable (connection refused, as a pod whose process died); ``garble`` makes it answer text
    without the slot gauges (a runtime still loading, or something else on the port)."""

    def __init__(self, count: int) -> None:
        self.addresses = [loopback(i) for i in range(count)]
        self.loads = {address: Load() for address in self.addresses}
        self.garbled: set[str] = set()
        self.down: set[str] = set()
        self.requests: dict[str, int] = dict.fromkeys(self.addresses, 0)
        self.port = 0
        self._runner: aiohttp.web.AppRunner | None = None
        self._sites: dict[str, aiohttp.web.TCPSite] = {}

    async def __aenter__(self) -> FakeRuntimes:
        app = aiohttp.web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        self.port = _free_port(self.addresses)
        for address in self.addresses:
            await self.start(address)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def start(self, address: str) -> None:
        assert self._runner is not None
        self.down.discard(address)
        site = aiohttp.web.TCPSite(self._runner, address, self.port)
        await site.start()
        self._sites[address] = site

    async def stop(self, address: str) -> None:
        """New connections are refused; a kept-alive one is cut at its next request, as when the
        runtime's process dies (a client's pooled connection would otherwise still be served)."""
        self.down.add(address)
        site = self._sites.pop(address, None)
        if site is not None:
            await site.stop()

    def set(self, address: str, *, busy: int | None = None, queued: int | None = None) -> None:
        load = self.loads[address]
        if busy is not None:
            load.busy = busy
        if queued is not None:
            load.queued = queued

    def set_all(self, *, busy: int, queued: int) -> None:
        for address in self.addresses:
            self.set(address, busy=busy, queued=queued)

    def garble(self, address: str) -> None:
        self.garbled.add(address)

    async def _metrics(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        address = request.transport.get_extra_info("sockname")[0] if request.transport else ""
        self.requests[address] = self.requests.get(address, 0) + 1
        if address in self.down and request.transport is not None:
            request.transport.abort()
            raise aiohttp.web.HTTPServiceUnavailable()  # never sent: the connection is gone
        if address in self.garbled:
            return aiohttp.web.Response(text="# nothing to see\nup 1\n", content_type="text/plain")
        load = self.loads[address]
        lines = []
        for name, value in (
            ("parallama_slots_total", load.slots),
            ("parallama_slots_busy", load.busy),
            ("parallama_slots_busy_max", load.slots),
            ("parallama_queue_depth", load.queued),
            ("parallama_queue_depth_max", 99),
        ):
            lines += [f"# HELP {name} {name}", f"# TYPE {name} gauge", f"{name} {float(value)}"]
        return aiohttp.web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
