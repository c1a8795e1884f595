"""`kobot::decode_attention` (decode_attention.cpp): the engine's CPU attention, one call per
layer for every token of a step (decoding tokens and prompt chunks alike, each query over its
own sequence's keys up to its position), read straight from the KV arena (no decode pool); it
also writes each decoding token's key and value there.

`load_decode_attention` builds or loads it once; where it cannot (no C++ compiler, say) the
engine keeps torch's matmuls and the log says why, once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from core.generation.engine.kernels.loading import KernelMode, load_operator

__all__ = ["DecodeAttention", "load_decode_attention"]

DecodeAttention = Callable[
    [
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        float, int,
    ],
    torch.Tensor,
]  # fmt: skip
"""`(qkv [B, 3, H, D], buffer, key_offsets [B], value_offsets [B], head_strides [B], lengths [B],
scale, new_rows) -> [B, H, D]`: row b < new_rows, head h, writes its new key and value
(`qkv[b, 1:, h]`) at position `lengths[b] - 1` (the other rows' are in the buffer already);
every row attends over the `lengths[b]` keys (rows of D values) at
`buffer[key_offsets[b] + h * head_strides[b]]` and the values at `value_offsets[b] + …` (the
KV arena's blocks, written and read in place; int64 vectors, a flat contiguous buffer of qkv's
dtype; qkv's rows of D values contiguous, any other strides)."""


def load_decode_attention(
    mode: KernelMode, directory: Path | None = None
) -> DecodeAttention | None:
    """The kernel (`mode` `auto`), or None: `off`, or it cannot be built here (logged)."""
    op: DecodeAttention | None = load_operator(
        "decode_attention",
        mode,
        directory,
        "the engine attends with torch matmuls (slower decoding on a CPU)",
    )
    return op
