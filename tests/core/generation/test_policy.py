"""The reply policy over a decoder written here against the public `Decoder` protocol: what
every backend shares (validation, attempts, judging, fallback, the deadline, the error boundary)
without a model in the way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

import core.generation.errors as errors
from core.generation.base import (
    Attempt,
    BackendInfo,
    Candidate,
    FinishReason,
    GenerationError,
    GenerationErrorKind,
    GenerationRequest,
    ModelLimits,
    SamplingParams,
)
from core.generation.policy import FALLBACK_REPLY, ReplyBackend
from core.generation.tokenizer import KoGPT2Tokenizer
from tests.support.failures import DECODER_FAILURES

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
Behaviour = Callable[[Attempt], list[Candidate]]


class FakeDecoder:
    """Answers each attempt with `behaviour(attempt)` after `delay_s` (awaited, like a server)."""

    def __init__(self, tokenizer: KoGPT2Tokenizer, behaviour: Behaviour) -> None:
        self.tokenizer = tokenizer
        self.behaviour = behaviour
        self.attempts: list[Attempt] = []
        self.delay_s = 0.0
        self.closed = False

    def limits(self) -> ModelLimits:
        return ModelLimits(64, 51200)

    def info(self) -> BackendInfo:
        return BackendInfo("fake", "scripted", "nowhere", "none", 64)

    async def decode(self, attempt: Attempt) -> list[Candidate]:
        self.attempts.append(attempt)
        await asyncio.sleep(self.delay_s)
        return self.behaviour(attempt)

    def stats(self) -> dict[str, float]:
        return {"attempts_total": float(len(self.attempts))}

    async def close(self) -> None:
        self.closed = True


def says(*texts: str) -> Behaviour:
    return lambda attempt: [Candidate(text, 5, FinishReason.EOS) for text in texts]


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest((400, 401, 402), GREEDY, **fields)  # type: ignore[arg-type]


@pytest.fixture
def fake(tokenizer: KoGPT2Tokenizer) -> FakeDecoder:
    return FakeDecoder(tokenizer, says("네, 좋아요."))


async def test_a_good_first_candidate_is_the_reply(fake: FakeDecoder) -> None:
    result = await ReplyBackend(fake).generate(request())
    assert (result.text, result.new_tokens, result.finish_reason) == (
        "네, 좋아요.",
        5,
        FinishReason.EOS,
    )
    assert fake.attempts[0].params == GREEDY and fake.attempts[0].stop_strings == ("User:",)


async def test_other_good_candidates_are_distinct_alternatives(fake: FakeDecoder) -> None:
    fake.behaviour = says("하나", "", "둘", "하나", "AI: 둘 User: 셋")
    result = await ReplyBackend(fake).generate(request())
    assert (result.text, result.alternatives) == ("하나", ("둘",))


async def test_an_empty_greedy_reply_is_retried_sampling_with_a_seed(fake: FakeDecoder) -> None:
    fake.behaviour = lambda a: says("...")(a) if len(fake.attempts) == 1 else says("다시요")(a)
    result = await ReplyBackend(fake).generate(request())
    assert result.text == "다시요" and result.new_tokens == 5  # the reply's own tokens
    retry = fake.attempts[1]
    assert retry.params.do_sample and retry.params.temperature > 0 and retry.seed == 0


async def test_two_bad_attempts_fall_back_politely(fake: FakeDecoder) -> None:
    fake.behaviour = says("ㅋ" * 40)
    result = await ReplyBackend(fake).generate(request(seed=7))
    assert (result.text, result.finish_reason) == (FALLBACK_REPLY, FinishReason.FALLBACK)
    assert [a.seed for a in fake.attempts] == [7, 8]


async def test_prompts_are_validated_before_the_decoder_runs(fake: FakeDecoder) -> None:
    backend = ReplyBackend(fake)
    for prompt in [(), (51200,), (400,) * 60]:
        with pytest.raises(GenerationError) as error:
            await backend.generate(GenerationRequest(prompt, GREEDY))
        assert error.value.kind is GenerationErrorKind.INTERNAL
    assert fake.attempts == []


async def test_the_deadline_stops_a_slow_decoder(fake: FakeDecoder) -> None:
    fake.delay_s = 5.0
    started = time.monotonic()
    with pytest.raises(GenerationError) as error:
        await ReplyBackend(fake, timeout_s=0.2).generate(request())
    assert error.value.kind is GenerationErrorKind.TIMEOUT
    assert time.monotonic() - started < 1.0
    assert fake.attempts[0].control.expired()  # the decoder's thread would see it too


@pytest.mark.parametrize(("failure", "kind"), DECODER_FAILURES)
async def test_the_error_boundary_classifies_what_a_decoder_raises(
    fake: FakeDecoder, monkeypatch: pytest.MonkeyPatch, failure: Exception, kind: str
) -> None:
    freed: list[bool] = []
    monkeypatch.setattr(errors, "free_accelerator_memory", lambda: freed.append(True))

    def fail(attempt: Attempt) -> list[Candidate]:
        raise failure

    fake.behaviour = fail
    with pytest.raises(GenerationError) as error:
        await ReplyBackend(fake).generate(request())
    assert type(error.value) is GenerationError and error.value.kind == kind
    assert freed == ([True] if kind == "out_of_memory" else [])


async def test_a_closed_backend_is_unhealthy_and_unavailable(fake: FakeDecoder) -> None:
    backend = ReplyBackend(fake)
    await backend.generate(request())
    assert backend.health().ok and backend.stats() == {"attempts_total": 1.0}
    await backend.close()
    assert fake.closed and not backend.health().ok
    with pytest.raises(GenerationError) as error:
        await backend.generate(request())
    assert error.value.kind is GenerationErrorKind.UNAVAILABLE


async def test_closing_expires_the_requests_in_flight(fake: FakeDecoder) -> None:
    def until_expired(attempt: Attempt) -> list[Candidate]:
        while not attempt.control.expired():  # as a decoder's thread polls its stop rule
            time.sleep(0.005)
        attempt.control.check()  # raises TIMEOUT, as a decoder whose rule stopped it does
        return []

    async def on_a_thread(attempt: Attempt) -> list[Candidate]:
        return await asyncio.to_thread(until_expired, attempt)

    fake.decode = on_a_thread  # type: ignore[method-assign]
    backend = ReplyBackend(fake, timeout_s=30.0)
    running = asyncio.create_task(backend.generate(request()))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await backend.close()
    with pytest.raises(GenerationError) as error:
        await running
    assert error.value.kind is GenerationErrorKind.TIMEOUT and time.monotonic() - started < 1.0


async def test_a_decoder_that_cannot_score_says_so(fake: FakeDecoder) -> None:
    with pytest.raises(GenerationError) as error:
        await ReplyBackend(fake).score([[400]], [[401]])
    assert error.value.kind is GenerationErrorKind.UNAVAILABLE
