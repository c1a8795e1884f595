"""The reply filter's matching (`core.reply_filter.ProfanityFilter`) and an admin's word file."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.moderation.reply_filter import (
    MASK_CHAR,
    build_filter,
    initial_of,
    read_word_file,
    word_pattern,
)
from core.settings import ConfigError, load_settings

FILTER = build_filter()


@pytest.mark.parametrize(
    "text",
    [
        "씨발 진짜",
        "이 개새끼야",
        "ㅅㅂ 뭐야",  # jamo only
        "ㅄ이냐",  # one jamo for ㅂㅅ
        "시ㅂ 뭐라고",  # half jamo
        "씨 발 진짜",  # spaced
        "시1발",  # a digit inside
        "씨@발",  # a symbol inside
        "개-새-끼",
        "존 나 웃겨",
        "18놈아",
        "짱깨들",  # a slur
        "what the fuck",
        "this is fucking stupid",
        "f u c k",
        "s.h.i.t",
        "sh1t happens",
        "ＦＵＣＫ",  # full-width
    ],
)
def test_offensive_lines_and_their_evasions_are_found(text: str) -> None:
    assert FILTER.is_offensive(text), text


@pytest.mark.parametrize(
    "text",
    [
        "시발점이 어디예요?",
        "수박씨발라먹기 대회",
        "수박 씨 발라 먹기",
        "다시 발견했어요",  # a match across words only counts at a word start
        "8시 발표",
        "새끼 고양이가 귀여워요",
        "새끼손가락",
        "2018년에 졸업했어요",  # 18년 only at a word start
        "전염병 예방",
        "ㅋㅋ ㄱㅅ ㅇㅋ",
        "Charles Dickens",  # English words are whole words
        "Scunthorpe",
        "a classic assessment",
        "안녕하세요 오늘 날씨가 좋네요",
    ],
)
def test_ordinary_words_are_not_flagged(text: str) -> None:
    assert not FILTER.is_offensive(text), FILTER.mask(text)


def test_masking_covers_the_word_and_what_was_inside_it_but_not_spaces() -> None:
    assert FILTER.mask("아 씨발 늦었다") == f"아 {MASK_CHAR * 2} 늦었다"
    assert FILTER.mask("씨 발 진짜") == f"{MASK_CHAR} {MASK_CHAR} 진짜"
    assert FILTER.mask("시1발") == MASK_CHAR * 3
    assert FILTER.mask("fucking hell") == MASK_CHAR * 7 + " hell"
    assert FILTER.mask("시발점에서 씨발") == f"시발점에서 {MASK_CHAR * 2}"


def test_syllables_may_be_written_as_initial_consonants() -> None:
    assert initial_of("시") == "ㅅ" and initial_of("빨") == "ㅃ"
    assert word_pattern("시발") == "(?:시|ㅅ)(?:발|ㅂ)"
    assert word_pattern("좆") == "좆"  # a single syllable: its jamo would flag too much


def test_an_admins_word_file_adds_blocked_and_allowed_words(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("# our server's words\n바보멍청이\n!병신년  # the year 1956\n\n", "utf-8")
    assert read_word_file(words) == (["바보멍청이"], ["병신년"])
    extended = build_filter(words)
    assert extended.is_offensive("이 바보멍청이야") and extended.is_offensive("ㅂㅂㅁㅊㅇ")
    assert not extended.is_offensive("병신년에 있었던 일") and extended.is_offensive("병신아")
    assert not FILTER.is_offensive("이 바보멍청이야")


def test_the_settings_name_a_mode_and_a_words_file_that_exists(tmp_path: Path) -> None:
    env = tmp_path / "kobot.env"
    env.write_text("KOBOT_REPLY_FILTER=mask\n", "utf-8")
    assert load_settings(env).reply_filter == "mask"
    assert load_settings(env).reply_filter_words is None
    env.write_text(f"KOBOT_REPLY_FILTER=loud\nKOBOT_REPLY_FILTER_WORDS={tmp_path}/none\n", "utf-8")
    with pytest.raises(ConfigError) as error:
        load_settings(env)
    assert "KOBOT_REPLY_FILTER:" in str(error.value)
    assert "KOBOT_REPLY_FILTER_WORDS: must name a readable file" in str(error.value)
