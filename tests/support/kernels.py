"""What tests of the engine's C++ kernels share."""

from __future__ import annotations

import shutil
from typing import TypeVar

import pytest
import torch

Kernel = TypeVar("Kernel")

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)


def built_or_skip(kernel: Kernel | None, needs: str = "") -> Kernel:
    """A loaded kernel, or skip the test where it cannot be built (no C++ compiler) or the CPU
    lacks what it `needs`."""
    if kernel is None:
        lacking = f"a CPU with {needs} and " if needs else ""
        pytest.skip(f"the kernel cannot be built here (it needs {lacking}a C++ compiler)")
    return kernel


def dense_case(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """For the dense kernels: x [m, k] bf16, a [k, n] weight (bf16 values, scaled to keep
    products of order 1), a float32 bias and a bf16 residual."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).bfloat16()
    weight = (torch.randn(k, n, generator=generator) / k**0.5).bfloat16()
    bias = torch.randn(n, generator=generator)
    residual = torch.randn(m, n, generator=generator).bfloat16()
    return x, weight, bias, residual
