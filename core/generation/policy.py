"""The one reply policy, and `ReplyBackend`: a `Decoder` made into a `GenerationBackend`.

One request goes: validate it once (a non-empty prompt, ids in the vocabulary, prompt +
`max_new_tokens` within the window) → attempt 1 with the request's params → clean each
candidate (`reply_text`) → judge it (`quality`) → when none is good, attempt 2 samples with
stronger penalties → when none is good again, a polite fallback. The whole request runs under
one deadline (KOBOT_GENERATION_TIMEOUT_S): the decoder sees it and stops, and the caller gets
GenerationError(TIMEOUT). Every other failure leaves classified (`errors.boundary_error`).

No backend subclasses another: each runtime is a small decoder, composed with this policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from core.generation.base import (
    Attempt,
    BackendInfo,
    Candidate,
    Decoder,
    FinishReason,
    GenerationBackend,
    GenerationError,
    GenerationErrorKind,
    GenerationRequest,
    GenerationResult,
    Health,
    ModelLimits,
    ReplyTokenizer,
    SamplingParams,
    Scorer,
    StreamChunk,
    is_greedy,
)
from core.generation.errors import boundary_error, timeout_error
from core.generation.quality import is_acceptable
from core.generation.reply_text import continuation_text, partial_reply, split_reply
from core.generation.stopping import RunControl

__all__ = [
    "FALLBACK_REPLY",
    "MAX_ATTEMPTS",
    "ReplyBackend",
    "ReplyPolicy",
    "check_prompt",
    "retry_plan",
]

logger = logging.getLogger(__name__)

FALLBACK_REPLY = "음… 어떻게 답해야 할지 잘 모르겠어요. 다르게 말씀해 주시겠어요?"
MAX_ATTEMPTS = 2
RETRY_TEMPERATURE = 0.8
RETRY_REPETITION_PENALTY = 1.3


# --- validation -------------------------------------------------------------------------------


def refused(detail: str) -> GenerationError:
    return GenerationError(GenerationErrorKind.INTERNAL, detail)


def check_ids(ids: Sequence[int], limits: ModelLimits, what: str = "prompt") -> None:
    """Refuse (INTERNAL) ids that are empty, outside the vocabulary or longer than the window."""
    if not ids:
        raise refused(f"empty {what}")
    vocab = limits.vocab_size
    if vocab is not None and any(not 0 <= i < vocab for i in ids):
        raise refused(f"{what} ids outside 0..{vocab - 1}")
    if len(ids) > limits.n_positions:
        raise refused(f"{len(ids)} tokens exceed the {limits.n_positions}-token window")


def check_prompt(prompt: Sequence[int], max_new_tokens: int, limits: ModelLimits) -> None:
    """A prompt the model can continue by `max_new_tokens` within its window (else INTERNAL)."""
    check_ids(prompt, limits)
    if len(prompt) + max_new_tokens > limits.n_positions:
        raise refused(
            f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the {limits.n_positions}-token window"
        )


# --- attempts ---------------------------------------------------------------------------------


def retry_params(params: SamplingParams) -> SamplingParams:
    """The second try samples (a greedy retry would repeat itself) with stronger penalties."""
    return dataclasses.replace(
        params,
        do_sample=True,
        temperature=RETRY_TEMPERATURE if is_greedy(params) else params.temperature,
        repetition_penalty=max(params.repetition_penalty, RETRY_REPETITION_PENALTY),
        no_repeat_ngram_size=params.no_repeat_ngram_size or 3,
    )


def retry_seed(seed: int | None, greedy: bool) -> int | None:
    """A seeded request retries with seed + 1; a greedy one with seed 0 so it stays repeatable."""
    if seed is not None:
        return seed + 1
    return 0 if greedy else None


def retry_plan(params: SamplingParams, seed: int | None) -> list[tuple[SamplingParams, int | None]]:
    """(params, seed) for each attempt, first as asked."""
    return [(params, seed), (retry_params(params), retry_seed(seed, is_greedy(params)))]


# --- the policy -------------------------------------------------------------------------------


class ReplyPolicy:
    """Validate → attempts → clean → judge → fallback over one decoder (module docstring)."""

    def __init__(self, decoder: Decoder, timeout_s: float) -> None:
        self.decoder = decoder
        self.timeout_s = timeout_s
        self._running: set[RunControl] = set()

    def cancel_running(self) -> None:
        """Expire every request in flight: each decoder stops it at its next token."""
        for control in list(self._running):
            control.cancel()

    @property
    def tokenizer(self) -> ReplyTokenizer:
        return self.decoder.tokenizer

    async def reply(
        self, request: GenerationRequest, on_ids: Callable[[list[int]], None] | None = None
    ) -> GenerationResult:
        """The request's result; `on_ids` hears the first candidate's ids as they grow."""
        check_prompt(request.prompt_ids, request.params.max_new_tokens, self.decoder.limits())
        control = RunControl(self.timeout_s)
        self._running.add(control)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._attempts(request, control, on_ids)
        except TimeoutError:
            raise timeout_error(self.timeout_s) from None
        except Exception as error:
            raise boundary_error(error, "generation") from error
        finally:
            control.cancel()
            self._running.discard(control)

    async def _attempts(
        self,
        request: GenerationRequest,
        control: RunControl,
        on_ids: Callable[[list[int]], None] | None,
    ) -> GenerationResult:
        spent = 0
        for number, (params, seed) in enumerate(retry_plan(request.params, request.seed), 1):
            control.check()
            attempt = Attempt(
                request.prompt_ids,
                params,
                seed,
                request.stop_strings,
                control,
                request.cache_key,
                on_ids,
            )
            candidates = await self.decoder.decode(attempt)
            spent += sum(candidate.new_tokens for candidate in candidates)
            result = self.best_of(candidates, request)
            if result is not None:
                return result
            logger.info("attempt %d/%d gave an empty or looping reply", number, MAX_ATTEMPTS)
        return GenerationResult(FALLBACK_REPLY, spent, FinishReason.FALLBACK)

    def best_of(
        self, candidates: Sequence[Candidate], request: GenerationRequest
    ) -> GenerationResult | None:
        """The first good candidate as the result, the other good ones as its alternatives."""
        good = [r for c in candidates if (r := self.judged(c, request)) is not None]
        if not good:
            return None
        others = tuple(
            text for text in dict.fromkeys(r.text for r in good[1:]) if text != good[0].text
        )
        return dataclasses.replace(good[0], alternatives=others)

    def judged(self, candidate: Candidate, request: GenerationRequest) -> GenerationResult | None:
        """The candidate cleaned, or None when it is empty or a loop."""
        text, cut = split_reply(candidate.text, request.stop_strings)
        if not is_acceptable(text, self.tokenizer):
            return None
        finish = FinishReason.STOP if cut else candidate.ended
        return GenerationResult(self.spaced(request, candidate, text), candidate.new_tokens, finish)

    def spaced(self, request: GenerationRequest, candidate: Candidate, text: str) -> str:
        if not request.continuation or candidate.ids is None:
            return text
        return continuation_text(self.tokenizer, request.prompt_ids, candidate.ids, text)

    def partial(self, request: GenerationRequest, new_ids: list[int]) -> str:
        """The text a stream shows for the first candidate's `new_ids` so far."""
        eos = self.tokenizer.eos_id
        ids = new_ids[: new_ids.index(eos)] if eos in new_ids else new_ids
        text = partial_reply(self.tokenizer.decode(ids), request.stop_strings)
        if not request.continuation:
            return text
        return continuation_text(self.tokenizer, request.prompt_ids, ids, text)


# --- the backend ------------------------------------------------------------------------------


class ReplyBackend(GenerationBackend):
    """Any decoder under the reply policy: what `build_backend` returns for every KOBOT_BACKEND."""

    def __init__(self, decoder: Decoder, *, timeout_s: float = 120.0) -> None:
        self.decoder = decoder
        self.policy = ReplyPolicy(decoder, timeout_s)
        self._closed = False

    @property
    def tokenizer(self) -> ReplyTokenizer:
        return self.decoder.tokenizer

    def info(self) -> BackendInfo:
        return self.decoder.info()

    def health(self) -> Health:
        if self._closed:
            return Health(False, f"the {self.info().name} backend is closed")
        return super().health()

    def stats(self) -> dict[str, float]:
        return self.decoder.stats()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self._check_open()
        return await self.policy.reply(request)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """The first candidate's cleaned text whenever it changes (only the newest when several
        are waiting), then the result, exactly as `generate` gives it."""
        self._check_open()
        updates: asyncio.Queue[str] = asyncio.Queue()
        listener = stream_listener(self.policy, request, asyncio.get_running_loop(), updates)
        task = asyncio.ensure_future(self.policy.reply(request, listener))
        try:
            async for text in updates_until(task, updates):
                yield StreamChunk(text)
            result = await task
            yield StreamChunk(result.text, result)
        finally:
            task.cancel()

    async def score(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[float]:
        """Summed log-probabilities of each continuation after its prompt (see the base)."""
        self._check_open()
        scorer = self.decoder
        if not isinstance(scorer, Scorer):
            return await super().score(prompts, continuations)
        limits = self.decoder.limits()
        for prompt, continuation in zip(prompts, continuations, strict=True):
            check_ids(prompt, limits)
            check_ids(continuation, limits, "continuation")
            check_ids([*prompt, *continuation], limits, "scored text")
        return await guarded(scorer.score(prompts, continuations), self.policy.timeout_s)

    async def close(self) -> None:
        """Refuse new requests, expire the running ones, then stop the decoder."""
        if self._closed:
            return
        self._closed = True
        self.policy.cancel_running()
        await self.decoder.close()

    def _check_open(self) -> None:
        if self._closed:
            raise GenerationError(
                GenerationErrorKind.UNAVAILABLE, f"the {self.info().name} backend is closed"
            )


T = TypeVar("T")


async def guarded(work: Awaitable[T], timeout_s: float) -> T:
    """`work` within `timeout_s`, every failure classified."""
    try:
        async with asyncio.timeout(timeout_s):
            return await work
    except TimeoutError:
        raise timeout_error(timeout_s) from None
    except Exception as error:
        raise boundary_error(error, "scoring") from error


def stream_listener(
    policy: ReplyPolicy,
    request: GenerationRequest,
    loop: asyncio.AbstractEventLoop,
    updates: asyncio.Queue[str],
) -> Callable[[list[int]], None]:
    """Runs on the decoding thread at each step: the cleaned text so far, sent when it changed."""
    shown = [""]

    def listen(new_ids: list[int]) -> None:
        text = policy.partial(request, new_ids)
        if text != shown[0]:
            shown[0] = text
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody listens
                loop.call_soon_threadsafe(updates.put_nowait, text)

    return listen


async def updates_until(
    task: asyncio.Future[GenerationResult], updates: asyncio.Queue[str]
) -> AsyncIterator[str]:
    """The texts put in `updates` while `task` runs (only the newest of several waiting)."""
    while not task.done():
        getter: asyncio.Future[Any] = asyncio.ensure_future(updates.get())
        waiting: set[asyncio.Future[Any]] = {task, getter}
        try:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            getter.cancel()
        if getter in done and not task.done():
            text = getter.result()
            while not updates.empty():
                text = updates.get_nowait()
            yield text
