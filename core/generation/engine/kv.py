"""KV memory for the engine: one preallocated arena, and the per-conversation cache in it.

`KVArena` allocates the whole KV budget once (on the GPU this is real memory up front; on the
CPU pages are touched as they are used) and hands out contiguous blocks of token slots, each
viewed as `[n_layer, 2, n_head, capacity, row]` (`row`: head_dim values of the model's dtype, or
an int8 row's head_dim + 4 bytes: `forward.KVStorage`). Allocation is first fit with coalescing
frees, so the bytes in use can never exceed the budget. Slots are zeroed the first time they are
handed out (`touched`), so every slot always holds finite values: batched attention reads slots
past a sequence's length under a key mask, where a NaN would poison the sum (0 × NaN).

`ConversationCache` keeps the KV of finished turns by conversation (`GenerationRequest.cache_key`)
as `(token ids, block)`: least recently used first out when memory is needed, and dropped after
`idle_s` without use. A new turn takes its conversation's entry and reuses the KV of the longest
common prefix of token ids (`common_prefix`).
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from core.generation.engine.forward import GPT2Dims

__all__ = ["CachedKV", "ConversationCache", "KVArena", "KVBlock", "common_prefix"]

GRANULE_TOKENS = 16
"""Blocks are sized in multiples of this many tokens (less fragmentation, fewer regrowths)."""


@dataclass(eq=False, slots=True)
class KVBlock:
    """A contiguous range of token slots in the arena: `[start, start + tokens)`."""

    start: int
    tokens: int


@dataclass(eq=False, slots=True)
class CachedKV:
    """A finished turn's KV: `ids[i]`'s keys and values are at position `i` of `block`."""

    ids: tuple[int, ...]
    block: KVBlock
    last_used: float


def round_up(tokens: int, granule: int = GRANULE_TOKENS) -> int:
    return -(-tokens // granule) * granule


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    limit = min(len(a), len(b))
    if list(a[:limit]) == list(b[:limit]):
        return limit
    low, high = 0, limit  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if list(a[low:middle]) == list(b[low:middle]):
            low = middle
        else:
            high = middle
    return low


class KVArena:
    """The engine's whole KV budget, preallocated once, handed out as token-slot blocks."""

    def __init__(
        self,
        dims: GPT2Dims,
        budget_bytes: int,
        device: torch.device | str,
        dtype: torch.dtype,
        row: int | None = None,
    ) -> None:
        self.dims = dims
        self.row = row or dims.head_dim
        """Elements of `dtype` a head's key or value of one token takes (`forward.KVStorage`)."""
        self.per_token = dims.n_layer * 2 * dims.n_head * self.row
        element_bytes = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_token = self.per_token * element_bytes
        self.capacity = (budget_bytes // self.bytes_per_token) // GRANULE_TOKENS * GRANULE_TOKENS
        if self.capacity < GRANULE_TOKENS:
            raise ValueError(
                f"a KV budget of {budget_bytes} bytes holds no {GRANULE_TOKENS} tokens"
            )
        size = self.capacity * self.per_token
        self.buffer = torch.empty(size, dtype=dtype, device=device)
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # (start, length), sorted
        self.touched = 0
        """Slots below this have been zeroed or written (first fit hands out low slots first)."""
        self.used = 0
        self.peak_used = 0

    @property
    def budget_bytes(self) -> int:
        return self.capacity * self.bytes_per_token

    @property
    def used_bytes(self) -> int:
        return self.used * self.bytes_per_token

    def allocate(self, tokens: int) -> KVBlock | None:
        """A block of at least `tokens` slots (rounded up), or None when none fits now."""
        size = round_up(max(tokens, 1))
        for index, (start, length) in enumerate(self._free):
            if length >= size:
                self._take(index, start, length, size)
                self._touch(start + size)
                return KVBlock(start, size)
        return None

    def _take(self, index: int, start: int, length: int, size: int) -> None:
        if length == size:
            del self._free[index]
        else:
            self._free[index] = (start + size, length - size)
        self.used += size
        self.peak_used = max(self.peak_used, self.used)

    def _touch(self, end: int) -> None:
        """Zero the never-used slots below `end` (fresh memory may hold any bit pattern)."""
        if end > self.touched:
            per_token = self.per_token
            self.buffer[self.touched * per_token : end * per_token].zero_()
            self.touched = end

    def free(self, block: KVBlock) -> None:
        """Give `block` back, merging it with free neighbours."""
        if block.tokens == 0:
            return
        index = bisect.bisect(self._free, (block.start, 0))
        start, end = block.start, block.start + block.tokens
        if index < len(self._free) and self._free[index][0] == end:
            end += self._free.pop(index)[1]
        if index > 0 and sum(self._free[index - 1]) == start:
            start = self._free.pop(index - 1)[0]
            index -= 1
        self._free.insert(index, (start, end - start))
        self.used -= block.tokens
        block.tokens = 0

    def view(self, block: KVBlock) -> torch.Tensor:
        """The block as `[n_layer, 2, n_head, capacity, row]` (`row`: head_dim, or an int8
        row's bytes)."""
        d = self.dims
        per_token = self.per_token
        flat = self.buffer[block.start * per_token : (block.start + block.tokens) * per_token]
        return flat.view(d.n_layer, 2, d.n_head, block.tokens, self.row)

    def copy_prefix(self, source: KVBlock, target: KVBlock, tokens: int) -> None:
        """Copy the first `tokens` positions of `source`'s KV into `target`."""
        if tokens > 0:
            self.view(target)[:, :, :, :tokens].copy_(self.view(source)[:, :, :, :tokens])

    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)


class ConversationCache:
    """Finished turns' KV by conversation: LRU order, bounded by the arena, idle entries dropped.

    Not thread-safe: only the engine thread uses it.
    """

    def __init__(
        self, arena: KVArena, idle_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.arena = arena
        self.idle_s = idle_s
        self.clock = clock
        self._entries: OrderedDict[str, CachedKV] = OrderedDict()
        self.evictions = 0
        self.idle_drops = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def take(self, key: str) -> CachedKV | None:
        """Remove and return `key`'s entry (the caller now owns its block)."""
        return self._entries.pop(key, None)

    def put(self, key: str, ids: Sequence[int], block: KVBlock) -> None:
        """Keep `block` (holding the KV of `ids`) as `key`'s newest entry."""
        older = self._entries.pop(key, None)
        if older is not None:
            self.arena.free(older.block)
        self._entries[key] = CachedKV(tuple(ids), block, self.clock())

    def evict_lru(self) -> bool:
        """Free the least recently used entry; False when there is none."""
        if not self._entries:
            return False
        _, entry = self._entries.popitem(last=False)
        self.arena.free(entry.block)
        self.evictions += 1
        return True

    def drop_idle(self) -> int:
        """Free the entries unused for `idle_s`; how many were dropped."""
        limit = self.clock() - self.idle_s
        stale = [key for key, entry in self._entries.items() if entry.last_used <= limit]
        for key in stale:
            self.arena.free(self._entries.pop(key).block)
        self.idle_drops += len(stale)
        return len(stale)

    def clear(self) -> None:
        while self.evict_lru():
            pass

    def allocate(self, tokens: int) -> KVBlock | None:
        """A block from the arena, evicting least recently used entries until one fits."""
        while True:
            block = self.arena.allocate(tokens)
            if block is not None or not self.evict_lru():
                return block
