"""`kobot::attention` (attention.cpp): the engine's CPU attention, one call per
layer for every token of a step (decoding tokens and prompt chunks alike, each query over its
own sequence's keys up to its position), read straight from the KV arena (no decode pool),
which holds the model's dtype or int8 rows (`INT8_ROW_EXTRA`); it also writes every token's key
and value there first.

`load_attention` builds or loads it once; where it cannot (no C++ compiler, say) the
engine keeps torch's matmuls and the log says why, once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from core.generation.engine.kernels.loading import KernelMode, load_operator

__all__ = ["INT8_ROW_EXTRA", "AttentionKernel", "load_attention"]

INT8_ROW_EXTRA = 4
"""An int8 KV row holds `head_dim` int8 values, then their float32 scale: `head_dim + 4` bytes."""

AttentionKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
    torch.Tensor,
]
"""`(qkv [B, 3, H, D], buffer, key_offsets [B], value_offsets [B], head_strides [B], lengths [B],
scale) -> [B, H, D]`: every row b, head h, first writes its key and value (`qkv[b, 1:, h]`) at
position `lengths[b] - 1`, then attends over the `lengths[b]` keys (rows of D values of qkv's
dtype, or, in a uint8 buffer, of D int8 values and their float32 scale) at
`buffer[key_offsets[b] + h * head_strides[b]]` and the values at `value_offsets[b] + …` (the
KV arena's blocks, written and read in place; int64 vectors in buffer elements, a flat
contiguous buffer; qkv's rows of D values contiguous, any other strides)."""


def load_attention(mode: KernelMode, directory: Path | None = None) -> AttentionKernel | None:
    """The kernel (`mode` `auto`), or None: `off`, or it cannot be built here (logged)."""
    op: AttentionKernel | None = load_operator(
        "attention",
        mode,
        directory,
        "the engine attends with torch matmuls (slower decoding on a CPU)",
    )
    return op
