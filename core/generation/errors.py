"""The generation error boundary: any failure becomes a classified `GenerationError`.

Framework-free at import: torch's error types are looked up only when torch is already loaded
(a backend that never loaded torch cannot raise them), so the remote backend stays torch-free.
"""

from __future__ import annotations

import logging
import re
import sys

from core.errors import StartupError
from core.generation.base import GenerationError, GenerationErrorKind

__all__ = ["ModelLoadError", "boundary_error", "classify_error", "describe", "timeout_error"]

logger = logging.getLogger(__name__)

_DEVICE_WORDS = re.compile(
    r"\b(cuda|cudnn|cublas|cusolver|cusparse|cufft|nccl|hip|rocm|mps|metal|device|accelerator)",
    re.IGNORECASE,
)


class ModelLoadError(StartupError):
    """The model, its tokenizer or its runtime cannot start; the message names the KOBOT_*
    setting to fix."""


def describe(error: BaseException) -> str:
    """`Type: first line of the message`, at most 300 characters, for logs and details."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def timeout_error(timeout_s: float) -> GenerationError:
    return GenerationError(
        GenerationErrorKind.TIMEOUT,
        f"no reply within {timeout_s:g} s (KOBOT_GENERATION_TIMEOUT_S)",
    )


def _torch_error_type(name: str) -> type[BaseException] | None:
    found = getattr(sys.modules.get("torch"), name, None)
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def is_out_of_memory(error: BaseException) -> bool:
    oom = _torch_error_type("OutOfMemoryError")
    if isinstance(error, MemoryError) or (oom is not None and isinstance(error, oom)):
        return True
    return "out of memory" in str(error).lower()


def is_device_error(error: BaseException) -> bool:
    accelerator = _torch_error_type("AcceleratorError")
    if accelerator is not None and isinstance(error, accelerator):
        return True
    return isinstance(error, RuntimeError) and _DEVICE_WORDS.search(str(error)) is not None


def classify_error(error: BaseException) -> GenerationError:
    """OOM → OUT_OF_MEMORY, CUDA/device → DEVICE, anything else INTERNAL; a GenerationError
    passes as it is."""
    if isinstance(error, GenerationError):
        return error
    if is_out_of_memory(error):
        return GenerationError(GenerationErrorKind.OUT_OF_MEMORY, describe(error))
    if is_device_error(error):
        return GenerationError(GenerationErrorKind.DEVICE, describe(error))
    return GenerationError(GenerationErrorKind.INTERNAL, describe(error))


def boundary_error(error: BaseException, action: str) -> GenerationError:
    """`classify_error`, logging anything unexpected and freeing GPU memory after an OOM."""
    mapped = classify_error(error)
    if mapped is not error:
        logger.error("%s failed: %s", action, mapped, exc_info=error)
    if mapped.kind is GenerationErrorKind.OUT_OF_MEMORY:
        free_accelerator_memory()
    return mapped


def free_accelerator_memory() -> None:
    """Return cached CUDA memory to the driver (after an OOM), when torch is loaded."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
