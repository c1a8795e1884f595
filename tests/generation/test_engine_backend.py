"""`KOBOT_BACKEND=local` on the engine: LocalBackend's behaviour (stop strings, cleaning,
retries, fallback, errors, timeouts) with requests batched and conversations' KV reused."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.generation.base import (
    FinishReason,
    GenerationError,
    GenerationErrorKind,
    GenerationRequest,
    SamplingParams,
)
from core.generation.engine.scheduler import EngineConfig
from core.generation.engine_backend import EngineBackend
from core.generation.factory import build_backend
from core.generation.local import FALLBACK_REPLY, LocalBackend
from core.settings import Settings
from tests.generation.backends import ScriptedBackend, close_now

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
SAMPLED = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12)


class ScriptedEngineBackend(ScriptedBackend, EngineBackend):
    """The engine backend whose model is made to say one scripted text per attempt."""


def request(
    prompt: tuple[int, ...], params: SamplingParams, seed: int | None = None, key: str | None = None
) -> GenerationRequest:
    return GenerationRequest(prompt, params, stop_strings=("User:",), seed=seed, cache_key=key)


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Iterator[EngineBackend]:
    made = EngineBackend(str(tiny_model_dir), device="cpu", engine=EngineConfig(kv_budget_mb=32))
    yield made
    close_now(made)


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir: Path) -> Iterator[LocalBackend]:
    made = LocalBackend(str(tiny_model_dir), device="cpu")
    yield made
    close_now(made)


@pytest.fixture(scope="module")
def scripted(tiny_model_dir: Path) -> Iterator[ScriptedEngineBackend]:
    made = ScriptedEngineBackend(str(tiny_model_dir), device="cpu")
    made.script("</s>")
    yield made
    close_now(made)


# --- building -------------------------------------------------------------------------------


async def test_the_factory_builds_it_for_local_with_the_engine_settings(
    tiny_model_dir: Path,
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        model=str(tiny_model_dir),
        device="cpu",
        engine_max_batch=3,
        engine_kv_budget_mb=20,
        engine_kv_idle_s=30,
        engine_prefill_chunk=64,
    )
    built = await asyncio.to_thread(build_backend, settings)
    try:
        assert isinstance(built, EngineBackend) and isinstance(built, LocalBackend)
        assert built.info().name == "local"
        config = built.engine.config
        assert (config.max_batch, config.kv_budget_mb, config.kv_idle_s, config.prefill_chunk) == (
            3,
            20,
            30,
            64,
        )
    finally:
        await built.close()


# --- the same replies as LocalBackend -------------------------------------------------------


async def test_greedy_reply_is_the_hugging_face_one(
    backend: EngineBackend, hf_backend: LocalBackend, prompt_ids: tuple[int, ...]
) -> None:
    ours = await backend.generate(request(prompt_ids, GREEDY))
    theirs = await hf_backend.generate(request(prompt_ids, GREEDY))
    assert ours == theirs and ours.text


async def test_seed_makes_sampling_reproducible(
    backend: EngineBackend, prompt_ids: tuple[int, ...]
) -> None:
    rng_before = torch.get_rng_state()
    results = [await backend.generate(request(prompt_ids, SAMPLED, seed=s)) for s in (7, 7, 8)]
    assert results[0] == results[1] and results[0].text != results[2].text
    assert torch.equal(torch.get_rng_state(), rng_before)


async def test_concurrent_requests_share_batches_and_keep_their_replies(
    backend: EngineBackend, hf_backend: LocalBackend, prompt_ids: tuple[int, ...]
) -> None:
    prompts = [prompt_ids[: 8 + 3 * i] for i in range(6)]
    expected = [await hf_backend.generate(request(p, GREEDY)) for p in prompts]
    before = backend.engine_stats().steps
    together = await asyncio.gather(*(backend.generate(request(p, GREEDY)) for p in prompts))
    assert list(together) == expected
    steps = backend.engine_stats().steps - before
    assert steps < sum(r.new_tokens for r in expected)  # several requests per forward pass


async def test_a_conversation_reuses_its_kv_on_the_next_turn(
    backend: EngineBackend, hf_backend: LocalBackend, prompt_ids: tuple[int, ...]
) -> None:
    first = await backend.generate(request(prompt_ids, GREEDY, key="chat-1"))
    tokenizer = backend.tokenizer
    turn2 = prompt_ids + tuple(tokenizer.encode_text(f" {first.text}\nUser: 그래요?\nAI:"))
    reused_before = backend.engine_stats().reused_tokens
    second = await backend.generate(request(turn2, GREEDY, key="chat-1"))
    assert backend.engine_stats().reused_tokens - reused_before >= len(prompt_ids)
    assert second == await hf_backend.generate(request(turn2, GREEDY))


async def test_candidates_run_as_separate_engine_requests(
    backend: EngineBackend, prompt_ids: tuple[int, ...]
) -> None:
    params = dataclasses.replace(SAMPLED, num_return_sequences=3)
    before = backend.engine_stats().finished
    result = await backend.generate(request(prompt_ids, params, seed=3))
    assert backend.engine_stats().finished - before in (3, 6)  # one or two attempts
    assert result.text and result.text not in result.alternatives


async def test_streaming_ends_with_the_generate_result(
    backend: EngineBackend, prompt_ids: tuple[int, ...]
) -> None:
    chunks = [chunk async for chunk in backend.generate_stream(request(prompt_ids, GREEDY))]
    final = chunks[-1].result
    assert final == await backend.generate(request(prompt_ids, GREEDY))
    assert all(final.text.startswith(c.text) for c in chunks[:-1])


# --- stop strings, cleaning, retries, fallback (scripted model) -----------------------------


async def test_stops_at_the_next_user_turn(
    scripted: ScriptedEngineBackend, prompt_ids: tuple[int, ...]
) -> None:
    scripted.script("AI: 안녕하세요! 반가워요. User: 뭐 해? 나는 계속 말하는 중")
    params = SamplingParams(temperature=0, max_new_tokens=60, no_repeat_ngram_size=0)
    result = await scripted.generate(request(prompt_ids, params))
    assert (result.text, result.finish_reason) == ("안녕하세요! 반가워요.", FinishReason.STOP)
    expected = len(scripted.tokenizer.encode_text("AI: 안녕하세요! 반가워요. User:"))
    assert result.new_tokens == expected


async def test_stops_at_eos_and_at_the_length(
    scripted: ScriptedEngineBackend, prompt_ids: tuple[int, ...]
) -> None:
    scripted.script("좋아요 😊</s>")
    result = await scripted.generate(request(prompt_ids, SamplingParams(temperature=0)))
    assert (result.text, result.finish_reason) == ("좋아요 😊", FinishReason.EOS)
    scripted.script("오늘 날씨가 정말 좋네요 산책 갈까요")
    result = await scripted.generate(request(prompt_ids, SamplingParams(max_new_tokens=3)))
    assert (result.new_tokens, result.finish_reason) == (3, FinishReason.LENGTH)


async def test_degenerate_reply_is_retried_then_falls_back(
    scripted: ScriptedEngineBackend, prompt_ids: tuple[int, ...]
) -> None:
    params = SamplingParams(max_new_tokens=30, no_repeat_ngram_size=0, repetition_penalty=1.0)
    scripted.script("안녕 " * 20, "다시 말해 볼게요.</s>")
    result = await scripted.generate(request(prompt_ids, params))
    assert (result.text, result.finish_reason, scripted.calls) == (
        "다시 말해 볼게요.",
        FinishReason.EOS,
        2,
    )
    scripted.script("User: 내 차례")
    result = await scripted.generate(request(prompt_ids, params))
    assert (result.text, result.finish_reason) == (FALLBACK_REPLY, FinishReason.FALLBACK)


# --- errors, timeouts, lifecycle ------------------------------------------------------------


async def test_too_long_or_bad_prompts_are_refused(backend: EngineBackend) -> None:
    for prompt in [(400,) * 1000, (), (400, 51200)]:
        with pytest.raises(GenerationError) as error:
            await backend.generate(request(prompt, SamplingParams(max_new_tokens=64)))
        assert error.value.kind is GenerationErrorKind.INTERNAL


@pytest.mark.parametrize(
    ("failure", "kind"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
        (RuntimeError("CUDA error: device-side assert triggered"), "device"),
        (ZeroDivisionError("division by zero"), "internal"),
    ],
)
async def test_error_boundary(
    backend: EngineBackend,
    prompt_ids: tuple[int, ...],
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
    kind: str,
) -> None:
    forward = backend.engine.forward
    real = forward.last_hidden

    def broken(chunks: Any, buffer: Any = None) -> torch.Tensor:
        monkeypatch.setattr(forward, "last_hidden", real)
        raise failure

    monkeypatch.setattr(forward, "last_hidden", broken)
    with pytest.raises(GenerationError) as error:
        await backend.generate(request(prompt_ids, GREEDY))
    assert type(error.value) is GenerationError and error.value.kind == kind
    assert (await backend.generate(request(prompt_ids, GREEDY))).text


async def test_timeout_stops_the_request_in_the_engine(
    tiny_model_dir: Path, prompt_ids: tuple[int, ...]
) -> None:
    slow = ScriptedEngineBackend(str(tiny_model_dir), device="cpu", generation_timeout_s=0.3)
    slow.script("끝없이 이어지는 말")
    endless = SamplingParams(temperature=0, max_new_tokens=1000, no_repeat_ngram_size=0)
    started = time.monotonic()
    with pytest.raises(GenerationError) as error:
        await slow.generate(request(prompt_ids[:10], endless))
    assert error.value.kind is GenerationErrorKind.TIMEOUT
    assert "KOBOT_GENERATION_TIMEOUT_S" in error.value.detail
    await asyncio.to_thread(_wait_until, lambda: slow.engine.running == 0)
    assert time.monotonic() - started < 0.3 + 2.0
    await slow.close()
    with pytest.raises(GenerationError) as closed:
        await slow.generate(request(prompt_ids, GREEDY))
    assert closed.value.kind is GenerationErrorKind.UNAVAILABLE


async def test_cancelling_the_caller_stops_the_engine_request(
    scripted: ScriptedEngineBackend, prompt_ids: tuple[int, ...]
) -> None:
    scripted.script("끝없이 이어지는 말")
    endless = SamplingParams(temperature=0, max_new_tokens=900, no_repeat_ngram_size=0)
    task = asyncio.create_task(scripted.generate(request(prompt_ids[:10], endless)))
    await asyncio.to_thread(_wait_until, lambda: scripted.engine.running == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(_wait_until, lambda: scripted.engine.running == 0)


async def test_the_event_loop_keeps_running(
    backend: EngineBackend, prompt_ids: tuple[int, ...]
) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    params = SamplingParams(temperature=0, max_new_tokens=80)
    await asyncio.gather(*(backend.generate(request(prompt_ids, params)) for _ in range(4)))
    task.cancel()
    assert ticks >= 5


def _wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)
