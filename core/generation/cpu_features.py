"""What this machine's processor offers the model, and the dtype `auto` picks from it.

bf16 matmuls are several times faster than fp32 on a CPU with AMX (`amx_bf16`) or AVX-512 BF16
(`avx512_bf16`), where oneDNN runs them natively; elsewhere bf16 is emulated and slower than
fp32, so `auto` keeps fp32 there. On CUDA `auto` is bf16 where the GPU supports it, else fp16.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

__all__ = ["FAST_BF16_FLAGS", "auto_dtype", "auto_dtype_name", "cpu_flags", "fast_bf16_cpu"]

logger = logging.getLogger(__name__)

FAST_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's feature flags (empty where /proc/cpuinfo is unreadable)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def fast_bf16_cpu(flags: frozenset[str] | None = None) -> bool:
    """True when bf16 matmuls run natively (AMX or AVX-512 BF16): from the flags, else torch."""
    flags = cpu_flags() if flags is None else flags
    if flags:
        return bool(flags & FAST_BF16_FLAGS)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def auto_dtype(device: str, flags: frozenset[str] | None = None) -> torch.dtype:
    """The fastest exact-enough dtype on `device` (see the module docstring)."""
    if device.startswith("cuda"):
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float16
    if device == "cpu":
        return torch.bfloat16 if fast_bf16_cpu(flags) else torch.float32
    return torch.float16  # mps


def auto_dtype_name(device: str) -> str:
    """KOBOT_DTYPE `auto` made concrete for `device` (`fp32`, `fp16` or `bf16`), and logged."""
    chosen = _NAMES[auto_dtype(device)]
    if device == "cpu":
        found = sorted(cpu_flags() & FAST_BF16_FLAGS) or ["no amx_bf16/avx512_bf16"]
        logger.info("dtype auto: %s on the CPU (%s)", chosen, ", ".join(found))
    else:
        logger.info("dtype auto: %s on %s", chosen, device)
    return chosen
