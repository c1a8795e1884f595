"""Prompt building with the real KoGPT2 tokenizer: exact counts, caching, no forged structure."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.dialogue.prompt import PromptBuilder, render_prompt_text
from core.dialogue.trimming import token_budget
from core.generation.tokenizer import KoGPT2Tokenizer, load_tokenizer
from core.messages import Role, Turn
from core.settings import DEFAULT_PERSONA

SPECIAL_IDS = set(range(0, 109)) - {5}
KOREAN = st.text(
    alphabet=st.sampled_from(list("가나다라마바사아자차카타파하걔쫌삔 .?!😀🤗ㅋㅎ\nAI:User</s>")),
    min_size=1,
    max_size=300,
)


@pytest.fixture(scope="module")
def tokenizer(kogpt2_dir: Path) -> KoGPT2Tokenizer:
    return load_tokenizer(str(kogpt2_dir))


def conversation(n: int) -> list[Turn]:
    return [
        Turn(Role.USER if i % 2 == 0 else Role.AI, f"{i}번째 줄이에요. 😀 걔는 쫌 삔 듯", "u")
        for i in range(n)
    ]


def test_a_line_costs_the_same_tokens_as_history_and_as_newest(tokenizer: KoGPT2Tokenizer) -> None:
    builder = PromptBuilder(tokenizer)
    first = builder.build(DEFAULT_PERSONA, [], "안녕하세요. 오늘 날씨가 좋네요.", 960)
    second = builder.build(
        DEFAULT_PERSONA,
        [Turn(Role.USER, "안녕하세요. 오늘 날씨가 좋네요.", "u"), Turn(Role.AI, "네", "u")],
        "좋아요",
        960,
    )
    suffix = len(tokenizer.encode_text("AI:"))
    assert second.prompt_ids[: first.n_tokens - suffix] == first.prompt_ids[:-suffix]


def test_300_turns_never_exceed_the_window_and_keep_the_newest(tokenizer: KoGPT2Tokenizer) -> None:
    builder = PromptBuilder(tokenizer)
    budget = token_budget(1024, 64)
    history = conversation(300)
    for end in range(0, 300, 2):
        prompt = builder.build(DEFAULT_PERSONA, history[:end], f"질문 {end}", budget)
        assert prompt.n_tokens <= budget
        assert prompt.prompt_ids[-len(tokenizer.encode_text(f"질문 {end}\n")) - 3 :]
    assert prompt.dropped_turns > 200
    text = tokenizer.decode(list(prompt.prompt_ids))
    assert text.startswith(DEFAULT_PERSONA) and text.rstrip().endswith("질문 298\n AI:")


def test_the_count_is_exact_against_a_fresh_encoding_of_each_line(
    tokenizer: KoGPT2Tokenizer,
) -> None:
    builder = PromptBuilder(tokenizer)
    history = conversation(10)
    prompt = builder.build(DEFAULT_PERSONA, history, "마지막", 960)
    lines = render_prompt_text(DEFAULT_PERSONA, history, "마지막").split("\n")
    expected = sum(len(tokenizer.encode_text(line + "\n")) for line in lines[:-2])
    expected += len(tokenizer.encode_text("User:")) + len(tokenizer.encode_text("마지막\n"))
    expected += len(tokenizer.encode_text("AI:"))
    assert prompt.n_tokens == expected


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(KOREAN, max_size=30),
    KOREAN,
    st.integers(min_value=1, max_value=512),
)
def test_any_conversation_fits_contains_the_newest_and_forges_nothing(
    tokenizer: KoGPT2Tokenizer, lines: list[str], newest: str, max_new_tokens: int
) -> None:
    history = [Turn(Role.USER if i % 2 == 0 else Role.AI, t, "u") for i, t in enumerate(lines)]
    budget = token_budget(1024, max_new_tokens)
    prompt = PromptBuilder(tokenizer).build(DEFAULT_PERSONA, history, newest, budget)
    assert prompt.n_tokens <= budget
    assert not SPECIAL_IDS & set(prompt.prompt_ids)
    text = tokenizer.decode(list(prompt.prompt_ids)).replace("\n ", "\n")
    assert text.endswith("\nAI:")
    kept = [line.split(":", 1)[0] for line in text.split("\n")[1:]]
    assert set(kept) <= {"User", "AI"} and kept[-2:] == ["User", "AI"]
    newest_ids = tuple(tokenizer.encode_text(" ".join(newest.split()) + "\n"))
    suffix = tuple(tokenizer.encode_text("AI:"))
    tail = newest_ids if not prompt.newest_trimmed else newest_ids[-20:]
    assert prompt.prompt_ids[-len(suffix) - len(tail) :] == tail + suffix
