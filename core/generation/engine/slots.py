"""One batched attention per layer for the sequences decoding one token, without a gather,
where the C++ attention kernel does not run (CUDA, or a CPU without a compiler: on a CPU with it,
`forward.ArenaAttention` reads the arena blocks in place and no pool is kept).

The KV of each decoding sequence is also kept in a dense working pool
`[n_layer, 2, slots, n_head, length, head_dim]`: a sequence gets a slot when it starts decoding
(its block's KV copied in once), then each step writes its new K/V into its slot only, and every
layer attends with one call on a view of the pool (`[slots, heads, L, head_dim]`, `L` a length
bucket) under a key mask of each sequence's length (SDPA on CUDA, matmuls on a CPU:
`DecodePlan._attention`). On CUDA the pool is the static-shape KV a CUDA graph of the decode step
needs (per slot-count and length bucket).

The positions decoded in the pool are copied back into the arena block once, when the slot is
released: when the request leaves (`retire`, called by the engine before the block is cached or
freed), or when its block is not among a step's decoding sequences. Until then the arena block
lacks them; nothing reads them there meanwhile (the engine retires a block before anything else
can). The pool grows by doubling (slots); its length grows by `LENGTH_BUCKET` on CUDA and is the
attended span elsewhere (`DecodeSlots._length_for`), and `max_bytes` bounds
it: a step that would need more falls back to per-sequence attention (every slot flushed first).

Measured on a 2-core AMX CPU (bf16, burst of 32 chats, `bench/serve.py`, alternating runs): 68–70
ms per engine step against 90–94 ms with one SDPA call per sequence; a gather of the blocks into
a padded batch every step instead of the pool measured slower than the per-sequence calls.
`EngineConfig.decode_pool="off"` keeps the per-sequence calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["LENGTH_BUCKET", "BlockKey", "DecodePlan", "DecodeSlots", "pool_rows"]

LENGTH_BUCKET = 64
ATTEND_BUCKET_CPU = 16
"""On a CPU each step attends over the pool's first `max length` positions rounded up to this
(not to `LENGTH_BUCKET`, the static shapes a CUDA graph needs): decode attention reads every key
it spans, so padding is time (a burst's step at 70–90 keys reads 128 with `LENGTH_BUCKET`)."""
BlockKey = tuple[int, int]


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def round_up(value: int, granule: int) -> int:
    return -(-value // granule) * granule


class DecodeSlots:
    """The working KV pool of the decoding sequences (see the module docstring)."""

    def __init__(
        self, n_layer: int, n_head: int, head_dim: int, dtype: torch.dtype, max_bytes: int = 0
    ) -> None:
        self.shape = (n_layer, n_head, head_dim)
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.pool: torch.Tensor | None = None  # [n_layer, 2, slots, heads, length, head_dim]
        self._flat: torch.Tensor | None = None
        """The storage `pool` views; `_spare`: the previous one, kept for the next re-layout."""
        self._spare: torch.Tensor | None = None
        self.slot_of: dict[BlockKey, int] = {}
        self.filled: dict[BlockKey, int] = {}
        """Positions `[0, filled)` of the block are in its slot."""
        self.synced: dict[BlockKey, int] = {}
        """Positions `[0, synced)` of the block are in the arena too."""
        self.blocks: dict[BlockKey, torch.Tensor] = {}
        self.free: list[int] = []

    @property
    def pool_bytes(self) -> int:
        """What the pool holds, its spare storage included."""
        return sum(_bytes(flat) for flat in (self._flat, self._spare) if flat is not None)

    @property
    def slots(self) -> int:
        return 0 if self.pool is None else self.pool.shape[2]

    @property
    def spare_slot(self) -> int | None:
        """A slot no sequence holds now (where a static-shape step pads), if any."""
        return self.free[-1] if self.free else None

    @property
    def length(self) -> int:
        return 0 if self.pool is None else self.pool.shape[4]

    def bytes_for(self, slots: int, length: int) -> int:
        n_layer, heads, head_dim = self.shape
        element = torch.empty((), dtype=self.dtype).element_size()
        return n_layer * 2 * slots * heads * length * head_dim * element

    def prepare(
        self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor], starts: Sequence[int]
    ) -> DecodePlan | None:
        """This step's plan over the pool (`assign`); None when the pool would exceed
        `max_bytes`."""
        slots = self.assign(keys, blocks, starts)
        return None if slots is None else DecodePlan.of(self, slots, starts)

    def assign(
        self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor], starts: Sequence[int]
    ) -> list[int] | None:
        """The slots of these sequences (block key, block view, position of the new token),
        their missing KV copied in; every other slot released. None (and no slot kept) when the
        pool would exceed `max_bytes`."""
        self.release_others(set(keys))
        new_keys = sum(key not in self.slot_of for key in keys)
        if not self._fit(new_keys, max(starts) + 1, device=blocks[0].device):
            self.release_others(set())
            return None
        self.free.sort(reverse=True)
        slots = []
        for key, block, start in zip(keys, blocks, starts, strict=True):
            slot = self.slot_of.get(key)
            if slot is None:
                slot = self.slot_of[key] = self.free.pop()
                self.filled[key] = self.synced[key] = 0
                self.blocks[key] = block
            if self.filled[key] < start:
                self._copy_in(slot, block, start)
                self.synced[key] = start
            self.filled[key] = start + 1
            self.synced[key] = min(self.synced[key], start)
            slots.append(slot)
        return slots

    def span(self, starts: Sequence[int]) -> int:
        """The positions a step attends over: its longest sequence's, rounded up to the device's
        granule (`LENGTH_BUCKET` on CUDA, the static shapes of a graph), within the pool."""
        assert self.pool is not None
        granule = LENGTH_BUCKET if self.pool.device.type == "cuda" else ATTEND_BUCKET_CPU
        return min(round_up(max(starts) + 1, granule), self.length)

    def release_others(self, present: set[BlockKey]) -> None:
        """Release the slots of blocks not decoding this step (their KV copied back first)."""
        for key in [k for k in self.slot_of if k not in present]:
            self.retire(key)

    def retire(self, key: BlockKey) -> None:
        """Copy the slot's decoded positions back into the block, and free the slot."""
        slot = self.slot_of.pop(key, None)
        if slot is None:
            return
        filled, synced, block = self.filled.pop(key), self.synced.pop(key), self.blocks.pop(key)
        if filled > synced:
            assert self.pool is not None
            block[:, :, :, synced:filled].copy_(self.pool[:, :, slot, :, synced:filled])
        self.free.append(slot)

    def discard(self) -> None:
        """Free every slot without copying back (their blocks are being freed: a failed step)."""
        self.free += self.slot_of.values()
        for table in (self.slot_of, self.filled, self.synced, self.blocks):
            table.clear()

    def _fit(self, new_keys: int, needed_length: int, device: torch.device) -> bool:
        """Grow the pool for `new_keys` more slots and `needed_length` positions (within
        `max_bytes`); False when it cannot."""
        slots = max(self.slots, 1)
        while slots - len(self.slot_of) < new_keys:
            slots *= 2
        length = self._length_for(needed_length, device)
        if (slots, length) == (self.slots, self.length):
            return True
        if self.bytes_for(slots, length) > self.max_bytes:
            return False
        n_layer, heads, head_dim = self.shape
        shape = (n_layer, 2, slots, heads, length, head_dim)
        flat = self._buffer(slots, length, device)
        pool = flat[: self.bytes_for(slots, length) // flat.element_size()].view(shape)
        if self.pool is not None:
            kept = min(length, self.length)
            pool[:, :, : self.slots, :, :kept].copy_(self.pool[:, :, :, :, :kept])
        if self._keeps_spare(flat, device):
            self._spare = self._flat
        self.free += list(range(self.slots, slots))
        self.pool, self._flat = pool, flat
        return True

    def _keeps_spare(self, new_flat: torch.Tensor, device: torch.device) -> bool:
        """Keep the old storage for the next re-layout where the pool also shrinks (not on CUDA,
        where it only grows) and both fit in `max_bytes`."""
        old = self._flat
        fits = old is not None and _bytes(new_flat) + _bytes(old) <= self.max_bytes
        return fits and device.type != "cuda"

    def _buffer(self, slots: int, length: int, device: torch.device) -> torch.Tensor:
        """Flat storage for a pool of this size: the one before the current pool's when it is
        large enough (stale positions lie past each slot's keys, masked), else a new one with
        room to grow to the next `LENGTH_BUCKET`. A re-layout into fresh memory spent 30–50 ms
        zeroing 90 MB of new pages on a 2-core CPU, more than the copy itself."""
        spare, self._spare = self._spare, None
        if (
            spare is not None
            and spare.device == device
            and _bytes(spare) >= self.bytes_for(slots, length)
        ):
            return spare
        del spare
        roomy = self.bytes_for(slots, round_up(length, LENGTH_BUCKET))
        size = roomy if roomy <= self.max_bytes else self.bytes_for(slots, length)
        element = torch.empty((), dtype=self.dtype).element_size()
        return torch.zeros(size // element, dtype=self.dtype, device=device)

    def _length_for(self, needed_length: int, device: torch.device) -> int:
        """On CUDA the pool only grows, by `LENGTH_BUCKET` (the static shapes of a CUDA graph).
        Elsewhere it is exactly the attended span, shrinking too: attention on a view that skips
        positions makes torch copy the keys first (0.48 ms per layer contiguous against 1.3–1.8 on
        a view of the first 80 of 96–1024 positions, 32 × 12 heads, fp32), while re-laying the pool
        out costs one copy each time the span crosses `ATTEND_BUCKET_CPU`."""
        if device.type == "cuda":
            return max(self.length, round_up(needed_length, LENGTH_BUCKET))
        return round_up(needed_length, ATTEND_BUCKET_CPU)

    def _copy_in(self, slot: int, block: torch.Tensor, start: int) -> None:
        """Positions `[0, start)` of `block` `[n_layer, 2, heads, capacity, head_dim]`."""
        assert self.pool is not None
        self.pool[:, :, slot, :, :start].copy_(block[:, :, :, :start])


class DecodePlan:
    """One step's use of the pool: which slot each sequence's token goes to, and at which
    position, as device tensors; built with no host data (`DecodePlan(...)`, what a CUDA graph
    captures) or from lists (`of`)."""

    def __init__(
        self,
        pool: torch.Tensor,
        slot: torch.Tensor,
        start: torch.Tensor,
        used: int,
        span: int,
        scatter: bool = True,
    ) -> None:
        """`slot`, `start`: each sequence's slot and new position; attention runs over the
        first `used` slots and `span` positions; `scatter`: the sequences' rows are not slots
        `0…used-1` in order (their queries are scattered into the slots, the results gathered)."""
        self.pool = pool
        self.slot = slot
        self.used = used
        self.span = span
        self.scatter = scatter
        n_layer, _, total_slots, heads, length, _ = pool.shape
        first = pool_rows(slot, start, total_slots, heads, length)
        layer_offsets = torch.arange(n_layer, device=pool.device)[:, None]
        self.rows = first[None, :] + layer_offsets * (2 * total_slots * heads * length)
        """`rows[layer]`: the pool rows this step's K/V go to, every layer's computed at once."""
        self.rows2d = pool.view(-1, pool.shape[-1])
        lengths = torch.ones(used, dtype=torch.long, device=pool.device)  # idle slots: 1 key
        lengths.index_copy_(0, slot, start + 1)
        positions = torch.arange(span, device=pool.device)
        self.mask = (positions[None, :] < lengths[:, None])[:, None, None, :]
        self.bias: torch.Tensor | None = None
        """The mask as scores to add, for the CPU's matmul attention (SDPA takes the mask)."""
        if pool.device.type == "cpu":
            self.bias = torch.zeros(self.mask.shape, dtype=torch.float32, device=pool.device)
            self.bias.masked_fill_(~self.mask, float("-inf"))

    @classmethod
    def of(cls, owner: DecodeSlots, slots: list[int], starts: Sequence[int]) -> DecodePlan:
        """The plan of `owner.assign`'s slots, attending over the slots in use only."""
        assert owner.pool is not None
        device = owner.pool.device
        used = max(slots) + 1
        scatter = slots != list(range(used))
        slot, start = (torch.tensor(values, device=device) for values in (slots, list(starts)))
        return cls(owner.pool, slot, start, used, owner.span(starts), scatter)

    def attend(self, layer: int, split: torch.Tensor, scale: float) -> torch.Tensor:
        """`split` `[B, 3, heads, head_dim]` (these sequences' rows, in order): write their K/V
        into the pool (only: `DecodeSlots.retire` copies them into the arena), attend, return
        `[B, heads * head_dim]`."""
        batch, _, heads, head_dim = split.shape
        new_kv = split[:, 1:].reshape(-1, head_dim).to(self.pool.dtype)
        self.rows2d.index_copy_(0, self.rows[layer], new_kv)
        keys = self.pool[layer, 0, : self.used, :, : self.span]
        values = self.pool[layer, 1, : self.used, :, : self.span]
        query = split[:, 0].unsqueeze(2).to(self.pool.dtype)  # [B, heads, 1, head_dim]
        if self.scatter:
            query = query.new_zeros(self.used, heads, 1, head_dim).index_copy_(0, self.slot, query)
        attended = self._attention(query, keys, values, scale)
        if self.scatter:
            attended = attended.index_select(0, self.slot)
        return attended.reshape(batch, heads * head_dim).to(split.dtype)

    def _attention(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """SDPA on CUDA. On a CPU two matmuls around an fp32 softmax: decode attention is bound by
        reading the keys and values, and SDPA's CPU kernel is slow at one query per sequence (12
        layers, 32 sequences × 12 heads, 2 cores, AVX-512 BF16: 14 ms per step at 80 keys and 37
        at 400 in bf16, against 46 and 128 with SDPA; fp32 K/V take twice the bytes, 17 and 76)."""
        if self.bias is None:
            return F.scaled_dot_product_attention(
                query, keys, values, attn_mask=self.mask, scale=scale
            )
        scores = torch.matmul(query, keys.transpose(-1, -2)).float().mul_(scale).add_(self.bias)
        return torch.matmul(scores.softmax(-1).to(values.dtype), values)


def pool_rows(
    slot: torch.Tensor, start: torch.Tensor, total_slots: int, heads: int, length: int
) -> torch.Tensor:
    """The rows (of `head_dim` values) in layer 0 of a pool `[n_layer, 2, total_slots, heads,
    length, head_dim]` of each sequence's new key and value in every head, `[B * 2 * heads]`."""
    device = slot.device
    kind = torch.arange(2, device=device)[None, :, None]
    head = torch.arange(heads, device=device)[None, None, :]
    rows = ((kind * total_slots + slot[:, None, None]) * heads + head) * length
    return (rows + start[:, None, None]).flatten()
