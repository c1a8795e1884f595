"""Backends for the tests, built as users get them, with the model scripted through the public
`logits_hook` seam of the local decoders."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from core.generation.base import Attempt
from core.generation.engine.decoder import EngineDecoder
from core.generation.engine.sampling import LogitsHook
from core.generation.factory import build_backend
from core.generation.hf_decoder import HFGenerateDecoder
from core.generation.policy import ReplyBackend
from core.generation.tokenizer import KoGPT2Tokenizer
from core.settings import Settings


def local_settings(model_dir: Path, **overrides: Any) -> Settings:
    """KOBOT_BACKEND=local on the CPU for `model_dir` with a KV budget that suits the tiny
    model (64 MB: 64k tokens), nothing read from the environment."""
    values: dict[str, Any] = {
        "model": str(model_dir),
        "device": "cpu",
        "backend": "local",
        "engine_kv_budget_mb": 64,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def engine_backend(model_dir: Path, **overrides: Any) -> ReplyBackend:
    """What the factory ships for KOBOT_BACKEND=local: the reply policy over the engine."""
    backend = build_backend(local_settings(model_dir, **overrides))
    assert isinstance(backend.decoder, EngineDecoder)
    return backend


def force_hook(script: Sequence[int]) -> LogitsHook:
    """A hook that makes the model say `script` token by token (then repeat its last token)."""
    start: list[int] = []

    def hook(ids: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        if not start:
            start.append(len(ids))
        token = script[min(len(ids) - start[0], len(script) - 1)]
        forced = torch.full_like(scores, float("-inf"))
        forced[token] = 0.0
        return forced

    return hook


class Script:
    """An `AttemptHook`: one scripted text per attempt (the last one again for later attempts),
    the same for every candidate row; a text ending in `</s>` ends with the real EOS id.
    `attempts` lists the attempts seen."""

    def __init__(self, tokenizer: KoGPT2Tokenizer, *texts: str) -> None:
        self.tokenizer = tokenizer
        self.texts = list(texts)
        self.attempts: list[Attempt] = []

    def __call__(self, attempt: Attempt, row: int) -> LogitsHook:
        if row == 0:
            self.attempts.append(attempt)
        text = self.texts[min(len(self.attempts) - 1, len(self.texts) - 1)]
        body = text.removesuffix("</s>")
        eos = [self.tokenizer.eos_id] if body != text else []
        return force_hook(self.tokenizer.encode_text(body) + eos)


def script(backend: ReplyBackend, *texts: str) -> Script:
    """Make `backend`'s local model say `texts`, one per attempt (see `Script`)."""
    decoder = backend.decoder
    assert isinstance(decoder, EngineDecoder | HFGenerateDecoder)
    scripted = Script(decoder.tokenizer, *texts)
    decoder.logits_hook = scripted
    return scripted


def script_rows(backend: ReplyBackend, *rows: Sequence[int]) -> None:
    """Candidate row i of every attempt says `rows[i % len(rows)]` (no rows: the model)."""
    scripts = [list(row) for row in rows]
    decoder = backend.decoder
    assert isinstance(decoder, EngineDecoder | HFGenerateDecoder)
    decoder.logits_hook = (lambda _, row: force_hook(scripts[row % len(scripts)])) if rows else None


def unscript(backend: ReplyBackend) -> None:
    script_rows(backend)


def close_now(backend: ReplyBackend) -> None:
    """Close a backend from synchronous fixture code."""
    asyncio.run(backend.close())
