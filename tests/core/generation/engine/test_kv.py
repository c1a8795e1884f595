"""The engine's KV arena (budget, allocation, views) and conversation cache (LRU, idle drop)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from core.generation.engine.forward import GPT2Dims
from core.generation.engine.kv import (
    GRANULE_TOKENS,
    ConversationCache,
    KVArena,
    KVBlock,
    common_prefix,
)

DIMS = GPT2Dims(
    n_layer=2, n_head=2, head_dim=4, n_embd=8, n_positions=1024, vocab_size=100, eps=1e-5
)
TOKEN_BYTES = DIMS.kv_elements_per_token * 4  # fp32


def arena(tokens: int) -> KVArena:
    return KVArena(DIMS, tokens * TOKEN_BYTES, "cpu", torch.float32)


def test_the_budget_becomes_whole_granules_and_is_preallocated() -> None:
    made = KVArena(DIMS, 100 * TOKEN_BYTES + 5, "cpu", torch.float32)
    assert made.capacity == 96 and made.budget_bytes == 96 * TOKEN_BYTES
    assert made.buffer.numel() * 4 == made.budget_bytes
    with pytest.raises(ValueError):
        arena(GRANULE_TOKENS - 1)


def test_blocks_never_overlap_and_use_never_exceeds_the_budget() -> None:
    made = arena(512)
    rng = random.Random(0)
    live: list[KVBlock] = []
    for _ in range(2000):
        if live and rng.random() < 0.45:
            made.free(live.pop(rng.randrange(len(live))))
        else:
            block = made.allocate(rng.randint(1, 100))
            if block is not None:
                live.append(block)
        ranges = sorted((b.start, b.start + b.tokens) for b in live)
        assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(ranges))
        assert made.used == sum(b.tokens for b in live) <= made.capacity
    for block in live:
        made.free(block)
    assert made.used == 0 and made.largest_free() == made.capacity  # coalesced back into one
    assert made.peak_used <= made.capacity


def test_allocation_fails_cleanly_when_full() -> None:
    made = arena(64)
    assert made.allocate(64) is not None
    assert made.allocate(1) is None


def test_views_are_separate_slices_of_the_arena() -> None:
    made = arena(64)
    a, b = made.allocate(10), made.allocate(20)
    assert a is not None and b is not None
    made.view(a).fill_(1.0)
    made.view(b).fill_(2.0)
    assert made.view(a).shape == (2, 2, 2, 16, 4) and made.view(b).shape == (2, 2, 2, 32, 4)
    assert torch.all(made.view(a) == 1.0)
    assert made.allocate(40) is None  # 64 - 48 = 16 left


def test_copy_prefix_moves_positions_between_blocks_of_different_sizes() -> None:
    made = arena(128)
    small, big = made.allocate(16), made.allocate(48)
    assert small is not None and big is not None
    made.view(small).copy_(torch.arange(made.view(small).numel()).view_as(made.view(small)))
    made.copy_prefix(small, big, 10)
    assert torch.equal(made.view(big)[:, :, :, :10], made.view(small)[:, :, :, :10])


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [((), (1,), 0), ((1, 2, 3), (1, 2, 3), 3), ((1, 2, 3), (1, 2), 2), ((1, 2, 3), (1, 5, 3), 1)],
)
def test_common_prefix(a: tuple[int, ...], b: tuple[int, ...], expected: int) -> None:
    assert common_prefix(a, b) == expected


def test_common_prefix_of_long_sequences() -> None:
    rng = random.Random(1)
    base = [rng.randrange(100) for _ in range(900)]
    for cut in (0, 1, 450, 899):
        changed = [*base[:cut], 1000, *base[cut + 1 :]]
        assert common_prefix(base, changed) == cut


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cache_evicts_least_recently_used_first_to_make_room() -> None:
    made = arena(64)
    cache = ConversationCache(made, idle_s=100)
    for key in "abcd":
        block = cache.allocate(16)
        assert block is not None
        cache.put(key, [1, 2], block)
    taken = cache.take("a")  # "a" is in use again: not evictable
    assert taken is not None
    block = cache.allocate(16)
    assert block is not None and "b" not in cache and "c" in cache and "d" in cache
    assert cache.evictions == 1 and len(cache) == 2
    assert made.used == 64


def test_cache_drops_idle_conversations() -> None:
    made, clock = arena(64), Clock()
    cache = ConversationCache(made, idle_s=10, clock=clock)
    for key in ("old", "new"):
        block = made.allocate(16)
        assert block is not None
        cache.put(key, [1], block)
        clock.now += 6
    assert cache.drop_idle() == 1 and "old" not in cache and "new" in cache
    assert made.used == 16


def test_putting_a_key_again_frees_the_older_entry() -> None:
    made = arena(64)
    cache = ConversationCache(made, idle_s=10)
    for _ in range(3):
        block = made.allocate(16)
        assert block is not None
        cache.put("k", [1], block)
    assert len(cache) == 1 and made.used == 16
    cache.clear()
    assert made.used == 0
