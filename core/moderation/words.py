"""The built-in word lists of the reply filter (`core.moderation.reply_filter`), written for kobot.

`BLOCKED`: Korean and English profanity and slurs. A Korean word of two or more syllables also
matches with any syllable written as its initial consonant (시발 → ㅅ발, 시ㅂ, ㅅㅂ), so jamo
spellings need no entries of their own. English words match whole words plus a common suffix
(fuck → fucking, fucker). `ALLOWED`: ordinary words that contain a blocked one (시발점, 전염병,
새끼손가락); a match that lies inside one of these is not a match.
"""

from __future__ import annotations


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


KOREAN_PROFANITY = _words(
    "씨발 시발 씨빨 시빨 씨벌 시벌 씨팔 씹할 씹새끼 씹새 십새끼 씹년 씹창 개씹 썅 쌍년 쌍놈 "
    "좆 좆같 좆밥 좆망 존나 존니 개새끼 개새기 개색기 개색끼 개섀끼 새끼 병신 븅신 빙신 병딱 "
    "등신 지랄 염병 엠창 니애미 느금마 느그애미 느그애비 애미뒤진 애미없 애비없 미친놈 미친년 "
    "미친새끼 호로새끼 후레자식 잡놈 잡년 개년 개놈 개같은 개같네 걸레년 창녀 보지년 찐따 "
    "버러지 시발럼 18놈 18년 18새끼"
)

KOREAN_SLURS = _words(
    "짱깨 짱개 쪽발이 쪽바리 깜둥이 틀딱 한남충 김치녀 된장녀 맘충 급식충 똥꼬충 메갈 일베충 "
    "흑우 개돼지"
)

ENGLISH = _words(
    "fuck fuk fck motherfucker shit bullshit bitch asshole dumbass jackass bastard dick cunt "
    "twat wanker prick retard whore slut nigger nigga faggot fag chink spic kike"
)

BLOCKED = (*KOREAN_PROFANITY, *KOREAN_SLURS, *ENGLISH)

ALLOWED = _words(
    "시발점 시발역 시발택시 시발자동차 시발유 시발음 시발표 씨발라 아저씨발 아저씨바 "
    "새끼손 새끼발 새끼줄 새끼고양이 새끼강아지 새끼곰 새끼양 새끼돼지 새끼오리 새끼를낳 "
    "새끼를데리 새끼를품 강아지새끼 고양이새끼 지랄탄 전염병 감염병 화염병 등신대 등신불 "
    "팔등신 흑우유 무시발언"
)

ENGLISH_SUFFIXES = frozenset(
    ("", *_words("s es ed er ers ing in y ty head heads face hole holes ass"))
)
"""What may follow an English word inside the same word (fucking, shitty, dickhead)."""
