"""Constrained sampling: llama.cpp's grammar sampler, applied the way llama-server applies it.

**Where the grammar acts.** llama.cpp's common sampler (``common_sampler_sample``) keeps the grammar
out of the sampler chain: it samples with the chain as usual, checks the chosen token against the
grammar, and only when the grammar rejects it samples again with the grammar applied to the whole
vocabulary first (``-inf`` for every token it rejects), then the chain. The token finally chosen
always fits the grammar; the full-vocabulary pass, the expensive part, is paid only when the model's
own choice does not fit. :meth:`GrammarSampler.sample` does exactly that, over the request's chain
from :func:`.sampling.make_sampler`.

**Why the grammar is not in the chain.** ``llama_sampler_sample`` accepts whatever the chain selects
into every sampler of the chain, and llama.cpp's grammar aborts the process when it is made to
accept a token it rejects (an end-of-generation token before the text is complete) or throws
through C (any other). Settings can leave no token the grammar allows with a finite logit (a
``logit_bias`` ban on all of them, penalties or a temperature that overflow to ``-inf``): the
chain then selects a rejected token. So the grammar accepts a token only after it has been checked,
and a request left without any acceptable token ends with an error instead of taking the process
down. The grammar never sees the prompt either (it constrains the answer, and would refuse prompt
text): the chain's penalties are fed the prompt's tokens, the grammar only generated ones.

**Valid UTF-8.** Byte tokens can spell what is not UTF-8 (``C1 81``, a lead byte ``F9``): llama.cpp's
grammar decodes such sequences into code points its character classes accept, while the answer's
decoder turns each bad byte into U+FFFD, so a string could outgrow its ``maxLength`` or match no
pattern. A token whose bytes cannot continue the answer as UTF-8 is therefore refused like one the
grammar rejects, and drawn again without it.

**End of generation.** The grammar passes an end-of-generation token only once the answer is
complete (``llama_grammar_apply_impl``), so under a grammar such a token ends the request with
``stop`` even for ``ignore_eos`` requests, which would otherwise repeat end tokens until their
``max_tokens``.

**Limits.** The grammar is parsed when the request is submitted (:meth:`GrammarSampler.create`), so
an invalid one is a :class:`GrammarError` the API turns into a 400. llama.cpp's parser recurses
once per nested group and overflows the stack (a segfault) on nesting in the tens of thousands,
which no real grammar has; deeper nesting than :data:`MAX_GROUP_NESTING` is refused before parsing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from .values import GrammarError

__all__ = ["MAX_GROUP_NESTING", "Candidates", "GrammarSampler", "group_nesting"]

MAX_GROUP_NESTING = 2000
"""Deepest nesting of ``( )`` groups a grammar may have. llama.cpp's parser needs a few hundred
bytes of stack per level; 2000 levels stay far below a thread's 8 MiB, and llama.cpp itself refuses
repetitions past about a thousand nested optional groups (``MAX_REPETITION_THRESHOLD``)."""


def group_nesting(grammar: str) -> int:
    """How deeply ``( )`` groups nest in GBNF text, outside literals, character classes, token
    references and comments (GBNF's lexical rules: ``"..."``, ``[...]``, ``<...>`` with backslash
    escapes, ``#`` to the end of the line)."""
    depth = deepest = 0
    closing = {'"': '"', "[": "]", "<": ">"}
    i, n = 0, len(grammar)
    while i < n:
        char = grammar[i]
        if char in closing:
            end = closing[char]
            i += 1
            while i < n and grammar[i] != end:
                i += 2 if grammar[i] == "\\" else 1
        elif char == "#":
            while i < n and grammar[i] not in "\r\n":
                i += 1
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
        i += 1
    return deepest


class Candidates:
    """A ``llama_token_data_array`` over the whole vocabulary, refilled from a step's logits for each
    grammar-constrained draw. The scheduler's thread samples one request at a time, so one buffer
    serves every request (a large vocabulary's is a few MB)."""

    __slots__ = ("_ids", "_lib", "_view", "array", "data", "n_vocab")

    def __init__(self, lib: Any, n_vocab: int) -> None:
        self._lib = lib
        self.n_vocab = n_vocab
        self.data = (lib.llama_token_data * n_vocab)()
        self._view: Any = np.ctypeslib.as_array(self.data)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self.array = lib.llama_token_data_array(
            ctypes.cast(self.data, ctypes.POINTER(lib.llama_token_data)), n_vocab, -1, False
        )

    def fill(self, logits: Any) -> Any:
        """The array holding ``logits`` (every token, in id order, unsorted), ready to apply samplers."""
        view, array = self._view, self.array
        view["id"] = self._ids
        view["logit"] = logits
        view["p"] = 0.0
        array.data = ctypes.cast(self.data, ctypes.POINTER(self._lib.llama_token_data))
        array.size, array.selected, array.sorted = self.n_vocab, -1, False
        return array

    def ban(self, tokens: list[int]) -> None:
        """Take ``tokens`` out of a filled array (still in id order: the grammar only sets logits)."""
        if tokens:
            self._view["logit"][tokens] = -np.inf


class GrammarSampler:
    """One request's grammar: llama.cpp's grammar sampler (``handle``), created on the API's thread
    at submit, used and freed on the scheduler's thread."""

    __slots__ = ("_lib", "_one", "_one_array", "_pending", "handle")

    def __init__(self, lib: Any, handle: Any) -> None:
        self._lib = lib
        self.handle = handle
        self._one = lib.llama_token_data(0, 1.0, 0.0)
        self._one_array = lib.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)
        self._pending = b""
        """The answer's last bytes when they end inside a UTF-8 character."""

    @classmethod
    def create(
        cls, lib: Any, vocab: Any, grammar: str, *, why: Callable[[], str] | None = None
    ) -> GrammarSampler:
        """Parse ``grammar`` (root rule ``root``) for ``vocab``; :class:`GrammarError` when llama.cpp
        refuses it. ``why`` returns what llama.cpp logged about the refusal."""
        nesting = group_nesting(grammar)
        if nesting > MAX_GROUP_NESTING:
            raise GrammarError(f"the grammar nests groups {nesting} deep; at most {MAX_GROUP_NESTING}")
        handle = lib.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not handle:
            detail = why() if why is not None else ""
            raise GrammarError(
                "llama.cpp refused the grammar" + (f": {detail}" if detail else " (see the server log)")
            )
        return cls(lib, handle)

    def free(self) -> None:
        if self.handle is not None:
            self._lib.llama_sampler_free(self.handle)
            self.handle = None

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts ``token`` next (llama.cpp's single-token check)."""
        one = self._one
        one.id, one.logit, one.p = token, 1.0, 0.0
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        self._lib.llama_sampler_apply(self.handle, ctypes.byref(self._one_array))
        return bool(one.logit != -np.inf)

    def _fits(self, token: int, piece: bytes) -> bool:
        return self.allows(token) and _utf8_prefix(self._pending + piece)

    def sample(
        self, chain: Any, ctx: Any, index: int, candidates: Candidates, piece: Callable[[int], bytes]
    ) -> int | None:
        """The next token from output ``index``'s logits: the chain's choice if it fits, else the
        chain's choice among the tokens the grammar allows (again, without the tokens already
        found not to fit, up to :data:`REDRAWS` times). None when nothing fits (see the module's
        docstring). The token is accepted by the chain and the grammar. ``piece`` gives a token's
        bytes."""
        lib = self._lib
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), shape=(candidates.n_vocab,))
        token = _draw(lib, chain, candidates.fill(logits))
        refused: list[int] = []
        while token < 0 or not self._fits(token, piece(token)):
            if token >= 0:
                refused.append(token)
            if len(refused) > REDRAWS:
                return None
            array = candidates.fill(logits)
            lib.llama_sampler_apply(self.handle, ctypes.byref(array))
            candidates.ban(refused)
            token = _draw(lib, chain, array)
            if token < 0:
                return None
        lib.llama_sampler_accept(chain, token)
        lib.llama_sampler_accept(self.handle, token)
        tail = self._pending + piece(token)
        self._pending = tail[_complete_length(tail) :]
        return token


REDRAWS = 8
"""Draws among the grammar's tokens after the first one that did not fit. Only invalid UTF-8 (a
token whose bytes cannot continue the text) makes a grammar-allowed draw not fit; a handful of such
tokens exist, so a second draw almost always fits."""


def _utf8_prefix(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8 up to, possibly, an incomplete last character."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.end == len(data) and error.reason == "unexpected end of data"
    return True


def _complete_length(data: bytes) -> int:
    """Bytes of ``data`` (a valid UTF-8 prefix) that form complete characters."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the last character's first byte
            width = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if width <= back else len(data) - back
    return len(data)


def _draw(lib: Any, chain: Any, array: Any) -> int:
    """The chain's selection from ``array`` (-1 when it selected nothing); nothing is accepted."""
    lib.llama_sampler_apply(chain, ctypes.byref(array))
    if not 0 <= array.selected < array.size:
        return -1
    return int(array.data[array.selected].id)
