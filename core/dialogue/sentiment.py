"""Zero-shot sentiment by scoring: which label the model finds likelier after a Korean template.

For a text, the prompt is the template (its lines tokenized one by one, like chat prompts) and
the model's log-likelihood of each label word (" 긍정", " 부정") after it is read in one batched
forward pass (`GenerationBackend.score`). Reading generated text instead would depend on
sampling and on the model saying a label at all.

Calibration ("calibrate before use", Zhao et al. 2021): a model prefers some label words
whatever the text says. The same pass also scores content-free inputs ("" and "N/A"); their
mean log-likelihood per label is subtracted before comparing, which cancels that prior. The
confidence is the softmax over the two (calibrated) scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from core.generation.base import GenerationBackend
from core.text import to_single_line

TEMPLATE_LINES = (
    "다음 문장의 감정을 긍정 또는 부정으로 분류하세요.\n",
    "문장: {text}\n",
    "감정:",
)
LABELS = ("긍정", "부정")
CONTENT_FREE = ("", "N/A")
MAX_TEXT_TOKENS = 256


@dataclass(frozen=True, slots=True)
class Sentiment:
    label: str
    confidence: float
    scores: tuple[float, ...]
    """The log-likelihood of each label in `LABELS` order (before calibration)."""


def decide(scores: Sequence[float], bias: Sequence[float]) -> Sentiment:
    """The likelier label after subtracting `bias`, with its softmax probability."""
    adjusted = [score - offset for score, offset in zip(scores, bias, strict=True)]
    top = max(adjusted)
    weights = [math.exp(value - top) for value in adjusted]
    best = adjusted.index(top)
    return Sentiment(LABELS[best], weights[best] / sum(weights), tuple(scores))


class SentimentScorer:
    """Classifies texts as 긍정/부정 with a backend that can `score`."""

    def __init__(self, backend: GenerationBackend, calibrate: bool = True) -> None:
        self._backend = backend
        self.calibrate = calibrate
        encode = backend.tokenizer.encode_text
        self._head = [i for line in TEMPLATE_LINES[:1] for i in encode(line)]
        self._tail = encode(TEMPLATE_LINES[2])
        self._labels = [encode(label) for label in LABELS]

    def prompt_ids(self, text: str) -> list[int]:
        """The template around `text` (its last `MAX_TEXT_TOKENS` tokens when it is long)."""
        line = TEMPLATE_LINES[1].format(text=to_single_line(text))
        body = self._backend.tokenizer.encode_text(line)
        return [*self._head, *body[-MAX_TEXT_TOKENS:], *self._tail]

    async def log_likelihoods(
        self, texts: Sequence[str]
    ) -> tuple[list[tuple[float, ...]], tuple[float, ...]]:
        """Per text the log-likelihood of each label, and the content-free mean per label
        (zeros without calibration): every row in one forward pass."""
        inputs = [*texts, *(CONTENT_FREE if self.calibrate else ())]
        prompts = [self.prompt_ids(text) for text in inputs for _ in self._labels]
        continuations = [label for _ in inputs for label in self._labels]
        flat = await self._backend.score(prompts, continuations)
        width = len(self._labels)
        rows = [tuple(flat[i : i + width]) for i in range(0, len(flat), width)]
        free = rows[len(texts) :]
        bias = tuple(sum(column) / len(free) for column in zip(*free, strict=True)) if free else ()
        return rows[: len(texts)], bias or (0.0,) * width

    async def classify_many(self, texts: Sequence[str]) -> list[Sentiment]:
        rows, bias = await self.log_likelihoods(texts)
        return [decide(row, bias) for row in rows]

    async def classify(self, text: str) -> Sentiment:
        return (await self.classify_many([text]))[0]
