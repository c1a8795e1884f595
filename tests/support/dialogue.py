"""Building a real DialogueManager (SQLite, tiny model) for tests, plus a recording backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from bots.app import build_dialogue_manager
from core.dialogue.manager import DialogueManager
from core.generation.base import (
    BackendInfo,
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    Health,
    StreamChunk,
    TokenCounter,
)
from core.messages import IncomingMessage
from core.settings import Settings

ManagerFactory = Callable[..., Any]
"""The `make_manager` fixture (tests/core/conftest.py): `await make_manager(**settings)`."""


class RecordingBackend(GenerationBackend):
    """Wraps a real backend and keeps every request it was given (a spy, not a fake)."""

    def __init__(self, inner: GenerationBackend) -> None:
        self.inner = inner
        self.requests: list[GenerationRequest] = []
        self.scored: list[tuple[list[Sequence[int]], list[Sequence[int]]]] = []

    @property
    def tokenizer(self) -> TokenCounter:
        return self.inner.tokenizer

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

    def info(self) -> BackendInfo:
        return self.inner.info()

    def health(self) -> Health:
        return self.inner.health()

    def stats(self) -> dict[str, float]:
        return self.inner.stats()

    async def close(self) -> None:
        await self.inner.close()


def make_settings(model_dir: Path, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model": str(model_dir),
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'kobot.db'}",
        "max_new_tokens": 8,
        "temperature": 0.0,
        "device": "cpu",
        "rate_limit_per_minute": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def make_manager(settings: Settings) -> tuple[DialogueManager, RecordingBackend]:
    from core.generation.factory import build_backend

    backend = RecordingBackend(build_backend(settings))
    return await build_dialogue_manager(settings, backend), backend


def message(text: str, user: str = "u1", chat: str = "c1", **fields: Any) -> IncomingMessage:
    return IncomingMessage(platform="test", user_id=user, chat_id=chat, text=text, **fields)
