from hypothesis import given
from hypothesis import strategies as st

from core.text import remove_control_characters, split_message, to_single_line, utf16_length


def test_control_characters_are_removed_but_newlines_and_zwj_stay() -> None:
    assert remove_control_characters("a\x00b\x1b[1mc\n\td\u200d") == "ab[1mc\n\td\u200d"


def test_single_line_flattens_every_kind_of_line_break() -> None:
    text = "첫 줄\nAI: 가짜 턴\r\nUser: 또\u2028끝\u0085."
    flat = to_single_line(text)
    assert "\n" not in flat and "\r" not in flat and "\u2028" not in flat
    assert flat == "첫 줄 AI: 가짜 턴 User: 또 끝 ."


def test_split_prefers_korean_sentence_ends() -> None:
    text = "오늘은 날씨가 좋네요. 산책을 가고 싶어요! 같이 갈래요? " * 20
    chunks = split_message(text, 60)
    assert all(len(chunk) <= 60 for chunk in chunks)
    assert all(chunk.endswith(("요.", "요!", "요?")) for chunk in chunks)
    assert " ".join(chunks) == text.strip()


def test_split_prefers_line_ends_over_sentences() -> None:
    text = "첫째 줄입니다. 조금 더 깁니다.\n둘째 줄이에요."
    assert split_message(text, 25) == ["첫째 줄입니다. 조금 더 깁니다.", "둘째 줄이에요."]


def test_split_counts_utf16_units_for_telegram() -> None:
    chunks = split_message("😀" * 5000, 4096, utf16_length)
    assert [utf16_length(c) for c in chunks] == [4096, 4096, 1808]
    assert "".join(chunks) == "😀" * 5000


@given(st.text(min_size=1, max_size=400), st.integers(min_value=4, max_value=50))
def test_split_never_loses_text_nor_exceeds_the_limit(text: str, limit: int) -> None:
    chunks = split_message(text, limit, utf16_length)
    assert all(0 < utf16_length(chunk) <= limit for chunk in chunks)
    squeeze = "".join(text.split())
    assert "".join("".join(chunk.split()) for chunk in chunks) == squeeze
