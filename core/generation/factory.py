"""Choosing and building the generation backend named by the settings.

Building loads the model (seconds), so from async code call it as
`backend = await asyncio.to_thread(build_backend, settings)`.
"""

from __future__ import annotations

from core.generation.base import GenerationBackend
from core.generation.tokenizer import ModelLoadError
from core.settings import Settings

__all__ = ["BACKENDS", "ModelLoadError", "UnknownBackendError", "build_backend"]

BACKENDS = ("local", "openai", "onnx")


class UnknownBackendError(ModelLoadError):
    """KOBOT_BACKEND names no backend that exists."""


def build_backend(settings: Settings) -> GenerationBackend:
    """The backend for `settings.backend`; ModelLoadError when it cannot start."""
    if settings.backend == "local":
        return _local_backend(settings)
    if settings.backend == "openai":
        return _openai_backend(settings)
    if settings.backend == "onnx":
        from core.generation.onnx_backend import OnnxBackend

        return OnnxBackend(
            settings.onnx_dir,
            model=settings.model,
            device=settings.device,
            generation_timeout_s=settings.generation_timeout_s,
        )
    raise UnknownBackendError(
        f"KOBOT_BACKEND: unknown backend {settings.backend!r} (known: {', '.join(BACKENDS)})"
    )


def _openai_backend(settings: Settings) -> GenerationBackend:
    """The remote backend: only the tokenizer is loaded here; the server is not contacted."""
    from core.generation.remote import CircuitBreaker, OpenAICompletionsBackend, RetryPolicy

    if not settings.backend_url:
        raise ModelLoadError("KOBOT_BACKEND_URL: must be set when KOBOT_BACKEND=openai")
    return OpenAICompletionsBackend(
        settings.backend_url,
        model=settings.model,
        served_model=settings.backend_model,
        api_key=settings.backend_api_key,
        timeout_s=settings.backend_timeout_s,
        generation_timeout_s=settings.generation_timeout_s,
        retry=RetryPolicy(retries=settings.backend_retries),
        breaker=CircuitBreaker(
            settings.backend_breaker_failures, settings.backend_breaker_cooldown_s
        ),
        n_positions=settings.backend_n_positions,
    )


def _local_backend(settings: Settings) -> GenerationBackend:
    """The local model on the continuous-batching engine (a LocalBackend subclass)."""
    from core.generation.cpu_features import resolve_engine_dtype
    from core.generation.engine import EngineConfig
    from core.generation.engine_backend import EngineBackend
    from core.generation.local import available_device

    return EngineBackend(
        settings.model,
        device=settings.device,
        dtype=resolve_engine_dtype(settings.dtype, available_device(settings.device)),
        generation_timeout_s=settings.generation_timeout_s,
        engine=EngineConfig(
            max_batch=settings.engine_max_batch,
            kv_budget_mb=settings.engine_kv_budget_mb,
            kv_idle_s=settings.engine_kv_idle_s,
            prefill_chunk=settings.engine_prefill_chunk,
            quant=settings.engine_quant,
        ),
        compile_mode=settings.engine_compile,
    )
