"""Choosing and building the generation backend named by the settings.

Building loads the model (seconds), so from async code call it as
`backend = await asyncio.to_thread(build_backend, settings)`.
"""

from __future__ import annotations

from core.generation.base import GenerationBackend
from core.generation.tokenizer import ModelLoadError
from core.settings import Settings

__all__ = ["BACKENDS", "ModelLoadError", "UnknownBackendError", "build_backend"]

BACKENDS = ("local",)


class UnknownBackendError(ModelLoadError):
    """KOBOT_BACKEND names no backend that exists."""


def build_backend(settings: Settings) -> GenerationBackend:
    """The backend for `settings.backend`; ModelLoadError when it cannot start."""
    if settings.backend == "local":
        from core.generation.local import LocalBackend

        return LocalBackend(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            generation_timeout_s=settings.generation_timeout_s,
        )
    raise UnknownBackendError(
        f"KOBOT_BACKEND: unknown backend {settings.backend!r} (known: {', '.join(BACKENDS)})"
    )
