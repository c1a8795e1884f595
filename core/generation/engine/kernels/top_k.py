"""`kobot::top_k` (top_k.cpp): each row's k best float32 scores, in descending order, with
their ids; the sampler's candidates on a CPU. `kobot::sample` (the same file): the sampler's
whole choice for a batch in one call (`load_fused_sample`).

`torch_top_k` is the same contract in torch (any device); `load_top_k` gives the kernel, or
None where it cannot be built (logged once).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.generation.engine.kernels.loading import KernelMode, load_operator

__all__ = ["FusedSample", "TopK", "load_fused_sample", "load_top_k", "torch_top_k"]

TopK = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""`(scores [R, V] float32, k) -> (values [R, k], ids [R, k])`, each row in descending order."""

FusedSample = Callable[..., list[int]]
"""`(logits [R, V] float32 (penalized and banned in place), seen ids (int64 tensor), seen
offsets [R + 1], penalty [R], banned ids, banned offsets [R + 1], top_k [R], temperature [R],
top_p [R], uniform [R]) -> tokens [R]`: per row, top_k > 0 draws among the top k (ties at the
k-th kept) after temperature and top-p with its uniform number, 0 takes the argmax, and a
negative top_k leaves the row to the caller (-1)."""


def torch_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = torch.topk(scores, k, dim=-1)
    return values, ids


def load_top_k(mode: KernelMode, directory: Path | None = None) -> TopK | None:
    """The kernel (`mode` `auto`), or None: `off`, or it cannot be built here (logged)."""
    op: TopK | None = _sampler_op("top_k", mode, directory)
    return op


def load_fused_sample(mode: KernelMode, directory: Path | None = None) -> FusedSample | None:
    """`kobot::sample` (`mode` `auto`), or None: `off`, or it cannot be built here (logged)."""
    op: FusedSample | None = _sampler_op("sample", mode, directory)
    return op


def _sampler_op(op: str, mode: KernelMode, directory: Path | None) -> Any:
    instead = "the sampler runs on torch ops (torch.topk; slower on a CPU)"
    return load_operator("top_k", mode, directory, instead, op)
