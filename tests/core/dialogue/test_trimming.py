"""The pure trimming function, on synthetic token ids (the real tokenizer is in test_prompt)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.dialogue.trimming import PromptParts, token_budget, trim_prompt

PREFIX = (10, 11)
SUFFIX = (12, 13)


def parts(turn_lengths: list[int], newest: int, persona: int = 5) -> PromptParts:
    turns = tuple(tuple([100 + i] * n) for i, n in enumerate(turn_lengths))
    return PromptParts(
        persona=tuple([7] * persona),
        turns=turns,
        turn_is_user=tuple(i % 2 == 0 for i in range(len(turns))),
        newest_prefix=PREFIX,
        newest_body=tuple(range(1000, 1000 + newest)),
        suffix=SUFFIX,
    )


def test_everything_fits_nothing_dropped() -> None:
    result = trim_prompt(parts([3, 3, 3, 3], newest=4), budget=100)
    assert result.dropped_turns == 0 and not result.newest_trimmed
    assert result.n_tokens == 5 + 12 + 2 + 4 + 2


def test_oldest_whole_turns_go_first_and_the_history_starts_with_a_user_line() -> None:
    # persona 5 + newest 2+4+2 = 13; budget 25 leaves 12 for history of 4 turns × 5 tokens.
    result = trim_prompt(parts([5, 5, 5, 5], newest=4), budget=25)
    assert result.dropped_turns == 2 and result.kept_turns == 2
    assert result.prompt_ids[5] == 102  # the third turn (a user line) is the oldest kept


def test_an_ai_line_is_never_left_at_the_start_of_the_history() -> None:
    result = trim_prompt(parts([5, 5, 5, 5], newest=4), budget=29)  # room for 3 turns
    assert result.dropped_turns == 2  # turn 1 (AI) dropped with turn 0


def test_a_newest_message_too_long_keeps_its_end() -> None:
    result = trim_prompt(parts([5, 5], newest=500), budget=100)
    assert result.n_tokens == 100 and result.newest_trimmed and result.kept_turns == 0
    assert result.prompt_ids[-3] == 1000 + 499  # last body token kept, before the suffix
    assert result.prompt_ids[-2:] == SUFFIX


def test_the_persona_yields_at_most_half_the_budget() -> None:
    result = trim_prompt(parts([], newest=80, persona=300), budget=100)
    assert result.persona_trimmed and result.n_tokens == 100
    assert result.prompt_ids[:50] == (7,) * 50


def test_low_water_drops_down_to_the_mark_at_once() -> None:
    exact = trim_prompt(parts([10] * 20, newest=4), budget=100)
    batched = trim_prompt(parts([10] * 20, newest=4), budget=100, low_water=60)
    assert exact.n_tokens <= 100 and batched.n_tokens <= 60
    assert batched.dropped_turns > exact.dropped_turns


def test_budget_refuses_a_window_with_no_room() -> None:
    assert token_budget(1024, 64) == 960
    with pytest.raises(ValueError, match="no room"):
        token_budget(64, 60)


@given(
    st.lists(st.integers(min_value=1, max_value=120), max_size=60),
    st.integers(min_value=1, max_value=3000),
    st.integers(min_value=0, max_value=900),
    st.integers(min_value=16, max_value=1024),
)
def test_the_result_always_fits_and_always_ends_with_the_newest_message(
    turns: list[int], newest: int, persona: int, budget: int
) -> None:
    prompt = parts(turns, newest=newest, persona=persona)
    result = trim_prompt(prompt, budget)
    assert result.n_tokens <= budget
    body_kept = result.prompt_ids[-2 - min(newest, 1) : -2]
    assert body_kept == (1000 + newest - 1,)  # the newest message's last token is always there
    assert result.prompt_ids[-2:] == SUFFIX
    assert result.kept_turns + result.dropped_turns == len(turns)
