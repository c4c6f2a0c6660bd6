"""A request's life inside the engine, and the handle the API holds for it.

The scheduler thread owns every field of :class:`Request` after admission; the event queue is the
only thing the asyncio side reads, and events cross with ``call_soon_threadsafe`` (see
:func:`deliver`), one call per step and loop rather than per token.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from .grammar import GrammarSampler
from .logprobs import LogprobQueue
from .sampling import StopMatcher
from .values import Event, Finish, SamplingParams

__all__ = ["Request", "RequestHandle", "deliver"]


class Request:
    __slots__ = (
        "cached",
        "cancelled",
        "decoder",
        "done",
        "fed",
        "first_at",
        "gaps",
        "generated",
        "grammar",
        "id",
        "last_at",
        "logit_index",
        "logprobs",
        "loop",
        "n_past",
        "next_token",
        "params",
        "prompt",
        "queue",
        "sampler",
        "seq_id",
        "started_at",
        "stops",
        "submitted_at",
    )

    def __init__(
        self, rid: int, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.id = rid
        self.prompt = prompt
        self.params = params
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.submitted_at = time.perf_counter()
        self.started_at = 0.0
        self.first_at = 0.0
        self.last_at = 0.0
        self.gaps: list[float] = []
        self.cancelled = False
        self.done = False
        self.grammar: GrammarSampler | None = None
        """The request's grammar, parsed at submit; freed with the request's sampler."""
        # set on admission (scheduler thread only)
        self.seq_id = -1
        self.sampler: Any = None
        self.cached = 0
        """Prompt tokens found in the cache (not computed)."""
        self.fed = 0
        """Prompt tokens in the cache, found or computed."""
        self.n_past = 0
        """Tokens of this request in the cache (prompt and fed answer tokens): its next position."""
        self.next_token = -1
        self.generated = 0
        self.logit_index = -1
        self.stops = StopMatcher(params.stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.logprobs = LogprobQueue() if params.logprobs is not None else None
        """Entries waiting for their text (only for requests that ask for logprobs)."""

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


class RequestHandle:
    """What the API holds for a submitted request: iterate for events, cancel to free the slot."""

    def __init__(self, request: Request, cancel: Callable[[Request], None]) -> None:
        self._request = request
        self._cancel = cancel
        self.prompt_tokens = len(request.prompt)
        self.truncated = False

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._request.queue.get()
            yield event
            if isinstance(event, Finish):
                return

    def cancel(self) -> None:
        """Idempotent; a no-op once the request finished."""
        if not self._request.done:
            self._cancel(self._request)


def deliver(outbox: list[tuple[Request, Event]]) -> None:
    """Hand a step's events to their loops: one thread-safe call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Event]]] = {}
    for item in outbox:
        by_loop.setdefault(item[0].loop, []).append(item)
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Request, Event]]) -> None:
    for request, event in items:
        request.queue.put_nowait(event)
