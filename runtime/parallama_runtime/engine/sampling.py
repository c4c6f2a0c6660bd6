"""Sampling: llama.cpp's own sampler chain per request, and stop sequences over the streamed text.

The samplers are llama.cpp's C implementations (logit bias, penalties, top-k, typical, top-p,
min-p, temperature, distribution), chained in the order llama-server uses, so a seed means the
same thing here as there. Stop sequences are matched on decoded text, not tokens: a stop can start
in the middle of a token and span several, so text that could still grow into a stop is held back
until it cannot.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from .values import SamplingParams

__all__ = ["GRAMMAR_BAN", "StopMatcher", "make_sampler"]

GRAMMAR_BAN = -1e9
"""What a ``logit_bias`` ban (-inf) becomes under a grammar: far enough below any logit that a banned
token is never drawn while another is possible, yet finite, so that when the grammar allows only
banned tokens (JSON needs its ``{``) the answer still follows the grammar instead of failing."""


def make_sampler(lib: Any, params: SamplingParams, n_vocab: int, prompt: Sequence[int]) -> Any:
    """A new sampler chain for one request (the caller frees it with ``llama_sampler_free``).

    The repetition penalties see the prompt's last ``repeat_last_n`` tokens, as in llama-server. A
    request's grammar is not part of the chain (see :mod:`.grammar`), so it never sees the prompt."""
    p = params
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    if p.logit_bias:  # first, as in llama-server: the biased logits are what every later stage sees
        ban = -math.inf if p.grammar is None else GRAMMAR_BAN
        biases = (lib.llama_logit_bias * len(p.logit_bias))(
            *(lib.llama_logit_bias(token, max(bias, ban)) for token, bias in p.logit_bias.items())
        )
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
    penalised = p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
    if penalised:
        penalties = lib.llama_sampler_init_penalties(
            n_vocab, p.repeat_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
        )
        for token in prompt[-p.repeat_last_n :] if p.repeat_last_n else ():
            lib.llama_sampler_accept(penalties, token)  # the prompt reaches the penalties alone
        lib.llama_sampler_chain_add(chain, penalties)
    if p.temperature <= 0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    else:
        if p.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(p.top_k))
        if 0 < p.typical_p < 1:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_typical(p.typical_p, 1))
        if 0 < p.top_p < 1:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(p.min_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(p.temperature))
        seed = p.seed if p.seed is not None else random.getrandbits(32)
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


class StopMatcher:
    """Streams text through, cut at the earliest stop sequence.

    ``feed`` returns the text that can be sent now and whether a stop was reached; what might still
    become a stop stays in ``pending`` and comes out of :meth:`flush` when generation ends for
    another reason (end of generation, length), so no answer text is ever lost."""

    __slots__ = ("pending", "stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        text = self.pending + text
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.pending = ""
            return text[: min(found)], True
        hold = held_back(text, self.stops)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop sequence."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
