"""What tests of the engine's C++ kernels share."""

from __future__ import annotations

import shutil
from typing import TypeVar

import pytest

Kernel = TypeVar("Kernel")

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)


def built_or_skip(kernel: Kernel | None) -> Kernel:
    """A loaded kernel, or skip the test where it cannot be built (no C++ compiler)."""
    if kernel is None:
        pytest.skip("the kernel cannot be built here (no C++ compiler)")
    return kernel
