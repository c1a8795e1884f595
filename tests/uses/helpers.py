"""Backends for the uses tests: the real LocalBackend with each candidate row scripted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from core.generation.base import (
    BackendInfo,
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
    TokenCounter,
)
from core.generation.local import LocalBackend


class RowScript(LogitsProcessor):
    """Row i of the batch says `scripts[i % len(scripts)]` token by token, then keeps its last."""

    def __init__(self, scripts: Sequence[Sequence[int]]) -> None:
        self.scripts = scripts
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        for row in range(scores.shape[0]):
            script = self.scripts[row % len(self.scripts)]
            forced[row, script[min(step, len(script) - 1)]] = 0.0
        return forced  # type: ignore[return-value]


class RowScriptedBackend(LocalBackend):
    """LocalBackend whose model says scripted ids per candidate row (no script: the model)."""

    rows: tuple[tuple[int, ...], ...] = ()

    def script(self, *rows: Sequence[int]) -> None:
        self.rows = tuple(tuple(row) for row in rows)

    def script_texts(self, *texts: str) -> None:
        """Each text's ids then `</s>` (KoGPT2 prepends ▁: the first token starts a word)."""
        eos = self.tokenizer.eos_id
        self.script(*[[*self.tokenizer.encode_text(text), eos] for text in texts])

    def _logits_processors(self) -> LogitsProcessorList | None:
        return LogitsProcessorList([RowScript(self.rows)]) if self.rows else None


class Unclosed(GenerationBackend):
    """A backend shared by several managers: `close` leaves it open."""

    def __init__(self, inner: GenerationBackend) -> None:
        self.inner = inner

    @property
    def tokenizer(self) -> TokenCounter:
        return self.inner.tokenizer

    def info(self) -> BackendInfo:
        return self.inner.info()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.inner.generate(request)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        async for chunk in self.inner.generate_stream(request):
            yield chunk

    async def score(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[float]:
        return await self.inner.score(prompts, continuations)
