"""What a decoder may raise mid-generation, and the `GenerationError` kind each one becomes
(`core.generation.errors.classify_error`): one table for every layer that is tested with it."""

from __future__ import annotations

import torch

DECODER_FAILURES: list[tuple[Exception, str]] = [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
    (RuntimeError("CUDA error: device-side assert triggered"), "device"),
    (ZeroDivisionError("division by zero"), "internal"),
]
