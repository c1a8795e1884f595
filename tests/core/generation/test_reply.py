"""The pure policies of the generation layer: reply text, quality, stopping, retries, errors,
devices (each from its one home)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from core.generation.base import (
    Attempt,
    FinishReason,
    GenerationError,
    GenerationErrorKind,
    SamplingParams,
)
from core.generation.device import parse_device, resolve_device, resolve_dtype
from core.generation.errors import ModelLoadError, classify_error
from core.generation.hf_decoder import generation_config
from core.generation.policy import FALLBACK_REPLY, retry_plan
from core.generation.quality import is_degenerate, is_empty_reply, longest_loop
from core.generation.reply_text import clean_reply, compat_jamo, find_stop, split_reply
from core.generation.stopping import RunControl, StopRule, stop_rules, stopped_candidates
from core.generation.tokenizer import KoGPT2Tokenizer

# --- clean_reply -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("안녕하세요!", "안녕하세요!"),
        (" AI: 안녕하세요!", "안녕하세요!"),
        ("AI: AI : 안녕하세요!", "안녕하세요!"),
        ("안녕하세요! User: 뭐해?", "안녕하세요!"),
        ("안녕하세요!\nUser: 뭐해?\nAI: 몰라", "안녕하세요!"),
        ("좋아요. AI: 또 만나요", "좋아요."),
        ("안녕</s><pad> 반가워<unused3><|endoftext|>", "안녕 반가워"),
        ("안\x00녕\u202e하세요\n\n반가워요\t!", "안녕하세요 반가워요 !"),
        ("  여러   칸\u3000띄어쓰기  ", "여러 칸 띄어쓰기"),
        ("ᄏᄏᄏ 웃겨요", "ㅋㅋㅋ 웃겨요"),
        ("👩\u200d💻 개발자", "👩\u200d💻 개발자"),
        ("User: 내가 말할게", ""),
        ("", ""),
    ],
)
def test_clean_reply(raw: str, clean: str) -> None:
    assert clean_reply(raw) == clean


def test_split_reply_says_whether_a_stop_cut_it() -> None:
    assert split_reply("네. User: 아니") == ("네.", True)
    assert split_reply("AI: 네.") == ("네.", False)
    assert split_reply("네. 사용자: 아니", ("사용자:",)) == ("네.", True)
    assert split_reply("네. AI: 아니", ()) == ("네.", True)
    assert split_reply("AI: 네. AI: 아니", ("User:", "AI:")) == (
        "네.",
        True,
    )  # as the prompt


def test_find_stop_takes_the_first_marker() -> None:
    assert find_stop("a AI: b User: c", ("User:", "AI:")) == 2
    assert find_stop("abc", ("User:",)) == -1


def test_compat_jamo_leaves_syllables_alone() -> None:
    assert compat_jamo("하ᄒᄒ ᅲᅲ 한글") == "하ㅎㅎ ㅠㅠ 한글"
    assert compat_jamo("\u1112\u1161\u11ab") == "\u1112\u1161\u11ab"  # 한, decomposed


# --- degenerate and empty replies ------------------------------------------------------------


def test_longest_loop() -> None:
    assert longest_loop([1, 2, 1, 2, 1, 2, 3], 2) == (3, 6)
    assert longest_loop([1, 2, 3], 1) == (1, 1)
    assert longest_loop([], 4) == (1, 4)


@pytest.mark.parametrize(
    ("ids", "degenerate"),
    [
        ([], False),
        ([7] * 11, False),
        ([7] * 12, True),
        ([1, 2, 3] * 3, False),
        ([1, 2, 3] * 4, True),
        ([1, 2, 3, 4] * 3, True),
        ([1, 2, 3, 4] * 2 + [5, 6, 7, 8], False),
        ([9, 1, 2, 3, 4, 5, 6, 7] * 2 + [8], False),
        (list(range(100, 140)), False),
        ([1, 2, 1, 3, 2, 4, 3, 1, 4, 2, 3, 1, 2, 4, 1, 3], True),  # 4 distinct of 16, no loop
    ],
)
def test_is_degenerate(ids: list[int], degenerate: bool) -> None:
    assert is_degenerate(ids) is degenerate


def test_is_degenerate_on_real_text(tokenizer: KoGPT2Tokenizer) -> None:
    assert is_degenerate(tokenizer.encode_text("안녕하세요 안녕하세요 안녕하세요"))
    assert is_degenerate(tokenizer.encode_text("그래서 " * 12))
    assert not is_degenerate(tokenizer.encode_text("ㅋㅋㅋㅋ 너무 웃겨요"))
    assert not is_degenerate(tokenizer.encode_text("좋아요 좋아요 좋아요"))
    assert not is_degenerate(tokenizer.encode_text(FALLBACK_REPLY))


@pytest.mark.parametrize(
    ("text", "empty"),
    [
        ("", True),
        ("   ", True),
        ("...", True),
        ("?!", True),
        ("😊", False),
        ("네", False),
        ("1", False),
    ],
)
def test_is_empty_reply(text: str, empty: bool) -> None:
    assert is_empty_reply(text) is empty


# --- retries and HF settings -----------------------------------------------------------------


def test_greedy_request_retries_with_repeatable_sampling() -> None:
    first, second = retry_plan(SamplingParams(temperature=0.0, repetition_penalty=1.0), None)
    assert first == (SamplingParams(temperature=0.0, repetition_penalty=1.0), None)
    params, seed = second
    assert params.do_sample and params.temperature == 0.8 and seed == 0
    assert params.repetition_penalty == 1.3


def test_sampled_request_retries_with_next_seed_and_stronger_penalties() -> None:
    asked = SamplingParams(temperature=0.7, repetition_penalty=1.5, no_repeat_ngram_size=0)
    (_, _), (params, seed) = retry_plan(asked, 41)
    assert seed == 42
    assert (params.temperature, params.repetition_penalty, params.no_repeat_ngram_size) == (
        0.7,
        1.5,
        3,
    )
    assert retry_plan(asked, None)[1][1] is None


def test_generation_config() -> None:
    greedy = generation_config(SamplingParams(temperature=0.0, max_new_tokens=7), 1, 3)
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.eos_token_id) == (False, 7, 1)
    assert greedy.pad_token_id == 3 and greedy.use_cache
    sampled = generation_config(SamplingParams(temperature=0.5, top_k=10, top_p=0.9), 1, 3)
    assert (sampled.do_sample, sampled.temperature, sampled.top_k, sampled.top_p) == (
        True,
        0.5,
        10,
        0.9,
    )
    assert not generation_config(SamplingParams(do_sample=False), 1, 3).do_sample


# --- the stop rule ---------------------------------------------------------------------------


def criterion_for(tokenizer: KoGPT2Tokenizer, control: RunControl) -> StopRule:
    return StopRule(tokenizer.decode, ("User:",), control)


def run_steps(criterion: StopRule, new_ids: list[int]) -> int | None:
    """Feed the new ids one step at a time as a decoder would; the step count at the stop."""
    for step in range(1, len(new_ids) + 1):
        if criterion(new_ids[:step]):
            return step
    return None


def test_the_stop_rule_reports_every_step_to_its_listener(tokenizer: KoGPT2Tokenizer) -> None:
    heard: list[list[int]] = []
    rule = StopRule(tokenizer.decode, ("User:",), RunControl(60), heard.append)
    ids = tokenizer.encode_text("안녕 User:")
    assert run_steps(rule, ids) == len(ids)
    assert heard == [ids[:n] for n in range(1, len(ids) + 1)]


def test_stops_right_after_user_prefix(tokenizer: KoGPT2Tokenizer) -> None:
    before = tokenizer.encode_text("안녕하세요! 반가워요.")
    ids = before + tokenizer.encode_text(" User: 뭐해")
    criterion = criterion_for(tokenizer, RunControl(60))
    assert run_steps(criterion, ids) == len(before) + len(tokenizer.encode_text(" User:"))
    assert criterion.reason == "stop"


def test_stops_far_into_a_long_reply(tokenizer: KoGPT2Tokenizer) -> None:
    before = tokenizer.encode_text("오늘은 날씨가 정말 좋아서 산책을 다녀왔어요. " * 6)
    assert len(before) > 40
    ids = before + tokenizer.encode_text("\nUser:")
    assert run_steps(criterion_for(tokenizer, RunControl(60)), ids) == len(ids)


def test_leading_ai_prefix_is_not_a_stop(tokenizer: KoGPT2Tokenizer) -> None:
    ids = tokenizer.encode_text("AI: 안녕하세요 반가워요")
    assert run_steps(criterion_for(tokenizer, RunControl(60)), ids) is None
    stray = tokenizer.encode_text("AI: 안녕하세요 AI: 또")
    assert run_steps(criterion_for(tokenizer, RunControl(60)), stray) is not None


def test_no_stop_in_plain_text(tokenizer: KoGPT2Tokenizer) -> None:
    ids = tokenizer.encode_text("사용자님 안녕하세요, User 씨!")
    assert run_steps(criterion_for(tokenizer, RunControl(60)), ids) is None


def test_stops_when_the_deadline_passes_or_on_cancel(tokenizer: KoGPT2Tokenizer) -> None:
    expired = criterion_for(tokenizer, RunControl(0.0))
    assert run_steps(expired, [25906]) == 1 and expired.reason == "timeout"
    control = RunControl(60)
    cancelled = criterion_for(tokenizer, control)
    assert run_steps(cancelled, [25906]) is None
    control.cancel()
    assert run_steps(cancelled, [25906, 25906]) == 1 and cancelled.reason == "timeout"
    with pytest.raises(GenerationError) as error:
        control.check()
    assert error.value.kind is GenerationErrorKind.TIMEOUT


def test_an_attempts_rules_give_its_candidates_or_its_timeout(tokenizer: KoGPT2Tokenizer) -> None:
    """What the HF and ONNX decoders do after decoding: only the first row streams; a row that
    ended at the EOS ended there, any other by length; a rule stopped at the deadline is a
    TIMEOUT naming its setting."""
    heard: list[list[int]] = []
    control = RunControl(60)
    attempt = Attempt((1, 2), SamplingParams(), None, ("User:",), control, on_ids=heard.append)
    rules = stop_rules(tokenizer.decode, attempt, 2)
    ids = tokenizer.encode_text("안녕하세요")
    run_steps(rules[0], ids)
    run_steps(rules[1], ids)
    assert heard == [ids[:n] for n in range(1, len(ids) + 1)]
    rows = [[*ids, tokenizer.eos_id], ids]
    ended = [c.ended for c in stopped_candidates(tokenizer, rows, rules, control)]
    assert ended == [FinishReason.EOS, FinishReason.LENGTH]
    control.cancel()
    run_steps(rules[1], ids)
    with pytest.raises(GenerationError) as error:
        stopped_candidates(tokenizer, rows, rules, control)
    assert error.value.kind is GenerationErrorKind.TIMEOUT
    assert "KOBOT_GENERATION_TIMEOUT_S" in error.value.detail


# --- the error boundary ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), "out_of_memory"),
        (RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"), "out_of_memory"),
        (MemoryError(), "out_of_memory"),
        (RuntimeError("CUDA error: device-side assert triggered"), "device"),
        (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_INITIALIZED"), "device"),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"), "device"),
        (RuntimeError("Expected all tensors to be on the same device"), "device"),
        (torch.AcceleratorError("an illegal memory access was encountered"), "device"),
        (RuntimeError("shape '[1, 2]' is invalid for input of size 3"), "internal"),
        (RuntimeError("a relationship problem"), "internal"),
        (ValueError("bad value"), "internal"),
        (IndexError("index out of range in self"), "internal"),
        (KeyError("x"), "internal"),
    ],
)
def test_classify_error(error: BaseException, kind: str) -> None:
    mapped = classify_error(error)
    assert isinstance(mapped, GenerationError)
    assert mapped.kind == kind
    assert mapped.detail.startswith(type(error).__name__)


def test_classify_error_keeps_generation_errors_and_short_details() -> None:
    timeout = GenerationError(GenerationErrorKind.TIMEOUT, "slow")
    assert classify_error(timeout) is timeout
    detail = classify_error(ValueError("first line\nsecret traceback " + "x" * 1000)).detail
    assert detail == "ValueError: first line"
    assert len(classify_error(ValueError("y" * 1000)).detail) <= 300


# --- devices and dtypes ----------------------------------------------------------------------


def refused(message: str) -> Any:
    return pytest.raises(ModelLoadError, match=f"(?s)KOBOT_DEVICE.*{re.escape(message)}")


@pytest.mark.parametrize(
    ("requested", "cuda_count", "mps", "outcome"),
    [
        ("auto", 2, True, "cuda:0"),
        ("auto", 0, True, "mps"),
        ("auto", 0, False, "cpu"),
        ("cpu", 1, True, "cpu"),
        ("cuda", 1, False, "cuda:0"),
        ("cuda:1", 2, False, "cuda:1"),
        (" CUDA:0 ", 1, False, "cuda:0"),
        ("mps", 0, True, "mps"),
        ("cuda", 0, False, refused("no CUDA GPU is available")),
        ("cuda:2", 2, False, refused("cuda:2 does not exist")),
        ("mps", 0, False, refused("mps is not available")),
        ("tpu", 0, False, refused("must be auto, cpu, mps, cuda or cuda:N")),
    ],
)
def test_resolve_device(requested: str, cuda_count: int, mps: bool, outcome: Any) -> None:
    """A device name, or the error (naming KOBOT_DEVICE) that says why it cannot be used."""
    if isinstance(outcome, str):
        assert resolve_device(requested, cuda_count=cuda_count, mps_available=mps) == outcome
        return
    with outcome:
        resolve_device(requested, cuda_count=cuda_count, mps_available=mps)


@pytest.mark.parametrize(
    ("requested", "device", "dtype"),
    [
        ("auto", "cuda:0", "fp16"),
        ("auto", "mps", "fp16"),
        ("fp32", "cuda:0", "fp32"),
        ("bf16", "cpu", "bf16"),
        ("FP16", "cuda:1", "fp16"),
    ],
)
def test_resolve_dtype(requested: str, device: str, dtype: str) -> None:
    assert resolve_dtype(requested, device) == dtype


def test_parse_device_is_the_one_check_settings_and_decoders_share() -> None:
    assert (parse_device(" CUDA:3 ").kind, parse_device("cuda:3").index) == ("cuda", 3)
    assert parse_device("auto").kind == "auto"
    for bad in ("tpu", "cuda:", "cuda:x", "gpu0"):
        with pytest.raises(ValueError, match="must be auto, cpu, mps, cuda or cuda:N"):
            parse_device(bad)


def test_resolve_dtype_rejects_unknown() -> None:
    with pytest.raises(ModelLoadError, match="KOBOT_DTYPE"):
        resolve_dtype("fp8", "cpu")
