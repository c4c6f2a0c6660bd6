"""Log-probabilities of generated tokens, for the requests that ask for them.

**Which distribution.** The model's: a log-softmax over the raw logits of the step, before any
sampling setting (temperature, top-k/top-p/min-p, penalties, ``logit_bias``, a grammar). That is
what OpenAI reports and what llama-server reports by default (``n_probs`` with
``post_sampling_probs`` false: ``get_token_probabilities`` softmaxes ``llama_get_logits_ith``), and
it is the only one that means the same thing whatever the sampler did: after top-k or a grammar,
most alternatives would be -inf. So a token sampled at a high temperature may have a low logprob,
and greedy decoding without penalties picks the top-1 alternative.

**Token text.** ``token`` is the text the token adds to the answer, decoded like the answer itself
(incrementally, UTF-8): a token holding the first bytes of a character has the empty text and the
token completing it carries the whole character, so the tokens' texts join to the answer. ``bytes``
are the token's own bytes, exact even when they are part of a character. Alternatives are decoded as
if they came next (after the same incomplete bytes).

**Which chunk carries an entry.** The one that carries the token's text: text the stop matcher holds
back (it may still become a stop sequence) holds its tokens' entries back too, so an entry never
arrives before its text. When a stop sequence ends the answer, the tokens that only made up the stop
are not reported (their text is not part of the answer), nor is the end-of-generation token.

The cost is paid only by requests that ask: one pass over the vocabulary's logits (a max, an exp and a
sum; ~0.1 ms for 150k tokens) and a partial sort for the top alternatives.
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from .values import TokenLogprob, TopLogprob

__all__ = ["LogprobQueue", "token_logprob"]


def token_logprob(
    logits: Any, n_vocab: int, token: int, top: int, piece: Callable[[int], bytes], pending: bytes
) -> TokenLogprob:
    """The chosen ``token``'s log-probability and the ``top`` most likely tokens of one row of logits.

    ``logits``: llama.cpp's ``float *`` for the row (``llama_get_logits_ith``), read at once, before
    the next decode overwrites it; ``pending``: the bytes of an incomplete character the answer's
    decoder holds (see the module docstring)."""
    row = np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
    peak = float(row.max())
    # log-softmax, stable: log(sum(exp(x - max))) never overflows; summed in float64
    log_total = peak + float(np.log(np.exp(row - peak, dtype=np.float64).sum()))
    alternatives: tuple[TopLogprob, ...] = ()
    if top > 0:
        k = min(top, n_vocab)
        best = np.argpartition(row, n_vocab - k)[n_vocab - k :]
        best = best[np.lexsort((best, -row[best]))]  # most likely first; ties by token id
        alternatives = tuple(_entry(int(t), float(row[t]) - log_total, piece, pending) for t in best)
    chosen = _entry(token, float(row[token]) - log_total, piece, pending)
    return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, alternatives)


def _entry(token: int, logprob: float, piece: Callable[[int], bytes], pending: bytes) -> TopLogprob:
    raw = piece(token)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    if pending:
        decoder.setstate((pending, 0))
    return TopLogprob(decoder.decode(raw), logprob, tuple(raw))


class LogprobQueue:
    """Entries waiting for their text to be sent (see the module docstring).

    Positions count characters of the decoded answer: an entry spans the text its token added, and it
    goes out once everything up to its end has been sent."""

    __slots__ = ("_entries", "_fed", "_sent")

    def __init__(self) -> None:
        self._entries: list[tuple[int, int, TokenLogprob]] = []
        self._fed = 0
        self._sent = 0

    def add(self, entry: TokenLogprob, text: str) -> None:
        """A token whose decoded text is ``text`` (its place is after the previous tokens')."""
        start = self._fed
        self._fed += len(text)
        self._entries.append((start, self._fed, entry))

    def sent(self, text: str) -> tuple[TokenLogprob, ...]:
        """``text`` went out: the entries whose text is now all out."""
        self._sent += len(text)
        return self._take(lambda start, end: end <= self._sent)

    def stopped(self, text: str) -> tuple[TokenLogprob, ...]:
        """A stop sequence ended the answer after ``text``: the entries of tokens with any text in
        the answer; those that only made up the stop are dropped."""
        self._sent += len(text)
        out = self._take(lambda start, end: start < self._sent)
        self._entries.clear()
        return out

    def rest(self) -> tuple[TokenLogprob, ...]:
        """Generation ended for another reason: every entry still held goes with the last text."""
        out = tuple(entry for _, _, entry in self._entries)
        self._entries.clear()
        return out

    def _take(self, ready: Callable[[int, int], bool]) -> tuple[TokenLogprob, ...]:
        count = 0
        while count < len(self._entries) and ready(*self._entries[count][:2]):
            count += 1
        out = tuple(entry for _, _, entry in self._entries[:count])
        del self._entries[:count]
        return out
