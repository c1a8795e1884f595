"""`kobot::top_k` (top_k.cpp): each row's k best float32 scores, in descending order, with
their ids; the sampler's candidates on a CPU.

`torch_top_k` is the same contract in torch (any device); `load_top_k` gives the kernel, or
None where it cannot be built (logged once).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from core.generation.engine.kernels.loading import KernelMode, load_operator

__all__ = ["TopK", "load_top_k", "torch_top_k"]

TopK = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""`(scores [R, V] float32, k) -> (values [R, k], ids [R, k])`, each row in descending order."""


def torch_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = torch.topk(scores, k, dim=-1)
    return values, ids


def load_top_k(mode: KernelMode, directory: Path | None = None) -> TopK | None:
    """The kernel (`mode` `auto`), or None: `off`, or it cannot be built here (logged)."""
    op: TopK | None = load_operator(
        "top_k", mode, directory, "the sampler selects with torch.topk (slower on a CPU)"
    )
    return op
