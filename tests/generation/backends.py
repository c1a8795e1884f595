"""Backends for the tests: the real LocalBackend with a scripted model or recorded attempts."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from core.generation.base import SamplingParams
from core.generation.local import LocalBackend, RunControl


class ForceScript(LogitsProcessor):
    """Makes the model say `script` token by token (then keeps repeating its last token)."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        token = self.script[min(step, len(self.script) - 1)]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        return forced  # type: ignore[return-value]


class ScriptedBackend(LocalBackend):
    """The real backend whose model is made to say one scripted text per attempt (the last one
    again for later attempts); a text ending in `</s>` ends with the real EOS id."""

    scripts: list[str]
    calls: int

    def script(self, *texts: str) -> None:
        self.scripts = list(texts)
        self.calls = 0

    def _logits_processors(self) -> LogitsProcessorList | None:
        text = self.scripts[min(self.calls, len(self.scripts) - 1)]
        self.calls += 1
        body = text.removesuffix("</s>")
        eos = [self.tokenizer.eos_id] if body != text else []
        return LogitsProcessorList([ForceScript(self.tokenizer.encode_text(body) + eos)])


class RecordingBackend(LocalBackend):
    """The real backend, recording each attempt's raw new ids (behaviour unchanged)."""

    attempts: list[list[int]]

    def _generate_ids(
        self,
        prompt: list[int],
        params: SamplingParams,
        seed: int | None,
        stop_strings: Sequence[str],
        control: RunControl,
    ) -> list[int]:
        ids = super()._generate_ids(prompt, params, seed, stop_strings, control)
        self.attempts.append(ids)
        return ids


def close_now(backend: LocalBackend) -> None:
    """Close a backend from synchronous fixture code."""
    asyncio.run(backend.close())
