"""The prompt cache: which token sequences the KV pool holds and where a new request should start.

llama.cpp's unified cache is one pool of cells. A cell holds one position's keys and values and
belongs to a set of sequence ids: ``seq_cp`` adds a sequence id to existing cells (no memory is
copied), ``seq_rm`` takes one away and frees the cells nobody holds any more. That makes three
things cheap that per-slot caches cannot do:

* a finished request's cells stay where they are until the space is needed, so the next turn of a
  conversation only computes what is new;
* a prefix several requests share (a system prompt) is computed once and held by all of them;
* when the pool runs short, the least recently used finished sequences give their cells back.

Cached cells are not free, though: llama.cpp's attention spans every cell of the pool up to the
highest one in use, masked or not, so each cell kept costs every running token a little attention
(20 % of the decode rate of a small model on a CPU when a pool of 2,048 cells is full of prompts
nobody sends again). The cache therefore keeps room in proportion to what it has been serving: the
share of recent prompt tokens found in the pool (prefixes of 16 tokens or more), doubled, of the pool.
Chat traffic (most of every prompt is history) keeps the whole pool; unrelated prompts keep little.
The share counts what evicted sequences would have served too (their tokens are remembered, not their
cells), so a cache squeezed too small sees what it misses and grows back.

This module decides and keeps the books; the llama.cpp calls go through a :class:`KVMemory`, so
the policy is tested without a model. The books count cells exactly as llama.cpp does: a run of
cells created by one sequence is shared by every sequence that copied a prefix of it, and lives as
long as the furthest-reaching of them.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["CachedSequence", "KVMemory", "Placement", "PromptCache", "common_prefix"]


class KVMemory(Protocol):
    """The slice of llama.cpp's memory API the cache uses (``llama_memory_seq_*``; p1 exclusive)."""

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool: ...

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None: ...

    def seq_pos_min(self, seq_id: int) -> int: ...


@dataclass(eq=False)
class _Run:
    """Cells one sequence created at consecutive positions from ``start``; ``ends`` maps each
    sequence holding some of them to how far it reaches (exclusive)."""

    start: int
    ends: dict[int, int] = field(default_factory=dict)

    @property
    def cells(self) -> int:
        return max(self.ends.values()) - self.start if self.ends else 0


class CachedSequence:
    """One sequence id of the context: the tokens its cells hold, in position order."""

    __slots__ = ("active", "id", "last_used", "runs", "tail", "tokens")

    def __init__(self, seq_id: int) -> None:
        self.id = seq_id
        self.tokens: list[int] = []
        self.runs: list[_Run] = []
        self.tail: _Run | None = None
        """The run new tokens extend; None after a cut, so that later tokens get cells of their own."""
        self.active = False
        self.last_used = 0


@dataclass(frozen=True)
class Placement:
    """Where an admitted request runs: its sequence id and how much of its prompt is already there."""

    seq_id: int
    reused: int
    shared_from: int | None = None
    """The sequence whose cells it now shares, when the prefix was copied rather than taken over."""


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``: a binary search over slice
    comparisons, which run in C (prompts of thousands of tokens against every cached sequence)."""
    a, b = list(a), list(b)
    lo, hi = 0, min(len(a), len(b), limit)
    if a[:hi] == b[:hi]:
        return max(hi, 0)
    while lo < hi - 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PromptCache:
    """Books and policy over ``n_seq`` sequence ids sharing a pool of ``n_cells`` cells.

    ``share``: prefixes may be copied between sequences (False for recurrent state, which is one
    snapshot per sequence and cannot be cut at a position). ``keep``: finished requests keep their
    cells (the prompt cache on); without it a sequence is cleared when its request ends.
    """

    TAKE_OVER_FRACTION = 0.5
    """Where a prefix comes from a finished sequence with more after it (another user's
    conversation, say), the prefix is shared into an empty sequence so the rest stays cached. Only
    when no sequence id is spare does the new request take the donor over (dropping its tail), and
    only if the prefix is at least this share of it; otherwise the least recently used sequence is
    evicted. llama-server keeps the same threshold before it saves a slot to its host cache."""

    RECENT_REQUESTS = 64
    """How many admissions the cache's hit ratio (and so its room) is measured over, and how many
    evicted sequences it remembers the tokens of."""

    MIN_HISTORY = 8
    """Admissions before the hit ratio limits the room (until then the whole pool may be kept)."""

    MIN_HIT = 16
    """Shorter prefixes (a BOS token, a chat template's first line) save too little to earn room, and
    are not cut out of a sequence or shared either: a few shared cells keep an old sequence's first
    cells alive wherever they lie in the pool, and attention spans the pool up to its highest used
    cell. A sequence the prompt continues whole is reused whatever its length."""

    def __init__(
        self,
        memory: KVMemory,
        n_seq: int,
        n_cells: int,
        *,
        share: bool,
        keep: bool = True,
        min_reuse: int = MIN_HIT,
    ) -> None:
        if n_seq < 1 or n_cells < 1:
            raise ValueError("a prompt cache needs at least one sequence and one cell")
        self.min_reuse = min_reuse
        self.memory = memory
        self.n_cells = n_cells
        self.share = share
        self.keep = keep
        self.sequences = [CachedSequence(i) for i in range(n_seq)]
        self.live_cells = 0
        self._runs: set[_Run] = set()
        self._clock = 0
        self._recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=self.RECENT_REQUESTS)
        self._ghosts: collections.deque[list[int]] = collections.deque(maxlen=self.RECENT_REQUESTS)

    # ------------------------------------------------------------------ policy

    def acquire(self, prompt: Sequence[int]) -> Placement:
        """Choose and prepare a sequence for a new request; the caller then computes
        ``prompt[placement.reused:]``. At least one prompt token is always left to compute (its
        logits give the first answer token). Needs an idle sequence: callers admit at most
        ``n_seq`` requests at once."""
        donor, length = self._best_prefix(prompt)
        idle_donor = donor if donor is not None and not donor.active else None
        if idle_donor is not None and length == len(idle_donor.tokens):
            # the donor is all prefix (the same conversation's last turn): continue it in place
            idle_donor.active = True
            self._note(prompt, length)
            return Placement(idle_donor.id, length)
        free = self._empty_sequence()
        if (
            free is None
            and idle_donor is not None
            and length >= self.TAKE_OVER_FRACTION * len(idle_donor.tokens)
        ):
            free = idle_donor  # no spare sequence: losing the donor's short tail beats evicting
        if free is None:
            free = self._evict_for_new(exclude=donor)
        if free is None:  # the donor is the only idle sequence there is
            if idle_donor is None:
                raise RuntimeError("no idle sequence for a new request")
            free = idle_donor
        if free is idle_donor:
            target, reused, shared = free, self._cut(free, length), None
        else:
            target, reused, shared = free, 0, None
            if donor is not None and self.share:
                self._copy(donor, target, length)
                reused, shared = length, donor.id
        target.active = True
        self._note(prompt, reused)
        return Placement(target.id, reused, shared)

    def release(self, seq_id: int, *, keep: bool = True) -> None:
        """The request on ``seq_id`` ended; its cells stay for later prefixes if ``keep``."""
        sequence = self.sequences[seq_id]
        sequence.active = False
        self._clock += 1
        sequence.last_used = self._clock
        if not (keep and self.keep):
            self._clear(sequence)
        self._trim(self.room())

    def room(self) -> int:
        """Cells finished sequences may keep: in proportion to the recent hit ratio (see above)."""
        if len(self._recent) < self.MIN_HISTORY:
            return self.n_cells
        prompts = sum(n for n, _ in self._recent)
        share = sum(r for _, r in self._recent) / prompts if prompts else 1.0
        return int(self.n_cells * min(1.0, 2 * share))

    def _note(self, prompt: Sequence[int], found: int) -> None:
        """Record an admission: its prompt length and what the cache served or, had it kept what
        it evicted, could have served."""
        limit = len(prompt) - 1
        could = max((common_prefix(ghost, prompt, limit) for ghost in self._ghosts), default=0)
        hit = max(found, could)
        self._recent.append((len(prompt), hit if hit >= self.MIN_HIT else 0))

    def _trim(self, room: int) -> None:
        while self.cached_cells() > room:
            idle = [s for s in self.sequences if not s.active and s.tokens]
            if not idle:
                return
            self._evict(min(idle, key=lambda s: s.last_used))

    def _evict(self, sequence: CachedSequence) -> None:
        """Give a finished sequence's cells back, remembering its tokens (see :meth:`_note`)."""
        if sequence.tokens:
            self._ghosts.append(sequence.tokens)
        self._clear(sequence)

    def reserve(self, n_cells: int) -> bool:
        """Make room for ``n_cells`` new cells, evicting finished sequences least recently used
        first; False only if the active sequences alone leave no room (the scheduler's per-request
        limit makes that impossible for a pool of ``num_ctx x slots``)."""
        while self.n_cells - self.live_cells < n_cells:
            idle = [s for s in self.sequences if not s.active and s.tokens]
            if not idle:
                return False
            self._evict(min(idle, key=lambda s: s.last_used))
        return True

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        """``tokens`` were decoded into ``seq_id`` at its next positions."""
        sequence = self.sequences[seq_id]
        run = sequence.tail
        if run is None:
            run = _Run(start=len(sequence.tokens), ends={seq_id: len(sequence.tokens)})
            self._runs.add(run)
            sequence.runs.append(run)
            sequence.tail = run
        run.ends[seq_id] += len(tokens)  # the tail's creator reaches furthest: every new cell is new
        sequence.tokens.extend(tokens)
        self.live_cells += len(tokens)

    # ------------------------------------------------------------------ books

    def cached_cells(self) -> int:
        """Cells only finished sequences hold: what the cache could give back right now."""
        active_ids = {s.id for s in self.sequences if s.active}
        held = 0
        for run in self._runs:
            reach = [end for seq_id, end in run.ends.items() if seq_id in active_ids]
            held += max(reach) - run.start if reach else 0
        return self.live_cells - held

    def _best_prefix(self, prompt: Sequence[int]) -> tuple[CachedSequence | None, int]:
        """The sequence sharing the longest prefix with ``prompt``; ties go to a finished sequence,
        then to the least recently used one."""
        limit = len(prompt) - 1
        best: CachedSequence | None = None
        best_key = (0, False, 0)
        for sequence in self.sequences:
            if not sequence.tokens or (sequence.active and not self.share):
                continue
            length = common_prefix(sequence.tokens, prompt, limit)
            key = (length, not sequence.active, -sequence.last_used)
            whole = self._continues(sequence, length)
            if length and key > best_key and (whole or (length >= self.min_reuse and self._intact(sequence))):
                best, best_key = sequence, key
        return best, best_key[0]

    @staticmethod
    def _continues(sequence: CachedSequence, length: int) -> bool:
        """The new prompt continues the whole of a finished sequence: always valid, whatever the
        memory (recurrent state goes on from its last token, a window cache has its last window)."""
        return not sequence.active and length == len(sequence.tokens)

    def _intact(self, sequence: CachedSequence) -> bool:
        """Every cell of the sequence is still there, so it can be cut or copied at any position:
        llama.cpp's sliding-window caches drop cells that left the window (``seq_pos_min > 0``)."""
        return self.share and self.memory.seq_pos_min(sequence.id) <= 0

    def _empty_sequence(self) -> CachedSequence | None:
        return next((s for s in self.sequences if not s.active and not s.tokens), None)

    def _evict_for_new(self, exclude: CachedSequence | None) -> CachedSequence | None:
        """The least recently used finished sequence other than ``exclude``, cleared."""
        idle = [s for s in self.sequences if not s.active and s is not exclude]
        if not idle:
            return None
        victim = min(idle, key=lambda s: s.last_used)
        self._evict(victim)
        return victim

    def _cut(self, sequence: CachedSequence, length: int) -> int:
        """Keep the first ``length`` tokens of ``sequence``; returns how many it keeps (0 when
        llama.cpp cannot cut this memory at that position, as for recurrent state)."""
        if length >= len(sequence.tokens):
            return len(sequence.tokens)
        if length == 0 or not self.memory.seq_rm(sequence.id, length, -1):
            self._clear(sequence)
            return 0
        del sequence.tokens[length:]
        kept: list[_Run] = []
        for run in sequence.runs:
            if run.start >= length:
                self._drop(run, sequence.id)
            else:
                run.ends[sequence.id] = min(run.ends[sequence.id], length)
                kept.append(run)
        sequence.runs = kept
        sequence.tail = None
        self._recount()
        return length

    def _copy(self, source: CachedSequence, target: CachedSequence, length: int) -> None:
        """``target`` (empty) shares the first ``length`` cells of ``source``."""
        self.memory.seq_cp(source.id, target.id, 0, length)
        target.tokens = source.tokens[:length]
        for run in source.runs:
            if run.start >= length:
                break
            run.ends[target.id] = min(run.ends[source.id], length)
            target.runs.append(run)
        target.tail = None

    def _clear(self, sequence: CachedSequence) -> None:
        if not sequence.tokens and not sequence.runs:
            return
        self.memory.seq_rm(sequence.id, -1, -1)
        for run in sequence.runs:
            self._drop(run, sequence.id)
        sequence.tokens = []
        sequence.runs = []
        sequence.tail = None
        self._recount()

    def _drop(self, run: _Run, seq_id: int) -> None:
        run.ends.pop(seq_id, None)
        if not run.ends:
            self._runs.discard(run)

    def _recount(self) -> None:
        self.live_cells = sum(run.cells for run in self._runs)
