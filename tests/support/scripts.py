"""Making a local backend's model say scripted text, through the public `logits_hook` seam of
the local decoders: per token, per attempt, or per candidate row."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.generation.base import Attempt
from core.generation.engine.decoder import EngineDecoder
from core.generation.engine.sampling import LogitsHook
from core.generation.hf_decoder import HFGenerateDecoder
from core.generation.policy import ReplyBackend
from core.generation.tokenizer import KoGPT2Tokenizer


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


class RowScripts:
    """The factory's local backend whose model says scripted ids per candidate row (through
    the decoder's public `logits_hook`; no script: the model itself)."""

    def __init__(self, backend: ReplyBackend) -> None:
        self.backend = backend

    @property
    def tokenizer(self) -> KoGPT2Tokenizer:
        tokenizer = self.backend.tokenizer
        assert isinstance(tokenizer, KoGPT2Tokenizer)
        return tokenizer

    def script(self, *rows: Sequence[int]) -> None:
        script_rows(self.backend, *rows)

    def script_texts(self, *texts: str) -> None:
        """Each text's ids then `</s>` (KoGPT2 prepends ▁: the first token starts a word)."""
        eos = self.tokenizer.eos_id
        self.script(*[[*self.tokenizer.encode_text(text), eos] for text in texts])
