"""The local backend end to end on the tiny random GPT-2 (real tokenizer, real `generate`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

import core.generation.local as local
from core.generation.base import (
    FinishReason,
    GenerationError,
    GenerationErrorKind,
    GenerationRequest,
    SamplingParams,
)
from core.generation.local import FALLBACK_REPLY, LocalBackend, RunControl
from core.generation.tokenizer import ModelLoadError
from tests.generation.backends import RecordingBackend, ScriptedBackend, close_now

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
SAMPLED = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12)


def request(
    prompt: tuple[int, ...], params: SamplingParams, seed: int | None = None
) -> GenerationRequest:
    return GenerationRequest(prompt, params, stop_strings=("User:",), seed=seed)


# --- real model output -----------------------------------------------------------------------


def test_info(recording_backend: RecordingBackend) -> None:
    info = recording_backend.info()
    assert (info.name, info.device, info.dtype, info.n_positions) == ("local", "cpu", "fp32", 1024)
    assert Path(info.model).name.startswith("tiny-kogpt2")


async def test_greedy_is_deterministic(
    recording_backend: RecordingBackend, prompt_ids: tuple[int, ...]
) -> None:
    first = await recording_backend.generate(request(prompt_ids, GREEDY))
    second = await recording_backend.generate(request(prompt_ids, GREEDY))
    assert first == second
    assert first.text and first.finish_reason is not FinishReason.FALLBACK


async def test_seed_makes_sampling_reproducible(
    recording_backend: RecordingBackend, prompt_ids: tuple[int, ...]
) -> None:
    rng_before = torch.get_rng_state()
    results = [
        await recording_backend.generate(request(prompt_ids, SAMPLED, seed=s)) for s in (7, 7, 8)
    ]
    assert results[0] == results[1]
    assert results[0].text != results[2].text
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone


@pytest.mark.parametrize("max_new_tokens", [1, 8])
async def test_max_new_tokens_is_respected(
    recording_backend: RecordingBackend, prompt_ids: tuple[int, ...], max_new_tokens: int
) -> None:
    recording_backend.attempts = []
    params = SamplingParams(temperature=0.9, max_new_tokens=max_new_tokens)
    result = await recording_backend.generate(request(prompt_ids, params, seed=1))
    assert recording_backend.attempts
    assert all(len(ids) <= max_new_tokens for ids in recording_backend.attempts)
    assert result.new_tokens == sum(map(len, recording_backend.attempts))


async def test_too_long_or_bad_prompts_are_refused(recording_backend: RecordingBackend) -> None:
    cases = [
        request((400,) * 1000, SamplingParams(max_new_tokens=64)),
        request((), GREEDY),
        request((400, 51200), GREEDY),
        request((-1,), GREEDY),
    ]
    for case in cases:
        with pytest.raises(GenerationError) as error:
            await recording_backend.generate(case)
        assert error.value.kind is GenerationErrorKind.INTERNAL
    fits = request((400,) * (1024 - 5), SamplingParams(temperature=0, max_new_tokens=5))
    assert (await recording_backend.generate(fits)).new_tokens <= 10


# --- scripted model output (real generate loop and stopping criterion) ----------------------


async def test_stops_at_the_next_user_turn(
    scripted_backend: ScriptedBackend, prompt_ids: tuple[int, ...]
) -> None:
    scripted_backend.script("AI: 안녕하세요! 반가워요. User: 뭐 해? 나는 계속 말하는 중")
    params = SamplingParams(temperature=0, max_new_tokens=60, no_repeat_ngram_size=0)
    result = await scripted_backend.generate(request(prompt_ids, params))
    assert result.text == "안녕하세요! 반가워요."
    assert result.finish_reason is FinishReason.STOP
    tokenizer = scripted_backend.tokenizer
    assert result.new_tokens == len(tokenizer.encode_text("AI: 안녕하세요! 반가워요. User:"))


async def test_stops_at_eos(scripted_backend: ScriptedBackend, prompt_ids: tuple[int, ...]) -> None:
    scripted_backend.script("좋아요 😊</s>")
    result = await scripted_backend.generate(request(prompt_ids, SamplingParams(temperature=0)))
    assert (result.text, result.finish_reason) == ("좋아요 😊", FinishReason.EOS)
    assert result.new_tokens == len(scripted_backend.tokenizer.encode_text("좋아요 😊")) + 1


async def test_length_finish(
    scripted_backend: ScriptedBackend, prompt_ids: tuple[int, ...]
) -> None:
    scripted_backend.script("오늘 날씨가 정말 좋네요 산책 갈까요")
    result = await scripted_backend.generate(request(prompt_ids, SamplingParams(max_new_tokens=3)))
    assert (result.new_tokens, result.finish_reason) == (3, FinishReason.LENGTH)


async def test_degenerate_reply_is_retried_once(
    scripted_backend: ScriptedBackend, prompt_ids: tuple[int, ...]
) -> None:
    scripted_backend.script("안녕 " * 20, "다시 말해 볼게요.</s>")
    params = SamplingParams(max_new_tokens=30, no_repeat_ngram_size=0, repetition_penalty=1.0)
    result = await scripted_backend.generate(request(prompt_ids, params))
    assert (result.text, result.finish_reason) == ("다시 말해 볼게요.", FinishReason.EOS)
    assert scripted_backend.calls == 2


@pytest.mark.parametrize("script", ["안녕 " * 20, "... ... ...</s>", "</s>", "User: 내 차례"])
async def test_fallback_after_two_bad_replies(
    scripted_backend: ScriptedBackend, prompt_ids: tuple[int, ...], script: str
) -> None:
    scripted_backend.script(script)
    params = SamplingParams(max_new_tokens=30, no_repeat_ngram_size=0, repetition_penalty=1.0)
    result = await scripted_backend.generate(request(prompt_ids, params))
    assert (result.text, result.finish_reason) == (FALLBACK_REPLY, FinishReason.FALLBACK)
    assert scripted_backend.calls == 2


# --- threading, timeouts, errors, lifecycle --------------------------------------------------


class SeamBackend(LocalBackend):
    """`_generate_ids` replaced by `behaviour` (sleep, raise, wait for cancel…)."""

    behaviour: str = "sleep"
    finished_at: float = 0.0

    def _generate_ids(
        self,
        prompt: list[int],
        params: SamplingParams,
        seed: int | None,
        stop_strings: Sequence[str],
        control: RunControl,
    ) -> list[int]:
        try:
            return self._behave(control)
        finally:
            self.finished_at = time.monotonic()

    def _behave(self, control: RunControl) -> list[int]:
        if self.behaviour == "sleep":
            time.sleep(0.3)
        elif self.behaviour == "until-cancelled":
            while not control.expired():
                time.sleep(0.005)
        elif self.behaviour == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        elif self.behaviour == "device":
            raise RuntimeError("CUDA error: device-side assert triggered")
        elif self.behaviour == "bug":
            raise ZeroDivisionError("division by zero")
        return self.tokenizer.encode_text("네, 좋아요.")


@pytest.fixture(scope="module")
def seam_backend(tiny_model_dir: Path) -> Iterator[SeamBackend]:
    backend = SeamBackend(str(tiny_model_dir), device="cpu", generation_timeout_s=5.0)
    yield backend
    close_now(backend)


async def test_event_loop_keeps_running_during_generation(
    seam_backend: SeamBackend, prompt_ids: tuple[int, ...]
) -> None:
    seam_backend.behaviour = "sleep"
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    result = await seam_backend.generate(request(prompt_ids, GREEDY))
    task.cancel()
    assert result.text == "네, 좋아요."
    assert ticks >= 5  # 0.3 s of generation, a tick every 10 ms (a blocked loop: 0 or 1)


async def test_generations_run_one_at_a_time_off_the_loop(
    seam_backend: SeamBackend, prompt_ids: tuple[int, ...]
) -> None:
    seam_backend.behaviour = "sleep"
    started = time.monotonic()
    results = await asyncio.gather(
        *(seam_backend.generate(request(prompt_ids, GREEDY)) for _ in range(2))
    )
    assert [r.text for r in results] == ["네, 좋아요."] * 2
    assert time.monotonic() - started >= 0.55  # a single worker thread


@pytest.mark.parametrize(
    ("behaviour", "kind"),
    [("oom", "out_of_memory"), ("device", "device"), ("bug", "internal")],
)
async def test_error_boundary(
    seam_backend: SeamBackend,
    prompt_ids: tuple[int, ...],
    monkeypatch: pytest.MonkeyPatch,
    behaviour: str,
    kind: str,
) -> None:
    freed: list[bool] = []
    monkeypatch.setattr(local, "free_cuda_cache", lambda: freed.append(True))
    seam_backend.behaviour = behaviour
    with pytest.raises(GenerationError) as error:
        await seam_backend.generate(request(prompt_ids, GREEDY))
    assert type(error.value) is GenerationError and error.value.kind == kind
    assert freed == ([True] if kind == "out_of_memory" else [])
    seam_backend.behaviour = "ok"
    assert (await seam_backend.generate(request(prompt_ids, GREEDY))).text == "네, 좋아요."


async def test_cancelling_the_caller_stops_the_worker(
    seam_backend: SeamBackend, prompt_ids: tuple[int, ...]
) -> None:
    seam_backend.behaviour = "until-cancelled"
    task = asyncio.create_task(seam_backend.generate(request(prompt_ids, GREEDY)))
    await asyncio.sleep(0.1)
    task.cancel()
    cancelled_at = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    seam_backend.behaviour = "ok"
    assert (await seam_backend.generate(request(prompt_ids, GREEDY))).text == "네, 좋아요."
    assert seam_backend.finished_at - cancelled_at < 1.0


class TimedBackend(ScriptedBackend):
    finished_at: float = 0.0
    attempts_done: int = 0

    def _generate_ids(self, *args: object, **kwargs: object) -> list[int]:
        try:
            ids = super()._generate_ids(*args, **kwargs)  # type: ignore[arg-type]
            self.attempts_done += 1
            return ids
        finally:
            self.finished_at = time.monotonic()


async def test_timeout_stops_the_running_generation_then_close(
    tiny_model_dir: Path, prompt_ids: tuple[int, ...]
) -> None:
    backend = TimedBackend(str(tiny_model_dir), device="cpu", generation_timeout_s=0.2)
    backend.script("끝없이 이어지는 말")  # never EOS: 1000 tokens would take seconds
    long = SamplingParams(temperature=0, max_new_tokens=1000, no_repeat_ngram_size=0)
    started = time.monotonic()
    with pytest.raises(GenerationError) as error:
        await backend.generate(request(prompt_ids[:10], long))
    assert error.value.kind is GenerationErrorKind.TIMEOUT
    assert "KOBOT_GENERATION_TIMEOUT_S" in error.value.detail
    await backend.close()  # waits for the worker thread
    assert backend.finished_at - started < 0.2 + 1.0
    assert backend.attempts_done == 0  # stopped mid-attempt, no retry
    await backend.close()
    assert backend.info().name == "local"
    with pytest.raises(GenerationError) as closed:
        await backend.generate(request(prompt_ids, GREEDY))
    assert closed.value.kind is GenerationErrorKind.UNAVAILABLE


# --- start-up --------------------------------------------------------------------------------


def test_offline_without_the_model_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as error:
        LocalBackend("kobot-tests/no-such-kogpt2", device="cpu")
    message = str(error.value)
    assert "KOBOT_MODEL" in message and "local folder" in message and "unreachable" in message


def test_unreachable_hub_uses_the_cache_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import core.generation.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "hub_reachable", lambda *_: False)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="KOBOT_MODEL"):
        LocalBackend("kobot-tests/no-such-kogpt2", device="cpu")
    assert time.monotonic() - started < 5


def test_missing_folder_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        LocalBackend(str(tmp_path / "missing-model"), device="cpu")


def test_folder_without_weights_fails_at_start(kogpt2_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((kogpt2_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ModelLoadError, match="could not load the folder"):
        LocalBackend(str(tmp_path), device="cpu")


def test_cuda_without_a_gpu_fails_at_start(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="KOBOT_DEVICE: cuda was asked for"):
        LocalBackend(str(tiny_model_dir), device="cuda")
