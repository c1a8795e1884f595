"""The reply filter (`core.moderation.reply_filter`) on a labelled sample, against a plain
word list and the Korean profanity libraries on PyPI (each run only when installed).

Two samples, both written for kobot. `reply_filter_sample.tsv` (the one the word lists were
written beside, so kobot's figures there are optimistic): offensive Korean lines
(plain, spaced, with digits or symbols inside, jamo spellings like ㅅㅂ, slurs), clean Korean
lines that contain a blocked word's letters (시발점, 수박씨발라먹기, 새끼 고양이, 다시 발견),
and English of both kinds (Dickens, Scunthorpe). Each arm flags a line or not; precision and
recall are over the offensive lines. `reply_filter_holdout.tsv` was written after the lists
were frozen and never used to tune them: the fairer figure for kobot.

    python bench/reply_filter.py [--show]       # --show: list each arm's mistakes

Arms: `kobot` (the shipped filter), `word list` (the same words as plain substrings: no
normalization, no jamo spellings, no allowed words), `korcen` (`korcen.check`, English through
its better_profanity), `nerv-filter` (`NervFilter().analyze`, any action but NORMAL).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.moderation import words as reply_words
from core.moderation.reply_filter import build_filter

DATA = Path(__file__).resolve().parent / "data"
SAMPLES = {
    "sample": DATA / "reply_filter_sample.tsv",
    "held out": DATA / "reply_filter_holdout.tsv",
}
Flagger = Callable[[str], bool]


@dataclass(frozen=True)
class Score:
    name: str
    precision: float
    recall: float
    misses: list[str]
    false_alarms: list[str]
    us_per_line: float


def load_sample(path: Path) -> list[tuple[bool, str]]:
    """(offensive, text) per line of the sample; `#` lines are comments."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            label, text = line.split("\t", 1)
            rows.append((label == "1", text))
    return rows


def word_list() -> Flagger:
    words = [w.lower() for w in reply_words.BLOCKED]
    return lambda text: any(w in text.lower() for w in words)


def kobot() -> Flagger:
    return build_filter().is_offensive


def korcen() -> Flagger | None:
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints when imported
            from korcen import korcen as library
    except ImportError:
        return None
    return lambda text: bool(library.check(text, foreign=True))


def nerv() -> Flagger | None:
    try:
        from nerv_filter import ModerationAction, NervFilter
    except ImportError:
        return None
    engine = NervFilter()
    return lambda text: engine.analyze(text).action is not ModerationAction.NORMAL


def score(name: str, flag: Flagger, rows: list[tuple[bool, str]]) -> Score:
    started = time.perf_counter()
    flagged = [(offensive, text, flag(text)) for offensive, text in rows]
    elapsed = time.perf_counter() - started
    hits = sum(1 for offensive, _, hit in flagged if offensive and hit)
    alarms = [text for offensive, text, hit in flagged if hit and not offensive]
    misses = [text for offensive, text, hit in flagged if offensive and not hit]
    return Score(
        name,
        precision=hits / max(1, hits + len(alarms)),
        recall=hits / max(1, hits + len(misses)),
        misses=misses,
        false_alarms=alarms,
        us_per_line=elapsed / len(rows) * 1e6,
    )


def report(title: str, scores: list[Score], rows: list[tuple[bool, str]], show: bool) -> None:
    offensive = sum(1 for label, _ in rows if label)
    print(f"\n{title}: {len(rows)} lines, {offensive} offensive, {len(rows) - offensive} clean")
    header = ("arm", "precision", "recall", "F1", "FP", "FN", "µs/line")
    print("{:<12} {:>9} {:>7} {:>6} {:>4} {:>4} {:>8}".format(*header))
    for s in scores:
        f1 = 2 * s.precision * s.recall / max(1e-9, s.precision + s.recall)
        print(
            f"{s.name:<12} {s.precision:>9.3f} {s.recall:>7.3f} {f1:>6.3f} "
            f"{len(s.false_alarms):>4} {len(s.misses):>4} {s.us_per_line:>8.0f}"
        )
    for s in scores if show else []:
        print(f"\n{s.name}: false alarms {s.false_alarms}\n{s.name}: misses {s.misses}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--show", action="store_true", help="list each arm's mistakes")
    args = parser.parse_args()
    arms: list[tuple[str, Flagger | None]] = [
        ("kobot", kobot()),
        ("word list", word_list()),
        ("korcen", korcen()),
        ("nerv-filter", nerv()),
    ]
    for title, path in SAMPLES.items():
        rows = load_sample(path)
        scores = [score(name, flag, rows) for name, flag in arms if flag is not None]
        report(title, scores, rows, args.show)
    skipped = [name for name, flag in arms if flag is None]
    if skipped:
        print(f"\nnot installed, skipped: {', '.join(skipped)}")


if __name__ == "__main__":
    main()
