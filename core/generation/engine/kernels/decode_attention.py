"""`kobot::decode_attention` (decode_attention.cpp): the engine's CPU decode attention, read
straight from the KV arena (no decode pool).

`load_decode_attention` builds or loads it once; where it cannot (no C++ compiler, say) the
engine keeps torch's matmuls and the log says why, once.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from core.generation.engine.kernels.build import KernelBuildError, load_library

__all__ = ["DecodeAttention", "KernelMode", "load_decode_attention"]

logger = logging.getLogger(__name__)

KernelMode = Literal["auto", "off"]
DecodeAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
    torch.Tensor,
]
"""`(query [B, H, D], buffer, key_offsets [B], value_offsets [B], head_strides [B], lengths [B],
scale) -> [B, H, D]`: row b, head h attends over the `lengths[b]` keys (rows of D values) at
`buffer[key_offsets[b] + h * head_strides[b]]` and the values at `value_offsets[b] + …` (the
KV arena's blocks, read in place; int64 vectors, a flat contiguous buffer)."""


def load_decode_attention(
    mode: KernelMode, directory: Path | None = None
) -> DecodeAttention | None:
    """The kernel (`mode` `auto`), or None: `off`, or it cannot be built here (logged)."""
    if mode == "off":
        return None
    if mode != "auto":
        raise ValueError(f"KOBOT_ENGINE_KERNELS: must be auto or off (got {mode!r})")
    return _loaded(directory)


@functools.cache
def _loaded(directory: Path | None) -> DecodeAttention | None:
    started = time.perf_counter()
    try:
        path = load_library("decode_attention", directory)
    except (KernelBuildError, OSError, RuntimeError) as error:
        logger.warning(
            "decode attention kernel unavailable (%s); the engine attends with torch matmuls "
            "(slower decoding on a CPU)",
            error,
        )
        return None
    logger.info("decode attention kernel: %s (%.1f s)", path.name, time.perf_counter() - started)
    op: DecodeAttention = torch.ops.kobot.decode_attention
    return op
