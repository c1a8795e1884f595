"""Backends for the tests, built as users get them (the factory's, on the tiny model), and
wrappers that share one real backend between tests (scripting the model: tests/support/scripts)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.generation.base import (
    BackendInfo,
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    Health,
    StreamChunk,
    TokenCounter,
)
from core.generation.engine.decoder import EngineDecoder
from core.generation.factory import build_backend
from core.generation.policy import ReplyBackend
from core.settings import Settings


def local_settings(model_dir: Path, **overrides: Any) -> Settings:
    """KOBOT_BACKEND=local on the CPU for `model_dir` with a KV budget that suits the tiny
    model (64 MB: 64k tokens), nothing read from the environment."""
    values: dict[str, Any] = {
        "model": str(model_dir),
        "device": "cpu",
        "backend": "local",
        "engine_kv_budget_mb": 64,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def engine_backend(model_dir: Path, **overrides: Any) -> ReplyBackend:
    """What the factory ships for KOBOT_BACKEND=local: the reply policy over the engine."""
    backend = build_backend(local_settings(model_dir, **overrides))
    assert isinstance(backend.decoder, EngineDecoder)
    return backend


def close_now(backend: ReplyBackend) -> None:
    """Close a backend from synchronous fixture code."""
    asyncio.run(backend.close())


@dataclass(eq=False)
class Wrapping(GenerationBackend):
    """A real backend (`inner`) behind the three required methods; streaming, scoring, health
    and stats are GenerationBackend's defaults (a subclass's `generate` streams as one chunk), and
    `close` leaves `inner` open, so one model serves many tests."""

    inner: GenerationBackend

    @property
    def tokenizer(self) -> TokenCounter:
        return self.inner.tokenizer

    def info(self) -> BackendInfo:
        return self.inner.info()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.inner.generate(request)


class Unclosed(Wrapping):
    """Every method passed through to `inner` but `close`, which leaves it open (a backend shared
    by several managers)."""

    def health(self) -> Health:
        return self.inner.health()

    def stats(self) -> dict[str, float]:
        return self.inner.stats()

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        async for chunk in self.inner.generate_stream(request):
            yield chunk

    async def score(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[float]:
        return await self.inner.score(prompts, continuations)


class RecordingBackend(Unclosed):
    """Wraps a real backend and keeps every request it was given (a spy, not a fake); `close`
    closes it."""

    def __init__(self, inner: GenerationBackend) -> None:
        super().__init__(inner)
        self.requests: list[GenerationRequest] = []
        self.scored: list[tuple[list[Sequence[int]], list[Sequence[int]]]] = []

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        return await self.inner.generate(request)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        self.requests.append(request)
        async for chunk in self.inner.generate_stream(request):
            yield chunk

    async def score(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[float]:
        self.scored.append((list(prompts), list(continuations)))
        return await self.inner.score(prompts, continuations)

    async def close(self) -> None:
        await self.inner.close()
