"""`kobot::dense` and `kobot::dense_int8` (dense.cpp): the engine's linear layers on a CPU with
AVX-512 BF16 and VNNI (one tile serves both), with the weights prepacked in panels of 32 output
columns, bf16 (`panels_of`) or int8 per output column (`int8_panels_of`), and the bias,
tanh-GELU and residual add applied to the float32 accumulators. Both take and give bf16
(float32 logits). On a CPU with AMX (detected at run time) the same panels are read as AMX
tiles where K is a multiple of a tile's depth (32 bf16, 64 int8); `dense_isa` says which runs.

`load_dense` / `load_dense_int8` give the kernel, or None: kernels `off`, a CPU without the
instructions (oneDNN's packed bf16 kernels, or torch's int8 linear, run then), or it cannot be
built (logged once).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from core.generation.cpu_features import cpu_flags
from core.generation.engine.kernels.loading import KernelMode, load_operator

__all__ = [
    "DENSE_ISAS",
    "PANEL",
    "Dense",
    "DenseInt8",
    "Int8Panels",
    "dense_isa",
    "fits_panels",
    "int8_panels_of",
    "load_dense",
    "load_dense_int8",
    "panels_of",
]

PANEL = 32
Dense = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool, bool],
    torch.Tensor,
]
"""`(x [M, K] bf16, panels, bias [N] float32 | None, residual [M, N] bf16 | None, gelu,
fp32_out) -> [M, N]`: `residual + gelu?(x @ W + bias)`, rounded to bf16 unless `fp32_out`."""
DenseInt8 = Callable[..., torch.Tensor]
"""`(x, panels, scale, offsets, bias, residual, gelu, fp32_out)`: as `Dense`, on `Int8Panels`."""
INT8_STEPS = 127
KERNEL_FLAGS = frozenset({"avx512_bf16", "avx512_vnni"})
"""Both kernels' instructions (every CPU with AVX-512 BF16 has VNNI too)."""
DENSE_ISAS = ("amx", "avx512")
UNSIGNED_OFFSET = 128
"""The kernel stores x quantized + 128 as unsigned bytes; `offsets` takes the 128 back out."""


class Int8Panels(NamedTuple):
    """A `[K, N]` weight as int8 panels `[N / 32, K / 4, 32, 4]`, `W ~ q * scale[n]`, and
    `offsets[n] = 128 * sum_k q[k, n]`."""

    panels: torch.Tensor
    scale: torch.Tensor
    offsets: torch.Tensor


def fits_panels(weight_in_out: torch.Tensor, k_multiple: int = 2) -> bool:
    """Whether a `[K, N]` weight packs into panels: K a multiple of `k_multiple` (2 for bf16
    pairs, 4 for int8 quads), N a multiple of `PANEL`."""
    k, n = weight_in_out.shape
    return k % k_multiple == 0 and n % PANEL == 0


def panels_of(weight_in_out: torch.Tensor) -> torch.Tensor:
    """`[K, N]` -> `[N / 32, K / 2, 32, 2]` bf16: `panels[p, kp, c, j] = W[2 kp + j, 32 p + c]`."""
    k, n = weight_in_out.shape
    pairs = weight_in_out.detach().to(torch.bfloat16).reshape(k // 2, 2, n // PANEL, PANEL)
    return pairs.permute(2, 0, 3, 1).contiguous()


def int8_panels_of(weight_in_out: torch.Tensor) -> Int8Panels:
    """`[K, N]` -> int8 per output column, symmetric, in panels
    `panels[p, kq, c, j] = q[4 kq + j, 32 p + c]`."""
    k, n = weight_in_out.shape
    weight = weight_in_out.detach().float()
    scale = weight.abs().amax(dim=0).clamp(min=1e-12) / INT8_STEPS
    q = torch.round(weight / scale).clamp(-INT8_STEPS, INT8_STEPS).to(torch.int8)
    offsets = (UNSIGNED_OFFSET * q.sum(dim=0, dtype=torch.int32)).to(torch.int32)
    panels = q.reshape(k // 4, 4, n // PANEL, PANEL).permute(2, 0, 3, 1).contiguous()
    return Int8Panels(panels, scale.contiguous(), offsets.contiguous())


def load_dense(mode: KernelMode, directory: Path | None = None) -> Dense | None:
    """The bf16 kernel (`mode` `auto`, on a CPU with `KERNEL_FLAGS`), or None."""
    op: Dense | None = _load_op(
        "dense", mode, directory, "the dense layers run on oneDNN's packed bf16 kernels"
    )
    return op


def load_dense_int8(mode: KernelMode, directory: Path | None = None) -> DenseInt8 | None:
    """The int8 kernel (`mode` `auto`, on a CPU with `KERNEL_FLAGS`), or None."""
    op: DenseInt8 | None = _load_op(
        "dense_int8", mode, directory, "the int8 layers run on torch's dynamic quantized linear"
    )
    return op


def dense_isa(isa: str | None = None) -> str:
    """The instructions the loaded kernels run on, `amx` or `avx512`; `isa` chooses for the
    process (`amx` only where the CPU has it). Call after `load_dense`/`load_dense_int8`."""
    if isa is not None and isa not in DENSE_ISAS:
        raise ValueError(f"dense_isa: must be one of {', '.join(DENSE_ISAS)} (got {isa!r})")
    chosen: str = torch.ops.kobot.dense_isa(isa)
    return chosen


def _load_op(op: str, mode: KernelMode, directory: Path | None, instead: str) -> Any:
    if mode == "auto" and not cpu_flags() >= KERNEL_FLAGS:
        return None
    return load_operator("dense", mode, directory, instead, op)
