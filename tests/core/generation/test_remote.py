"""The remote backend (the reply policy over the HTTP decoder) against a fake OpenAI-compatible
(vLLM) server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from bots.app import build_dialogue_manager
from core.dialogue import texts
from core.generation.base import (
    FinishReason,
    GenerationError,
    GenerationErrorKind,
    GenerationRequest,
    SamplingParams,
)
from core.generation.factory import build_backend
from core.generation.policy import FALLBACK_REPLY, ReplyBackend
from core.generation.remote import (
    BreakerState,
    CircuitBreaker,
    OpenAICompletionsDecoder,
    RetryPolicy,
    completions_url,
    parse_retry_after,
)
from core.generation.tokenizer import KoGPT2Tokenizer, load_tokenizer
from core.messages import ConversationKey, ReplyKind, Role
from core.settings import ConfigError, load_settings
from tests.support.dialogue import make_settings, message
from tests.support.openai import Answer, FakeOpenAI, Hang, Status

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, do_sample=False)
LOOPING = "안녕 " * 20
POLITE = texts.GENERATION_FAILED.get("unavailable", texts.GENERATION_FAILED["default"])


class Clock:
    """The breaker's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Sleeps:
    """Records each backoff delay instead of waiting it out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def remote(
    url: str,
    tokenizer: KoGPT2Tokenizer | None,
    sleeps: Sleeps,
    clock: Clock | None = None,
    *,
    retries: int = 2,
    failures: int = 100,
    generation_timeout_s: float = 120.0,
    **options: Any,
) -> ReplyBackend:
    values: dict[str, Any] = {
        "model": "skt/kogpt2-base-v2",
        "tokenizer": tokenizer,
        "n_positions": 1024,
        "timeout_s": 5.0,
        "retry": RetryPolicy(retries=retries, base_delay_s=0.01, max_delay_s=0.05),
        "breaker": CircuitBreaker(failures, 30.0, clock or Clock()),
        "sleep": sleeps,
    }
    values.update(options)
    values["tokenizer"] = values["tokenizer"] or load_tokenizer(values["model"])
    decoder = OpenAICompletionsDecoder(url, **values)
    return ReplyBackend(decoder, timeout_s=generation_timeout_s)


def breaker_of(backend: ReplyBackend) -> CircuitBreaker:
    decoder = backend.decoder
    assert isinstance(decoder, OpenAICompletionsDecoder)
    return decoder.breaker


@pytest.fixture
async def backend(
    server: FakeOpenAI, tokenizer: KoGPT2Tokenizer, sleeps: Sleeps
) -> AsyncIterator[ReplyBackend]:
    made = remote(server.url, tokenizer, sleeps, api_key=SecretStr("sk-test-123"))
    yield made
    await made.close()


def request(
    ids: tuple[int, ...], params: SamplingParams = GREEDY, **fields: Any
) -> GenerationRequest:
    return GenerationRequest(ids, params, ("User:",), **fields)


# --- the request -----------------------------------------------------------------------------


async def test_the_prompt_goes_as_token_ids_with_params_stop_and_auth(
    backend: ReplyBackend, server: FakeOpenAI, prompt_ids: tuple[int, ...]
) -> None:
    params = SamplingParams(
        max_new_tokens=24, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.3
    )
    result = await backend.generate(request(prompt_ids, params, seed=7))
    assert result.text == "안녕하세요! 반가워요."
    sent = server.received[0]
    assert sent.path == "/v1/completions"
    assert sent.headers["Authorization"] == "Bearer sk-test-123"
    assert sent.body["prompt"] == list(prompt_ids)
    assert {k: sent.body[k] for k in ("model", "max_tokens", "stop", "seed", "n")} == {
        "model": "skt/kogpt2-base-v2",
        "max_tokens": 24,
        "stop": ["User:"],
        "seed": 7,
        "n": 1,
    }
    assert (sent.body["temperature"], sent.body["top_p"], sent.body["top_k"]) == (0.7, 0.9, 40)
    assert sent.body["repetition_penalty"] == 1.3
    assert sent.body["skip_special_tokens"] is False  # KoGPT2's emoji are "special" tokens


async def test_greedy_is_temperature_zero_without_top_k(
    backend: ReplyBackend, server: FakeOpenAI, prompt_ids: tuple[int, ...]
) -> None:
    await backend.generate(request(prompt_ids))
    body = server.received[0].body
    assert (body["temperature"], body["top_p"], "top_k" in body, "seed" in body) == (
        0.0,
        1.0,
        False,
        False,
    )


async def test_no_authorization_header_without_a_key(
    server: FakeOpenAI, tokenizer: KoGPT2Tokenizer, sleeps: Sleeps, prompt_ids: tuple[int, ...]
) -> None:
    backend = remote(server.url, tokenizer, sleeps)
    await backend.generate(request(prompt_ids))
    await backend.close()
    assert "Authorization" not in server.received[0].headers


async def test_a_closed_backend_is_unavailable(
    backend: ReplyBackend, server: FakeOpenAI, prompt_ids: tuple[int, ...]
) -> None:
    await backend.generate(request(prompt_ids))
    await backend.close()
    with pytest.raises(GenerationError) as caught:
        await backend.generate(request(prompt_ids))
    assert caught.value.kind is GenerationErrorKind.UNAVAILABLE and len(server.received) == 1


def test_completions_url_accepts_the_base_or_the_v1_url() -> None:
    expected = "http://vllm:8000/v1/completions"
    for given in ("http://vllm:8000", "http://vllm:8000/", "http://vllm:8000/v1/", expected):
        assert completions_url(given) == expected


# --- the reply -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "text", "reason"),
    [
        (Answer(" AI: 안녕하세요 😀</s>\n반가워요 AI: 다음 줄"), "안녕하세요 😀 반가워요", "stop"),
        (Answer("좋아요", "stop", "User:"), "좋아요", "stop"),
        (Answer("좋아요", "stop", None), "좋아요", "eos"),
        (Answer("좋아요 그런데", "length"), "좋아요 그런데", "length"),
    ],
)
async def test_the_reply_is_cleaned_and_its_finish_reason_kept(
    backend: ReplyBackend,
    server: FakeOpenAI,
    prompt_ids: tuple[int, ...],
    answer: Answer,
    text: str,
    reason: str,
) -> None:
    server.then(answer)
    result = await backend.generate(request(prompt_ids))
    assert (result.text, result.finish_reason, result.new_tokens) == (text, reason, 5)


async def test_a_looping_reply_is_retried_with_sampling_then_kept(
    backend: ReplyBackend, server: FakeOpenAI, prompt_ids: tuple[int, ...]
) -> None:
    server.then(Answer(LOOPING), Answer("   "), Answer("다시 말해 볼게요."))
    result = await backend.generate(request(prompt_ids))
    assert result.text == FALLBACK_REPLY and result.finish_reason is FinishReason.FALLBACK
    retry = server.received[1].body
    assert retry["temperature"] > 0 and retry["repetition_penalty"] >= 1.3 and retry["seed"] == 0
    assert (await backend.generate(request(prompt_ids))).text == "다시 말해 볼게요."


# --- retries ---------------------------------------------------------------------------------


async def test_a_timeout_is_retried_and_then_succeeds(
    server: FakeOpenAI, tokenizer: KoGPT2Tokenizer, sleeps: Sleeps, prompt_ids: tuple[int, ...]
) -> None:
    backend = remote(server.url, tokenizer, sleeps, timeout_s=0.3)
    server.then(Hang())
    result = await backend.generate(request(prompt_ids))
    await backend.close()
    assert result.text == "안녕하세요! 반가워요." and len(server.received) == 2
    assert len(sleeps.delays) == 1


async def test_5xx_are_retried_with_growing_jittered_backoff(
    backend: ReplyBackend,
    server: FakeOpenAI,
    sleeps: Sleeps,
    prompt_ids: tuple[int, ...],
) -> None:
    server.then(Status(503), Status(500))
    result = await backend.generate(request(prompt_ids))
    assert result.text == "안녕하세요! 반가워요." and len(server.received) == 3
    first, second = sleeps.delays
    assert 0.005 <= first <= 0.01 and 0.01 <= second <= 0.02


async def test_429_waits_as_long_as_retry_after_says(
    backend: ReplyBackend,
    server: FakeOpenAI,
    sleeps: Sleeps,
    prompt_ids: tuple[int, ...],
) -> None:
    server.then(Status(429, {"Retry-After": "3"}))
    await backend.generate(request(prompt_ids))
    assert sleeps.delays == [3.0]


async def test_a_retry_after_past_the_deadline_gives_up_at_once(
    server: FakeOpenAI, tokenizer: KoGPT2Tokenizer, sleeps: Sleeps, prompt_ids: tuple[int, ...]
) -> None:
    backend = remote(server.url, tokenizer, sleeps, generation_timeout_s=2.0)
    server.then(Status(429, {"Retry-After": "60"}))
    with pytest.raises(GenerationError) as caught:
        await backend.generate(request(prompt_ids))
    await backend.close()
    assert caught.value.kind is GenerationErrorKind.UNAVAILABLE
    assert (len(server.received), sleeps.delays) == (1, [])


async def test_retries_run_out_as_unavailable(
    backend: ReplyBackend, server: FakeOpenAI, prompt_ids: tuple[int, ...]
) -> None:
    server.default = Status(502)
    with pytest.raises(GenerationError) as caught:
        await backend.generate(request(prompt_ids))
    assert caught.value.kind is GenerationErrorKind.UNAVAILABLE
    assert "HTTP 502" in caught.value.detail and len(server.received) == 3


async def test_a_client_error_is_not_retried_and_the_key_never_shows(
    backend: ReplyBackend,
    server: FakeOpenAI,
    prompt_ids: tuple[int, ...],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server.then(Status(401, body="invalid api key"), Status(503), Status(503), Status(503))
    with pytest.raises(GenerationError) as unauthorized:
        await backend.generate(request(prompt_ids))
    with pytest.raises(GenerationError) as down:
        await backend.generate(request(prompt_ids))
    assert unauthorized.value.kind is GenerationErrorKind.INTERNAL
    assert "KOBOT_BACKEND_API_KEY" in unauthorized.value.detail
    assert len(server.received) == 4
    shown = caplog.text + str(unauthorized.value) + str(down.value) + repr(backend.info())
    assert "sk-test-123" not in shown


@pytest.mark.parametrize("body", ["not json", '{"choices": []}', '{"choices": [{"text": 3}]}'])
async def test_a_malformed_answer_is_an_internal_error(
    backend: ReplyBackend, server: FakeOpenAI, prompt_ids: tuple[int, ...], body: str
) -> None:
    server.then(Status(200, body=body))
    with pytest.raises(GenerationError) as caught:
        await backend.generate(request(prompt_ids))
    assert caught.value.kind is GenerationErrorKind.INTERNAL and len(server.received) == 1
    assert breaker_of(backend).state is BreakerState.CLOSED


async def test_a_dead_server_is_unavailable(
    tokenizer: KoGPT2Tokenizer, sleeps: Sleeps, prompt_ids: tuple[int, ...]
) -> None:
    gone = FakeOpenAI()
    url = await gone.start()
    await gone.stop()
    backend = remote(url, tokenizer, sleeps, retries=1)
    with pytest.raises(GenerationError) as caught:
        await backend.generate(request(prompt_ids))
    await backend.close()
    assert caught.value.kind is GenerationErrorKind.UNAVAILABLE and len(sleeps.delays) == 1


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(email.utils.formatdate(now + 12, usegmt=True), now=now) == 12.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# --- the circuit breaker ---------------------------------------------------------------------


def test_the_breaker_admits_one_trial_when_half_open(clock: Clock) -> None:
    breaker = CircuitBreaker(failures=2, cooldown_s=10.0, clock=clock)
    breaker.failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.failure()
    assert breaker.state is BreakerState.OPEN and not breaker.admit()
    clock.advance(10.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.admit() and not breaker.admit()  # one trial at a time
    breaker.abandon()  # the trial was cancelled: another may go
    assert breaker.admit()
    breaker.failure()  # the trial failed: open again, for a whole cool-down
    assert breaker.state is BreakerState.OPEN and breaker.retry_in() == 10.0
    clock.advance(10.0)
    assert breaker.admit()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.admit() and breaker.admit()


async def test_the_breaker_fails_fast_then_half_opens_and_recovers(
    server: FakeOpenAI,
    tokenizer: KoGPT2Tokenizer,
    sleeps: Sleeps,
    clock: Clock,
    prompt_ids: tuple[int, ...],
) -> None:
    backend = remote(server.url, tokenizer, sleeps, clock, retries=0, failures=2)
    server.default = Status(503)
    for _ in range(2):
        with pytest.raises(GenerationError):
            await backend.generate(request(prompt_ids))
    with pytest.raises(GenerationError) as fast:
        await backend.generate(request(prompt_ids))
    assert (
        fast.value.kind is GenerationErrorKind.UNAVAILABLE and "circuit open" in fast.value.detail
    )
    assert len(server.received) == 2  # failed fast: the server was not asked
    assert backend.stats() == {"breaker_open": 1.0}  # what /metrics shows
    clock.advance(30.0)
    with pytest.raises(GenerationError):  # the half-open trial fails: open again
        await backend.generate(request(prompt_ids))
    with pytest.raises(GenerationError, match="circuit open"):
        await backend.generate(request(prompt_ids))
    assert len(server.received) == 3
    clock.advance(30.0)
    server.default = Answer("다시 왔어요.")
    assert (await backend.generate(request(prompt_ids))).text == "다시 왔어요."
    assert breaker_of(backend).state is BreakerState.CLOSED
    await backend.close()


# --- with the dialogue manager ---------------------------------------------------------------


async def test_the_dialogue_manager_answers_politely_while_the_server_is_down(
    server: FakeOpenAI, tiny_model_dir: Path, tmp_path: Path, sleeps: Sleeps, clock: Clock
) -> None:
    settings = make_settings(tiny_model_dir, tmp_path, backend="openai", backend_url=server.url)
    backend = remote(
        server.url, None, sleeps, clock, retries=1, failures=2, model=str(tiny_model_dir)
    )
    backend_window = backend.info().n_positions
    manager = await build_dialogue_manager(settings, backend)
    try:
        first = await manager.handle(message("안녕하세요"))
        server.default = Status(503)
        down = await manager.handle(message("거기 있어요?"))
        fast = await manager.handle(message("여보세요?"))
        asked_while_down = len(server.received) - 1
        clock.advance(30.0)
        server.default = Answer("네, 돌아왔어요.")
        back = await manager.handle(message("이제 돼요?"))
        turns = await manager.storage.recent(ConversationKey("test", "c1", "u1"), 10)
    finally:
        await manager.close()
    assert backend_window == 1024  # from the model folder's config.json
    assert (first.kind, first.text) == (ReplyKind.CHAT, "안녕하세요! 반가워요.")
    assert (down.kind, down.text) == (fast.kind, fast.text) == (ReplyKind.ERROR, POLITE)
    assert asked_while_down == 2  # 1 try + 1 retry opened the breaker; then it failed fast
    assert (back.kind, back.text) == (ReplyKind.CHAT, "네, 돌아왔어요.")
    assert [t.role for t in turns] == [Role.USER, Role.AI, Role.USER, Role.AI]
    prompt = backend.tokenizer.decode(server.received[-1].body["prompt"]).replace("\n ", "\n")
    assert prompt.endswith("User: 이제 돼요?\nAI:") and "안녕하세요! 반가워요." in prompt


# --- settings and the factory ----------------------------------------------------------------


def test_the_remote_decoder_loads_no_torch() -> None:
    code = (
        "import sys, core.generation.remote, core.generation.factory; print('torch' in sys.modules)"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "False"


def test_openai_without_a_url_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KOBOT_BACKEND", "openai")
    with pytest.raises(ConfigError, match="KOBOT_BACKEND_URL: must be set"):
        load_settings()
    monkeypatch.setenv("KOBOT_BACKEND_URL", "vllm:8000")
    with pytest.raises(ConfigError, match="KOBOT_BACKEND_URL: must start with http"):
        load_settings()


async def test_the_factory_builds_the_remote_backend_without_contacting_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        tiny_model_dir,
        tmp_path,
        backend="openai",
        backend_url="http://user:pw@127.0.0.1:9/v1",
        backend_api_key="sk-abc",
        backend_model="kogpt2",
        backend_n_positions=512,
    )
    backend = await asyncio.to_thread(build_backend, settings)
    assert isinstance(backend.decoder, OpenAICompletionsDecoder)
    info = backend.info()
    assert (info.name, info.model, info.device, info.n_positions) == (
        "openai",
        "kogpt2",
        "http://127.0.0.1:9",
        512,
    )
    assert settings.masked()["KOBOT_BACKEND_URL"] == "http://user:********@127.0.0.1:9/v1"
    assert settings.masked()["KOBOT_BACKEND_API_KEY"] == "********"
    await backend.close()
