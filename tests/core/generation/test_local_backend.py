"""`KOBOT_BACKEND=local` as the factory ships it: the reply policy over the engine, on the tiny
random GPT-2 (real tokenizer). Stop strings, cleaning, retries, fallback, errors and timeouts,
with requests batched and conversations' KV reused; the model is scripted through the engine
decoder's public `logits_hook`."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch

from core.generation.base import (
    FinishReason,
    GenerationError,
    GenerationErrorKind,
    GenerationRequest,
    SamplingParams,
)
from core.generation.cpu_features import fast_bf16_cpu
from core.generation.engine.decoder import EngineDecoder
from core.generation.errors import ModelLoadError
from core.generation.factory import build_backend
from core.generation.hf_decoder import HFGenerateDecoder
from core.generation.policy import FALLBACK_REPLY, ReplyBackend
from tests.support.backends import close_now, engine_backend, local_settings
from tests.support.event_loop import ticking
from tests.support.failures import DECODER_FAILURES
from tests.support.scripts import script, unscript

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
SAMPLED = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12)
ENDLESS = SamplingParams(temperature=0, max_new_tokens=900, no_repeat_ngram_size=0)


def request(
    prompt: tuple[int, ...], params: SamplingParams, seed: int | None = None, key: str | None = None
) -> GenerationRequest:
    return GenerationRequest(prompt, params, stop_strings=("User:",), seed=seed, cache_key=key)


def engine_of(backend: ReplyBackend) -> Any:
    decoder = backend.decoder
    assert isinstance(decoder, EngineDecoder)
    return decoder.engine


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Iterator[ReplyBackend]:
    made = engine_backend(tiny_model_dir, engine_kv_budget_mb=32, dtype="fp32")  # as hf_backend
    yield made
    close_now(made)


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir: Path) -> Iterator[ReplyBackend]:
    """Hugging Face `generate` on the same model, in fp32: the reference the engine must match
    (bf16 against fp32 is `engine/test_dtype.py`'s)."""
    from core.generation.device import load_local_model

    made = ReplyBackend(HFGenerateDecoder(load_local_model(str(tiny_model_dir), "cpu", "fp32")))
    yield made
    close_now(made)


@pytest.fixture
def scripted(backend: ReplyBackend) -> Iterator[ReplyBackend]:
    yield backend
    unscript(backend)


# --- building -------------------------------------------------------------------------------


async def test_the_factory_builds_the_engine_with_its_settings(tiny_model_dir: Path) -> None:
    settings = local_settings(
        tiny_model_dir,
        engine_max_batch=3,
        engine_kv_budget_mb=20,
        engine_kv_idle_s=30,
        engine_prefill_chunk=64,
    )
    built = await asyncio.to_thread(build_backend, settings)
    try:
        info = built.info()
        assert (info.name, info.device, info.dtype, info.n_positions) == (
            "local",
            "cpu",
            "bf16" if fast_bf16_cpu() else "fp32",  # KOBOT_DTYPE=auto
            1024,
        )
        config = engine_of(built).config
        assert (config.max_batch, config.kv_budget_mb, config.kv_idle_s, config.prefill_chunk) == (
            3,
            20,
            30,
            64,
        )
        assert built.health().ok and "local" in built.health().detail
    finally:
        await built.close()
    assert not built.health().ok


async def test_a_model_the_engine_refuses_falls_back_to_generate_and_says_so(
    tiny_model_dir: Path,
    tmp_path: Path,
    prompt_ids: tuple[int, ...],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import json
    import shutil

    odd = tmp_path / "odd-gpt2"
    shutil.copytree(tiny_model_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(
        json.dumps({**config, "scale_attn_by_inverse_layer_idx": True})
    )
    built = await asyncio.to_thread(build_backend, local_settings(odd))
    try:
        assert isinstance(built.decoder, HFGenerateDecoder)
        assert "falling back to Hugging Face generate" in caplog.text
        assert (await built.generate(request(prompt_ids, GREEDY))).text
    finally:
        await built.close()


# --- the same replies as Hugging Face generate ----------------------------------------------


async def test_greedy_reply_is_the_hugging_face_one(
    backend: ReplyBackend, hf_backend: ReplyBackend, prompt_ids: tuple[int, ...]
) -> None:
    ours = await backend.generate(request(prompt_ids, GREEDY))
    theirs = await hf_backend.generate(request(prompt_ids, GREEDY))
    assert ours == theirs and ours.text
    assert ours.finish_reason is not FinishReason.FALLBACK


async def test_seed_makes_sampling_reproducible(
    backend: ReplyBackend, prompt_ids: tuple[int, ...]
) -> None:
    rng_before = torch.get_rng_state()
    results = [await backend.generate(request(prompt_ids, SAMPLED, seed=s)) for s in (7, 7, 8)]
    assert results[0] == results[1] and results[0].text != results[2].text
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone


@pytest.mark.parametrize("max_new_tokens", [1, 8])
async def test_max_new_tokens_is_respected(
    backend: ReplyBackend, prompt_ids: tuple[int, ...], max_new_tokens: int
) -> None:
    params = SamplingParams(temperature=0.9, max_new_tokens=max_new_tokens)
    result = await backend.generate(request(prompt_ids, params, seed=1))
    assert 0 < result.new_tokens <= 2 * max_new_tokens  # at most two attempts


async def test_concurrent_requests_share_batches_and_keep_their_replies(
    backend: ReplyBackend, hf_backend: ReplyBackend, prompt_ids: tuple[int, ...]
) -> None:
    prompts = [prompt_ids[: 8 + 3 * i] for i in range(6)]
    expected = [await hf_backend.generate(request(p, GREEDY)) for p in prompts]
    before = backend.stats()["engine_steps_total"]
    together = await asyncio.gather(*(backend.generate(request(p, GREEDY)) for p in prompts))
    assert list(together) == expected
    steps = backend.stats()["engine_steps_total"] - before
    assert steps < sum(r.new_tokens for r in expected)  # several requests per forward pass


async def test_a_conversation_reuses_its_kv_on_the_next_turn(
    backend: ReplyBackend, hf_backend: ReplyBackend, prompt_ids: tuple[int, ...]
) -> None:
    first = await backend.generate(request(prompt_ids, GREEDY, key="chat-1"))
    tokenizer = backend.tokenizer
    turn2 = prompt_ids + tuple(tokenizer.encode_text(f" {first.text}\nUser: 그래요?\nAI:"))
    reused_before = backend.stats()["engine_reused_tokens_total"]
    second = await backend.generate(request(turn2, GREEDY, key="chat-1"))
    assert backend.stats()["engine_reused_tokens_total"] - reused_before >= len(prompt_ids)
    assert second == await hf_backend.generate(request(turn2, GREEDY))
    assert backend.stats()["kv_cache_used_bytes"] > 0
    if shutil.which("c++"):  # decoded with the C++ kernel, in the arena: no pool was made
        assert backend.stats()["attention_kernel"] == backend.stats()["top_k_kernel"] == 1.0
        assert backend.stats()["kv_decode_pool_bytes"] == 0.0


async def test_candidates_run_as_separate_engine_requests(
    backend: ReplyBackend, prompt_ids: tuple[int, ...]
) -> None:
    params = dataclasses.replace(SAMPLED, num_return_sequences=3)
    before = backend.stats()["engine_finished_total"]
    result = await backend.generate(request(prompt_ids, params, seed=3))
    assert backend.stats()["engine_finished_total"] - before in (3, 6)  # one or two attempts
    assert result.text and result.text not in result.alternatives


async def test_streaming_ends_with_the_generate_result(
    backend: ReplyBackend, prompt_ids: tuple[int, ...]
) -> None:
    chunks = [chunk async for chunk in backend.generate_stream(request(prompt_ids, GREEDY))]
    final = chunks[-1].result
    assert final == await backend.generate(request(prompt_ids, GREEDY))
    assert len(chunks) > 1 and all(final.text.startswith(c.text) for c in chunks[:-1])


# --- stop strings, cleaning, retries, fallback (scripted model) -----------------------------


@pytest.mark.parametrize(
    ("scripted_text", "reply", "cut_after"),
    [
        ("AI: 안녕하세요! 반가워요. User: 뭐 해? 계속 말하는 중", "안녕하세요! 반가워요.", "User:"),
        ("좋아요. AI: 또 만나요 그리고 계속", "좋아요.", "AI:"),
    ],
    ids=["the next user turn", "a stray AI turn"],
)
async def test_a_turn_marker_ends_the_reply(
    scripted: ReplyBackend,
    prompt_ids: tuple[int, ...],
    scripted_text: str,
    reply: str,
    cut_after: str,
) -> None:
    script(scripted, scripted_text)
    params = SamplingParams(temperature=0, max_new_tokens=60, no_repeat_ngram_size=0)
    result = await scripted.generate(request(prompt_ids, params))
    assert (result.text, result.finish_reason) == (reply, FinishReason.STOP)
    spent = scripted_text[: scripted_text.index(cut_after) + len(cut_after)]
    assert result.new_tokens == len(scripted.tokenizer.encode_text(spent))


async def test_stops_at_eos_and_at_the_length(
    scripted: ReplyBackend, prompt_ids: tuple[int, ...]
) -> None:
    script(scripted, "좋아요 😊</s>")
    result = await scripted.generate(request(prompt_ids, SamplingParams(temperature=0)))
    assert (result.text, result.finish_reason) == ("좋아요 😊", FinishReason.EOS)
    assert result.new_tokens == len(scripted.tokenizer.encode_text("좋아요 😊")) + 1
    script(scripted, "오늘 날씨가 정말 좋네요 산책 갈까요")
    result = await scripted.generate(request(prompt_ids, SamplingParams(max_new_tokens=3)))
    assert (result.new_tokens, result.finish_reason) == (3, FinishReason.LENGTH)


async def test_degenerate_reply_is_retried_then_falls_back(
    scripted: ReplyBackend, prompt_ids: tuple[int, ...]
) -> None:
    params = SamplingParams(max_new_tokens=30, no_repeat_ngram_size=0, repetition_penalty=1.0)
    said = script(scripted, "안녕 " * 20, "다시 말해 볼게요.</s>")
    result = await scripted.generate(request(prompt_ids, params))
    assert (result.text, result.finish_reason) == ("다시 말해 볼게요.", FinishReason.EOS)
    assert [a.params.do_sample for a in said.attempts] == [True, True]
    assert said.attempts[1].params.repetition_penalty >= 1.3  # the retry's stronger penalty
    said = script(scripted, "User: 내 차례")
    result = await scripted.generate(request(prompt_ids, params))
    assert (result.text, result.finish_reason) == (FALLBACK_REPLY, FinishReason.FALLBACK)
    assert len(said.attempts) == 2


async def test_the_generate_fallback_stops_cleans_and_streams_like_the_engine(
    hf_backend: ReplyBackend, prompt_ids: tuple[int, ...]
) -> None:
    script(hf_backend, "AI: 안녕하세요! 반가워요. User: 뭐 해? 나는 계속 말하는 중")
    params = SamplingParams(temperature=0, max_new_tokens=60, no_repeat_ngram_size=0)
    try:
        chunks = [c async for c in hf_backend.generate_stream(request(prompt_ids, params))]
    finally:
        unscript(hf_backend)
    final = chunks[-1].result
    assert final is not None
    assert (final.text, final.finish_reason) == ("안녕하세요! 반가워요.", FinishReason.STOP)
    assert len(chunks) > 1 and all(final.text.startswith(c.text) for c in chunks[:-1])


# --- errors, timeouts, lifecycle ------------------------------------------------------------


async def test_too_long_or_bad_prompts_are_refused(backend: ReplyBackend) -> None:
    for prompt in [(400,) * 1000, (), (400, 51200), (-1,)]:
        with pytest.raises(GenerationError) as error:
            await backend.generate(request(prompt, SamplingParams(max_new_tokens=64)))
        assert error.value.kind is GenerationErrorKind.INTERNAL
    fits = request((400,) * (1024 - 5), SamplingParams(temperature=0, max_new_tokens=5))
    assert (await backend.generate(fits)).new_tokens <= 10


@pytest.mark.parametrize(("failure", "kind"), DECODER_FAILURES)
async def test_error_boundary(
    backend: ReplyBackend,
    prompt_ids: tuple[int, ...],
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
    kind: str,
) -> None:
    forward = engine_of(backend).forward
    real = forward.last_hidden

    def broken(chunks: Any, buffer: Any = None) -> torch.Tensor:
        monkeypatch.setattr(forward, "last_hidden", real)
        raise failure

    monkeypatch.setattr(forward, "last_hidden", broken)
    with pytest.raises(GenerationError) as error:
        await backend.generate(request(prompt_ids, GREEDY))
    assert type(error.value) is GenerationError and error.value.kind == kind
    assert (await backend.generate(request(prompt_ids, GREEDY))).text


async def test_timeout_stops_the_request_in_the_engine_then_close(
    tiny_model_dir: Path, prompt_ids: tuple[int, ...]
) -> None:
    slow = engine_backend(tiny_model_dir, generation_timeout_s=0.3)
    said = script(slow, "끝없이 이어지는 말")  # never EOS: 900 tokens would take seconds
    started = time.monotonic()
    with pytest.raises(GenerationError) as error:
        await slow.generate(request(prompt_ids[:10], ENDLESS))
    assert error.value.kind is GenerationErrorKind.TIMEOUT
    assert "KOBOT_GENERATION_TIMEOUT_S" in error.value.detail
    await asyncio.to_thread(_wait_until, lambda: engine_of(slow).running == 0)
    assert time.monotonic() - started < 0.3 + 2.0
    assert len(said.attempts) == 1  # stopped mid-attempt, no retry
    await slow.close()
    await slow.close()
    with pytest.raises(GenerationError) as closed:
        await slow.generate(request(prompt_ids, GREEDY))
    assert closed.value.kind is GenerationErrorKind.UNAVAILABLE


async def test_cancelling_the_caller_stops_the_engine_request(
    scripted: ReplyBackend, prompt_ids: tuple[int, ...]
) -> None:
    script(scripted, "끝없이 이어지는 말")
    task = asyncio.create_task(scripted.generate(request(prompt_ids[:10], ENDLESS)))
    await asyncio.to_thread(_wait_until, lambda: engine_of(scripted).running == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(_wait_until, lambda: engine_of(scripted).running == 0)


async def test_the_event_loop_keeps_running(
    backend: ReplyBackend, prompt_ids: tuple[int, ...]
) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=80)
    async with ticking(0.005) as ticks:
        await asyncio.gather(*(backend.generate(request(prompt_ids, params)) for _ in range(4)))
    assert ticks.count >= 5


def _wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# --- start-up --------------------------------------------------------------------------------


def test_offline_without_the_model_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as error:
        build_backend(local_settings(Path("kobot-tests/no-such-kogpt2")))
    message = str(error.value)
    assert "KOBOT_MODEL" in message and "local folder" in message and "unreachable" in message


def test_unreachable_hub_uses_the_cache_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import core.generation.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "hub_reachable", lambda *_: False)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="KOBOT_MODEL"):
        build_backend(local_settings(Path("kobot-tests/no-such-kogpt2")))
    assert time.monotonic() - started < 5


def test_missing_folder_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_backend(local_settings(tmp_path / "missing-model"))


def test_folder_without_weights_fails_at_start(kogpt2_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((kogpt2_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ModelLoadError, match="could not load the folder"):
        build_backend(local_settings(tmp_path))


def test_cuda_without_a_gpu_fails_at_start(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="KOBOT_DEVICE: cuda was asked for"):
        build_backend(local_settings(tiny_model_dir, device="cuda"))
