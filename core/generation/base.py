"""The generation backend contract: `generate`, `info`, `close`, and one typed error.

Optional: `generate_stream` (the reply as it grows; by default one chunk with the whole reply)
and `score` (log-likelihoods of continuations, for zero-shot classification; by default
unavailable).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class TokenCounter(Protocol):
    """The part of a tokenizer that prompt building and trimming need."""

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text`, with special-token look-alikes treated as plain text."""
        ...


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.2
    no_repeat_ngram_size: int = 3
    do_sample: bool = True
    num_return_sequences: int = 1
    """Candidates per attempt (sampling only): the first good one is the reply, the others
    come back as `GenerationResult.alternatives`."""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A prompt already tokenized (and trimmed to the window) plus how to sample."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_strings: tuple[str, ...] = ("User:",)
    seed: int | None = None
    cache_key: str | None = None
    """Identifies the conversation, so a backend may keep its KV cache between turns."""
    continuation: bool = False
    """The reply continues the prompt's text (`/complete`, `/story`): it starts with a space
    when the model began a new word."""


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    EOS = "eos"
    FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str
    new_tokens: int
    finish_reason: FinishReason
    alternatives: tuple[str, ...] = ()
    """Other good candidates (`num_return_sequences` > 1), distinct from `text` and each other."""


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """The reply so far (cleaned like the final text); the last chunk carries the `result`."""

    text: str
    result: GenerationResult | None = None


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: str
    model: str
    device: str
    dtype: str
    n_positions: int


class GenerationErrorKind(StrEnum):
    OUT_OF_MEMORY = "out_of_memory"
    DEVICE = "device"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class GenerationError(Exception):
    """Every failure of a backend, classified so the dialogue manager can answer politely."""

    def __init__(self, kind: GenerationErrorKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class GenerationBackend(abc.ABC):
    """Turns prompt ids into reply text. Implementations never block the event loop."""

    @property
    @abc.abstractmethod
    def tokenizer(self) -> TokenCounter: ...

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    @abc.abstractmethod
    def info(self) -> BackendInfo: ...

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """The reply as it grows, then a last chunk with the result (whose text is exactly what
        `generate` gives for the same request and seed). By default: only that last chunk."""
        result = await self.generate(request)
        yield StreamChunk(result.text, result)

    async def score(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[float]:
        """For each pair, the summed log-probability of the continuation's ids after the
        prompt's, all pairs in one batched forward pass. GenerationError(UNAVAILABLE) when the
        backend cannot score."""
        raise GenerationError(
            GenerationErrorKind.UNAVAILABLE, f"the {self.info().name} backend cannot score text"
        )

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model and its memory."""


def token_tuple(ids: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(i) for i in ids)
