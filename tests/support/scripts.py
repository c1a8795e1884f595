"""Backends for the uses tests: the engine backend as shipped, each candidate row scripted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from core.generation.base import (
    BackendInfo,
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    Health,
    StreamChunk,
    TokenCounter,
)
from core.generation.policy import ReplyBackend
from core.generation.tokenizer import KoGPT2Tokenizer
from tests.support.backends import script_rows


class RowScripts:
    """The factory's local backend whose model says scripted ids per candidate row (through
    the decoder's public `logits_hook`; no script: the model itself)."""

    def __init__(self, backend: ReplyBackend) -> None:
        self.backend = backend

    @property
    def tokenizer(self) -> KoGPT2Tokenizer:
        tokenizer = self.backend.tokenizer
        assert isinstance(tokenizer, KoGPT2Tokenizer)
        return tokenizer

    def script(self, *rows: Sequence[int]) -> None:
        script_rows(self.backend, *rows)

    def script_texts(self, *texts: str) -> None:
        """Each text's ids then `</s>` (KoGPT2 prepends ▁: the first token starts a word)."""
        eos = self.tokenizer.eos_id
        self.script(*[[*self.tokenizer.encode_text(text), eos] for text in texts])


class Unclosed(GenerationBackend):
    """A backend shared by several managers: `close` leaves it open."""

    def __init__(self, inner: GenerationBackend) -> None:
        self.inner = inner

    @property
    def tokenizer(self) -> TokenCounter:
        return self.inner.tokenizer

    def info(self) -> BackendInfo:
        return self.inner.info()

    def health(self) -> Health:
        return self.inner.health()

    def stats(self) -> dict[str, float]:
        return self.inner.stats()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.inner.generate(request)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        async for chunk in self.inner.generate_stream(request):
            yield chunk

    async def score(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[float]:
        return await self.inner.score(prompts, continuations)
