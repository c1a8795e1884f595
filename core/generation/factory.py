"""Choosing and building the generation backend named by the settings.

Every backend is the one reply policy over a decoder (`ReplyBackend`): the engine for `local`
(or Hugging Face `generate` when the engine refuses the model, said so in the log), an HTTP
server for `openai`, ONNX Runtime for `onnx`. Building loads the model (seconds), so from
async code call it as `backend = await asyncio.to_thread(build_backend, settings)`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from core.generation.base import Decoder
from core.generation.errors import ModelLoadError
from core.generation.policy import ReplyBackend
from core.settings import Settings

__all__ = [
    "BACKENDS",
    "ModelLoadError",
    "UnknownBackendError",
    "build_backend",
    "build_decoder",
    "local_decoder",
]

logger = logging.getLogger(__name__)

BACKENDS = ("local", "openai", "onnx")


class UnknownBackendError(ModelLoadError):
    """KOBOT_BACKEND names no backend that exists."""


def build_backend(settings: Settings) -> ReplyBackend:
    """The backend for `settings.backend`; ModelLoadError when it cannot start."""
    return ReplyBackend(build_decoder(settings), timeout_s=settings.generation_timeout_s)


def build_decoder(settings: Settings) -> Decoder:
    """The decoder for `settings.backend`; ModelLoadError when it cannot start."""
    if settings.backend == "local":
        return local_decoder(settings)
    if settings.backend == "openai":
        return _openai_decoder(settings)
    if settings.backend == "onnx":
        from core.generation.onnx.decoder import OnnxDecoder

        return OnnxDecoder(settings.onnx_dir, model=settings.model, device=settings.device)
    raise UnknownBackendError(
        f"KOBOT_BACKEND: unknown backend {settings.backend!r} (known: {', '.join(BACKENDS)})"
    )


def _openai_decoder(settings: Settings) -> Decoder:
    """The remote decoder: only the tokenizer is loaded here; the server is not contacted."""
    from core.generation.remote import CircuitBreaker, OpenAICompletionsDecoder, RetryPolicy
    from core.generation.tokenizer import load_tokenizer

    if not settings.backend_url:
        raise ModelLoadError("KOBOT_BACKEND_URL: must be set when KOBOT_BACKEND=openai")
    return OpenAICompletionsDecoder(
        settings.backend_url,
        model=settings.model,
        tokenizer=load_tokenizer(settings.model),
        served_model=settings.backend_model,
        api_key=settings.backend_api_key,
        timeout_s=settings.backend_timeout_s,
        retry=RetryPolicy(retries=settings.backend_retries),
        breaker=CircuitBreaker(
            settings.backend_breaker_failures, settings.backend_breaker_cooldown_s
        ),
        n_positions=settings.backend_n_positions,
    )


def local_decoder(settings: Settings) -> Decoder:
    """The local model on the continuous-batching engine; Hugging Face `generate` for a model
    the engine refuses (not a plain GPT-2). Loaded on a thread that ends (`core.generation.threads`:
    afterwards only the decoder's own thread runs torch)."""
    from core.generation.threads import on_a_fresh_thread

    return on_a_fresh_thread(lambda: _load_local_decoder(settings))


def _load_local_decoder(settings: Settings) -> Decoder:
    from core.generation.device import load_local_model
    from core.generation.engine.decoder import EngineDecoder, start_engine
    from core.generation.engine.forward import UnsupportedModelError
    from core.generation.engine.scheduler import EngineConfig

    loaded = load_local_model(settings.model, settings.device, settings.dtype)
    config = EngineConfig(
        max_batch=settings.engine_max_batch,
        kv_budget_mb=settings.engine_kv_budget_mb,
        kv_idle_s=settings.engine_kv_idle_s,
        prefill_chunk=settings.engine_prefill_chunk,
        quant=settings.engine_quant,
        kv_dtype=settings.engine_kv_dtype,
        kernels=settings.engine_kernels,
        kernel_dir=Path(settings.engine_kernel_dir) if settings.engine_kernel_dir else None,
        graphs=settings.engine_graphs,
    )
    try:
        return EngineDecoder(loaded, start_engine(loaded, config, settings.engine_compile))
    except UnsupportedModelError as error:
        from core.generation.hf_decoder import HFGenerateDecoder

        logger.warning(
            "KOBOT_MODEL %s: the engine runs plain GPT-2 models only (%s); falling back to "
            "Hugging Face generate (one request at a time, no KV reuse)",
            settings.model,
            error,
        )
        return HFGenerateDecoder(loaded)
