"""Prompt building + trimming per message at a full window, against a naive baseline.

The naive way (as in KoGPT2 demo scripts): render the whole history as text, tokenize it all,
and while it is over the window drop the oldest turn and tokenize everything again. kobot
tokenizes each line once (cached) and trims on token counts.

    python bench/trimming.py [--turns 300] [--tokenizer ../shared/kogpt2-base-v2]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared_data import shared_dir
from core.dialogue.prompt import PromptBuilder, render_prompt_text
from core.dialogue.trimming import token_budget
from core.generation.tokenizer import KoGPT2Tokenizer, load_tokenizer
from core.messages import Role, Turn
from core.settings import DEFAULT_PERSONA

SHARED = shared_dir()


def load_pairs(path: Path, limit: int) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [(row["Q"], row["A"]) for row in rows[:limit]]


def naive_prompt(tokenizer: KoGPT2Tokenizer, history: list[Turn], newest: str, budget: int) -> int:
    kept = list(history)
    while True:
        ids = tokenizer.encode_text(render_prompt_text(DEFAULT_PERSONA, kept, newest))
        if len(ids) <= budget or not kept:
            return len(ids)
        kept = kept[1:]


def run(pairs: list[tuple[str, str]], tokenizer: KoGPT2Tokenizer, history_turns: int) -> None:
    budget = token_budget(1024, 64)
    builder = PromptBuilder(tokenizer)
    history: list[Turn] = []
    kobot_ms: list[float] = []
    naive_ms: list[float] = []
    over = 0
    for index, (question, answer) in enumerate(pairs):
        # Long multi-sentence turns, so a full window holds only some of the history.
        question = f"{question} {pairs[index - 1][0]} {pairs[index - 2][1]}"
        window = history[-history_turns:]
        started = time.perf_counter()
        prompt = builder.build(DEFAULT_PERSONA, window, question, budget)
        kobot_ms.append((time.perf_counter() - started) * 1000)
        over += prompt.n_tokens > budget
        started = time.perf_counter()
        naive_prompt(tokenizer, window, question, budget)
        naive_ms.append((time.perf_counter() - started) * 1000)
        history += [Turn(Role.USER, question, "u"), Turn(Role.AI, answer * 3, "u")]
    full = [i for i in range(len(pairs)) if i >= 20]
    k = statistics.median(kobot_ms[i] for i in full)
    n = statistics.median(naive_ms[i] for i in full)
    print(f"messages: {len(pairs)}, history window: {history_turns} turns, budget {budget} tokens")
    print(f"prompts over the window: {over}")
    print(f"kobot  per message at a full window: median {k:.3f} ms, max {max(kobot_ms):.3f} ms")
    print(f"naive  per message at a full window: median {n:.3f} ms, max {max(naive_ms):.3f} ms")
    print(f"trimming speed-up vs naive re-tokenize-everything: {n / k:.1f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=300, help="messages in the conversation")
    parser.add_argument("--history-turns", type=int, default=100)
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "kogpt2-base-v2")
    parser.add_argument("--data", type=Path, default=SHARED / "chatbot-data" / "ChatbotData.csv")
    args = parser.parse_args()
    tokenizer = load_tokenizer(str(args.tokenizer))
    run(load_pairs(args.data, args.turns), tokenizer, args.history_turns)


if __name__ == "__main__":
    main()
