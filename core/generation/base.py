"""The generation contracts: the backend callers use, the decoder a backend runs, one typed error.

`GenerationBackend` is what the dialogue manager sees: `generate`, `info`, `close`, `health`,
`stats`, optionally `generate_stream` (the reply as it grows; by default one chunk with the whole
reply) and `score` (log-likelihoods of continuations; by default unavailable).

`Decoder` is the small thing each model runtime implements (the engine, a remote server, ONNX,
Hugging Face `generate`): one `Attempt` in, raw `Candidate`s out. The reply policy
(`policy.py`) turns a decoder into a backend: validation, retries, cleaning, judging, fallback.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable


class TokenCounter(Protocol):
    """The part of a tokenizer that prompt building and trimming need."""

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text`, with special-token look-alikes treated as plain text."""
        ...


class ReplyTokenizer(TokenCounter, Protocol):
    """What the reply policy and the decoders need of a tokenizer."""

    @property
    def eos_id(self) -> int: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` without control tokens."""
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


def is_greedy(params: SamplingParams) -> bool:
    """Temperature 0 or `do_sample=False`: the argmax at every step, one candidate."""
    return not params.do_sample or params.temperature <= 0


def candidate_rows(params: SamplingParams) -> int:
    """How many candidates one attempt decodes: one when greedy, else `num_return_sequences`."""
    return 1 if is_greedy(params) else max(1, params.num_return_sequences)


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
    """What runs the model, for `/status`, logs and health checks."""

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


@dataclass(frozen=True, slots=True)
class Health:
    """A backend's own view of whether it can serve: `detail` says what it runs or what is wrong."""

    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """What a prompt must respect: ids below `vocab_size`, prompt + new tokens ≤ `n_positions`.
    `vocab_size` None: the decoder cannot tell (a remote server), so ids are not range-checked."""

    n_positions: int
    vocab_size: int | None


class Control(Protocol):
    """A request's deadline and cancel flag, as a decoder sees them; the policy makes one per
    request (`core.generation.stopping.RunControl`) and shares it with the decoding thread."""

    @property
    def timeout_s(self) -> float: ...

    @property
    def deadline(self) -> float:
        """The `time.monotonic()` time by which the reply must be done."""
        ...

    def expired(self) -> bool:
        """The deadline passed or the request was cancelled."""
        ...

    def check(self) -> None:
        """Raise GenerationError(TIMEOUT) once `expired`."""
        ...


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at a reply, as the policy asks a decoder for it."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int | None
    stop_strings: tuple[str, ...]
    control: Control
    """The request's deadline and cancel flag; a decoder stops when it expires."""
    cache_key: str | None = None
    on_ids: Callable[[list[int]], None] | None = None
    """Streaming: called (on any thread) with the first candidate's new ids after each step."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One decoded continuation, before cleaning."""

    text: str
    """The raw new text (the EOS token left out)."""
    new_tokens: int
    """Tokens the model produced for it, the EOS included."""
    ended: FinishReason
    """Why the decoder stopped: EOS, STOP (a stop string) or LENGTH."""
    ids: tuple[int, ...] | None = None
    """The new ids without the EOS, when the decoder has them (a continuation's spacing)."""


class Decoder(Protocol):
    """A model runtime: turns one `Attempt` into candidates; raises GenerationError (or any
    exception, which the policy classifies). A timeout raises GenerationError(TIMEOUT)."""

    @property
    def tokenizer(self) -> ReplyTokenizer: ...

    def limits(self) -> ModelLimits: ...

    def info(self) -> BackendInfo: ...

    async def decode(self, attempt: Attempt) -> list[Candidate]: ...

    def stats(self) -> dict[str, float]:
        """Counters and gauges for `/metrics` (empty when the decoder keeps none)."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Scorer(Protocol):
    """A decoder that can also score continuations (see `GenerationBackend.score`)."""

    async def score(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[float]: ...


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

    def health(self) -> Health:
        """Whether the backend can serve now (by default: yes, naming what it runs)."""
        info = self.info()
        return Health(True, f"{info.name} {info.model} on {info.device}")

    def stats(self) -> dict[str, float]:
        """Figures for `/metrics` (engine steps, KV use…); by default none."""
        return {}
