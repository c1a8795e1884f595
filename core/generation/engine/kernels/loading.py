"""Loading one of the engine's kernels as a torch operator, or saying once why it cannot be.

A kernel is optional: where it cannot be built (no C++ compiler, say) the engine keeps torch's
own ops for that work, and the log says why, once per kernel and folder.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch

from core.generation.engine.kernels.build import KernelBuildError, load_library

__all__ = ["KernelMode", "load_operator"]

logger = logging.getLogger(__name__)

KernelMode = Literal["auto", "off"]


def load_operator(
    name: str, mode: KernelMode, directory: Path | None, instead: str, op: str | None = None
) -> Any:
    """`torch.ops.kobot.<op>` (default: `name`) from kernel `name`.cpp (`mode` `auto`), or
    None: `off`, or it cannot be built here (logged with `instead`, what the engine does
    without it)."""
    if mode == "off":
        return None
    if mode != "auto":
        raise ValueError(f"KOBOT_ENGINE_KERNELS: must be auto or off (got {mode!r})")
    if _loaded(name, directory, instead) is None:
        return None
    return getattr(torch.ops.kobot, op or name)


@functools.cache
def _loaded(name: str, directory: Path | None, instead: str) -> Any:
    started = time.perf_counter()
    try:
        path = load_library(name, directory)
    except (KernelBuildError, OSError, RuntimeError) as error:
        logger.warning("%s kernel unavailable (%s); %s", name, error, instead)
        return None
    logger.info("%s kernel: %s (%.1f s)", name, path.name, time.perf_counter() - started)
    return path
