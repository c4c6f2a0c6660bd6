"""The prompt cache's books against a model of llama.cpp's unified cache, under random traffic.

``FakeCells`` does what llama-kv-cells.h does with sequence ids: a cell holds a position, a token
and a set of sequences; ``seq_cp`` adds a sequence to cells, ``seq_rm`` removes it and frees cells
nobody holds, and decoding takes free cells anywhere in the pool. The books must agree with it cell
for cell after every operation, and an active request must always find room.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parallama_runtime.engine.prompt_cache import Placement, PromptCache, common_prefix


@dataclass
class Cell:
    pos: int
    token: int
    seqs: set[int] = field(default_factory=set)


class FakeCells:
    def __init__(self, size: int, *, can_cut: bool = True) -> None:
        self.size = size
        self.cells: list[Cell | None] = [None] * size
        self.can_cut = can_cut

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        p1 = p1 if p1 >= 0 else 1 << 30
        if not self.can_cut and p0 > 0 and any(c and seq_id in c.seqs and c.pos >= p0 for c in self.cells):
            return False
        for i, cell in enumerate(self.cells):
            if cell and seq_id in cell.seqs and max(p0, 0) <= cell.pos < p1:
                cell.seqs.discard(seq_id)
                if not cell.seqs:
                    self.cells[i] = None
        return True

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        for cell in self.cells:
            if cell and src in cell.seqs and p0 <= cell.pos < p1:
                cell.seqs.add(dst)

    def seq_pos_min(self, seq_id: int) -> int:
        positions = [c.pos for c in self.cells if c and seq_id in c.seqs]
        return min(positions) if positions else -1

    def decode(self, seq_id: int, start: int, tokens: list[int]) -> None:
        free = [i for i, c in enumerate(self.cells) if c is None]
        assert len(free) >= len(tokens), "llama.cpp would answer 1: no KV slot for this batch"
        for offset, (i, token) in enumerate(zip(free, tokens, strict=False)):
            self.cells[i] = Cell(start + offset, token, {seq_id})

    @property
    def used(self) -> int:
        return sum(1 for c in self.cells if c)

    def tokens_of(self, seq_id: int) -> list[int]:
        held = sorted((c.pos, c.token) for c in self.cells if c and seq_id in c.seqs)
        return [token for _, token in held]


def check_books(cache: PromptCache, cells: FakeCells) -> None:
    assert cache.live_cells == cells.used
    for sequence in cache.sequences:
        assert cells.tokens_of(sequence.id) == sequence.tokens
        positions = [c.pos for c in cells.cells if c and sequence.id in c.seqs]
        assert sorted(positions) == list(range(len(sequence.tokens)))
    assert 0 <= cache.cached_cells() <= cache.live_cells


def simulate(seed: int, *, slots: int, num_ctx: int, n_seq: int, share: bool = True) -> tuple[int, int]:
    """Random chat-like traffic: prompts built from a few shared prefixes plus random tails, chunked
    prefill, random answer lengths, random cancellations. Returns (cached, computed) prompt tokens."""
    rng = random.Random(seed)
    cells = FakeCells(slots * num_ctx, can_cut=share)
    cache = PromptCache(cells, n_seq, slots * num_ctx, share=share)
    systems = [[rng.randrange(1, 50) for _ in range(rng.randrange(5, num_ctx // 2))] for _ in range(3)]
    histories: list[list[int]] = [[] for _ in range(6)]
    active: dict[int, tuple[list[int], int, int]] = {}  # seq -> (prompt + answer tokens, fed, answer budget)
    cached = computed = 0
    for _ in range(300):
        action = rng.random()
        if action < 0.35 and len(active) < slots:
            user = rng.randrange(len(histories))
            if not histories[user] or rng.random() < 0.2:
                histories[user] = list(rng.choice(systems))
            histories[user] = histories[user] + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 20))]
            prompt = histories[user][-(num_ctx // 2) :]
            placement = cache.acquire(prompt)
            assert placement.seq_id not in active
            assert placement.reused == common_prefix(
                cells.tokens_of(placement.seq_id), prompt, len(prompt) - 1
            )
            assert placement.reused < len(prompt)
            cached += placement.reused
            computed += len(prompt) - placement.reused
            answer = [rng.randrange(1, 50) for _ in range(rng.randrange(1, num_ctx - len(prompt)))]
            active[placement.seq_id] = (prompt + answer, placement.reused, len(prompt))
            histories[user] = prompt + answer
        elif action < 0.85 and active:
            seq_id = rng.choice(list(active))
            stream, fed, _ = active[seq_id]
            take = min(rng.randrange(1, 64), len(stream) - fed)
            assert cache.reserve(take), "the active requests alone never exceed the pool"
            cells.decode(seq_id, fed, stream[fed : fed + take])
            cache.extend(seq_id, stream[fed : fed + take])
            active[seq_id] = (stream, fed + take, 0)
            if fed + take == len(stream) or rng.random() < 0.1:  # finished or cancelled
                del active[seq_id]
                cache.release(seq_id, keep=rng.random() < 0.9)
        check_books(cache, cells)
    return cached, computed


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), slots=st.integers(1, 4), extra=st.integers(0, 12))
def test_books_match_the_cells_under_random_traffic(seed: int, slots: int, extra: int) -> None:
    simulate(seed, slots=slots, num_ctx=128, n_seq=slots + extra)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), slots=st.integers(1, 4))
def test_recurrent_memory_is_only_reused_whole(seed: int, slots: int) -> None:
    """Without sharing (recurrent state), prefixes are never copied and a cut llama.cpp refuses
    clears the sequence instead."""
    simulate(seed, slots=slots, num_ctx=128, n_seq=slots, share=False)


def test_chat_turns_compute_only_what_is_new() -> None:
    """8 users x 4 turns over 4 slots: the system prompt is computed once, and every later turn
    computes its new message only (all conversations stay in the pool's spare sequences)."""
    rng = random.Random(3)
    cells = FakeCells(4 * 256)
    cache = PromptCache(cells, 16, 4 * 256, share=True)
    system = [rng.randrange(1, 50) for _ in range(60)]
    histories = [list(system) for _ in range(8)]
    computed = 0
    for _turn in range(4):
        for user in range(8):
            message = [rng.randrange(1, 50) for _ in range(10)]
            prompt = histories[user] + message
            answer = [rng.randrange(1, 50) for _ in range(8)]
            placement = cache.acquire(prompt)
            computed += len(prompt) - placement.reused
            stream = prompt + answer[:-1]  # the last answer token is sampled, never fed
            assert cache.reserve(len(stream) - placement.reused)
            cells.decode(placement.seq_id, placement.reused, stream[placement.reused :])
            cache.extend(placement.seq_id, stream[placement.reused :])
            cache.release(placement.seq_id)
            histories[user] = prompt + answer
            check_books(cache, cells)
    first_turns = len(system) + 8 * 10  # the system prompt once, then each user's first message
    later_turns = 8 * 3 * (10 + 1)  # each later turn: the last answer token, then the new message
    assert computed == first_turns + later_turns


def _run(cache: PromptCache, cells: FakeCells, prompt: list[int], answer: list[int]) -> int:
    placement = cache.acquire(prompt)
    stream = prompt + answer
    assert cache.reserve(len(stream) - placement.reused)
    cells.decode(placement.seq_id, placement.reused, stream[placement.reused :])
    cache.extend(placement.seq_id, stream[placement.reused :])
    cache.release(placement.seq_id)
    return placement.seq_id


def test_a_system_prompt_is_held_once_by_every_sequence_that_uses_it() -> None:
    cells = FakeCells(4 * 64)
    cache = PromptCache(cells, 16, 4 * 64, share=True)
    system = list(range(1, 41))
    first = _run(cache, cells, [*system, 100], [101])
    second = cache.acquire([*system, 200, 201])
    assert second.reused == len(system) and second.shared_from == first and second.seq_id != first
    assert cells.used == len(system) + 2  # the 40 cells of the system prompt exist once
    check_books(cache, cells)


def test_the_next_turn_continues_its_own_conversation_in_place() -> None:
    cells = FakeCells(2 * 64)
    cache = PromptCache(cells, 8, 2 * 64, share=True)
    turn1 = list(range(1, 21))
    seq = _run(cache, cells, turn1, [30, 31])
    placement = cache.acquire([*turn1, 30, 31, 40, 41])
    assert (placement.seq_id, placement.reused, placement.shared_from) == (seq, 22, None)


def test_ties_go_to_the_least_recently_used_sequence() -> None:
    cells = FakeCells(64)
    cache = PromptCache(cells, 4, 64, share=True, min_reuse=1)
    a = _run(cache, cells, [1, 2, 3, 4], [5])
    b = _run(cache, cells, [1, 2, 3, 9], [5])
    placement = cache.acquire([1, 2, 3, 7, 7])
    assert placement.reused == 3 and placement.seq_id not in (a, b)  # both conversations stay
    assert placement.shared_from == a != b  # both share 3 tokens; a was used first


def test_eviction_frees_the_least_recently_used_finished_sequences_first() -> None:
    cells = FakeCells(64)
    cache = PromptCache(cells, 8, 64, share=True)
    old = _run(cache, cells, list(range(100, 130)), [1])
    new = _run(cache, cells, list(range(200, 230)), [1])
    assert cache.reserve(10)  # 62 of 64 used: the oldest goes
    assert not cache.sequences[old].tokens and cache.sequences[new].tokens
    check_books(cache, cells)


def test_a_sliding_window_that_dropped_early_cells_is_not_reused() -> None:
    cells = FakeCells(64)
    cache = PromptCache(cells, 4, 64, share=True)
    seq = _run(cache, cells, list(range(1, 20)), [1])
    for cell in cells.cells:  # the window moved on: positions 0..4 are gone for this sequence
        if cell and cell.pos < 5:
            cell.seqs.discard(seq)
    assert cache.acquire(list(range(1, 30))).reused == 0


def test_a_pool_too_small_for_the_active_requests_is_reported() -> None:
    cells = FakeCells(8)
    cache = PromptCache(cells, 2, 8, share=True)
    placement = cache.acquire([1, 2, 3])
    cache.extend(placement.seq_id, [1] * 8)
    assert not cache.reserve(1)


@pytest.mark.parametrize("bad", [(0, 8), (2, 0)])
def test_needs_a_sequence_and_a_cell(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        PromptCache(FakeCells(8), bad[0], bad[1], share=True)


def test_unrelated_prompts_keep_little_of_the_pool() -> None:
    """Cached cells cost every running token attention; prompts nobody sends again earn no room."""
    rng = random.Random(5)
    cells = FakeCells(1024)
    cache = PromptCache(cells, 16, 1024, share=True)
    for _ in range(40):
        _run(cache, cells, [rng.randrange(1, 10**6) for _ in range(40)], [1] * 20)
        check_books(cache, cells)
    assert cache.room() == 0 and cache.cached_cells() == 0  # as if the cache were off


def test_chat_traffic_keeps_the_whole_pool_and_a_squeezed_cache_grows_back() -> None:
    rng = random.Random(6)
    cells = FakeCells(2048)
    cache = PromptCache(cells, 16, 2048, share=True)
    for _ in range(40):  # unrelated prompts squeeze the cache
        _run(cache, cells, [rng.randrange(1, 10**6) for _ in range(40)], [1] * 20)
    assert cache.room() < 2048 // 8
    histories = [[rng.randrange(1, 10**6) for _ in range(50)] for _ in range(6)]
    for turn in range(12):  # six conversations, more than the squeezed room holds
        for user, history in enumerate(histories):
            history += [rng.randrange(1, 10**6) for _ in range(10)]
            _run(cache, cells, history, [turn, user])
            history += [turn, user]
    assert cache.room() == 2048  # what the cache served, or would have from what it evicted
    placement = cache.acquire(histories[0] + [7])
    assert placement.reused == len(histories[0])  # the whole conversation is still in the pool
    check_books(cache, cells)


def test_a_few_common_tokens_are_neither_cut_out_nor_shared() -> None:
    """A BOS token and a word in common would keep an old sequence's first cells alive for nothing."""
    cells = FakeCells(256)
    cache = PromptCache(cells, 8, 256, share=True)
    first = _run(cache, cells, [1, 2, 3, *range(100, 140)], [5])
    placement = cache.acquire([1, 2, 3, *range(200, 240)])
    assert placement.reused == 0 and placement.shared_from is None and placement.seq_id != first
    short = _run(cache, cells, [1, 2, 3], [4])  # a short sequence the prompt continues whole is reused
    assert cache.acquire([1, 2, 3, 4, 9]) == Placement(short, 4)
    check_books(cache, cells)
