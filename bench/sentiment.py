"""Zero-shot sentiment by scoring (`/sentiment`) on ChatbotData, against the majority class.

Each question (`Q`) labelled 1 (breakup: 부정, negative) or 2 (love: 긍정, positive) is
classified by comparing the model's log-likelihood of " 긍정" and " 부정" after a Korean template
(`core.dialogue.sentiment`); label 0 (everyday) is left out. Texts go in batches, each batch one
forward pass. Accuracy is printed raw and calibrated (content-free prior subtracted, what the bot
uses), beside the majority-class baseline: always answering the more frequent label.

    python bench/sentiment.py --model /path/to/kogpt2-folder [--limit 1000] [--batch 32]

With random weights (`kobot new-model`) expect chance; the script is meant for real weights.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared_data import shared_dir
from core.dialogue.sentiment import LABELS, SentimentScorer, decide
from core.generation.factory import build_backend
from core.settings import Settings

LABEL_OF = {"1": "부정", "2": "긍정"}


def load_labelled(path: Path, limit: int | None, seed: int) -> list[tuple[str, str]]:
    """(text, 긍정|부정) pairs; a seeded random subset of `limit` when given."""
    with path.open(encoding="utf-8") as handle:
        rows = [
            (row["Q"], LABEL_OF[row["label"].strip()])
            for row in csv.DictReader(handle)
            if row["label"].strip() in LABEL_OF
        ]
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


async def evaluate(model: str, rows: list[tuple[str, str]], batch: int, device: str) -> None:
    settings = Settings(_env_file=None, model=model, device=device)  # type: ignore[call-arg]
    backend = await asyncio.to_thread(build_backend, settings)
    scorer = SentimentScorer(backend)
    raw_right = calibrated_right = 0
    started = time.perf_counter()
    try:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            scores, bias = await scorer.log_likelihoods([text for text, _ in chunk])
            for (_, truth), row in zip(chunk, scores, strict=True):
                raw_right += decide(row, (0.0,) * len(LABELS)).label == truth
                calibrated_right += decide(row, bias).label == truth
    finally:
        await backend.close()
    report(rows, raw_right, calibrated_right, time.perf_counter() - started, model)


def report(
    rows: list[tuple[str, str]], raw: int, calibrated: int, seconds: float, model: str
) -> None:
    counts = Counter(label for _, label in rows)
    majority, majority_count = counts.most_common(1)[0]
    n = len(rows)
    print(f"model: {model}")
    print(f"texts: {n} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    print(f"majority-class baseline ({majority}): {majority_count / n:.3f}")
    print(f"zero-shot, raw:        {raw / n:.3f}")
    print(f"zero-shot, calibrated: {calibrated / n:.3f}")
    print(f"time: {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} texts/s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (or hub id)")
    parser.add_argument("--data", type=Path, default=shared_dir() / "chatbot-data/ChatbotData.csv")
    parser.add_argument("--limit", type=int, help="a random subset of this many texts")
    parser.add_argument("--batch", type=int, default=32, help="texts per forward pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    rows = load_labelled(args.data, args.limit, args.seed)
    asyncio.run(evaluate(args.model, rows, args.batch, args.device))


if __name__ == "__main__":
    main()
