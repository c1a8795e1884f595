"""`kobot::dense` (dense.cpp): the engine's bf16 linear layers on a CPU with AVX-512 BF16, with
the weights prepacked in panels of 32 output columns (`panels_of`) and the bias, tanh-GELU and
residual add applied to the float32 accumulators.

`load_dense` gives the kernel, or None: kernels `off`, a CPU without AVX-512 BF16 (oneDNN's
packed kernels run then), or it cannot be built (logged once).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from core.generation.cpu_features import cpu_flags
from core.generation.engine.kernels.loading import KernelMode, load_operator

__all__ = ["PANEL", "Dense", "fits_panels", "load_dense", "panels_of"]

PANEL = 32
Dense = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool, bool],
    torch.Tensor,
]
"""`(x [M, K] bf16, panels, bias [N] float32 | None, residual [M, N] bf16 | None, gelu,
fp32_out) -> [M, N]`: `residual + gelu?(x @ W + bias)`, rounded to bf16 unless `fp32_out`."""


def fits_panels(weight_in_out: torch.Tensor) -> bool:
    """Whether a `[K, N]` weight packs into panels: K even, N a multiple of `PANEL`."""
    k, n = weight_in_out.shape
    return k % 2 == 0 and n % PANEL == 0


def panels_of(weight_in_out: torch.Tensor) -> torch.Tensor:
    """`[K, N]` -> `[N / 32, K / 2, 32, 2]` bf16: `panels[p, kp, c, j] = W[2 kp + j, 32 p + c]`."""
    k, n = weight_in_out.shape
    pairs = weight_in_out.detach().to(torch.bfloat16).reshape(k // 2, 2, n // PANEL, PANEL)
    return pairs.permute(2, 0, 3, 1).contiguous()


def load_dense(mode: KernelMode, directory: Path | None = None) -> Dense | None:
    """The kernel (`mode` `auto`, on a CPU with AVX-512 BF16), or None."""
    if mode == "auto" and "avx512_bf16" not in cpu_flags():
        return None
    op: Dense | None = load_operator(
        "dense", mode, directory, "the dense layers run on oneDNN's packed bf16 kernels"
    )
    return op
