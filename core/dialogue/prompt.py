"""Building `persona / User: … / AI: …` prompts as token ids, one cached piece per line."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from core.dialogue.trimming import PromptParts, TrimmedPrompt, trim_prompt
from core.generation.base import TokenCounter
from core.messages import Role, Turn
from core.text import to_single_line

ROLE_PREFIX = {Role.USER: "User:", Role.AI: "AI:"}
STOP_STRINGS = ("User:", "AI:")


def render_line(role: Role, text: str) -> str:
    """One prompt line. User text is flattened, so it can never start a line of its own."""
    return f"{ROLE_PREFIX[role]} {to_single_line(text)}\n"


def render_persona(persona: str) -> str:
    flat = to_single_line(persona)
    return f"{flat}\n" if flat else ""


class PromptBuilder:
    """Turns a persona, history and the newest message into a trimmed prompt.

    Each line is tokenized on its own and cached, so a new message costs one tokenization of
    the new line; the prompt is the concatenation of the lines' ids and is counted exactly.
    """

    def __init__(self, tokenizer: TokenCounter, cache_size: int = 8192) -> None:
        self._tokenizer = tokenizer
        self._encode_line = lru_cache(maxsize=cache_size)(self._encode_uncached)
        self._prefix = tuple(tokenizer.encode_text(ROLE_PREFIX[Role.USER]))
        self._suffix = tuple(tokenizer.encode_text(ROLE_PREFIX[Role.AI]))

    def _encode_uncached(self, line: str) -> tuple[int, ...]:
        return tuple(self._tokenizer.encode_text(line))

    def parts(self, persona: str, history: Sequence[Turn], newest: str) -> PromptParts:
        turns = tuple(self._encode_line(render_line(t.role, t.text)) for t in history)
        body = self._encode_line(f"{to_single_line(newest)}\n")
        return PromptParts(
            persona=self._encode_line(render_persona(persona)),
            turns=turns,
            turn_is_user=tuple(t.role is Role.USER for t in history),
            newest_prefix=self._prefix,
            newest_body=body,
            suffix=self._suffix,
        )

    def build(
        self,
        persona: str,
        history: Sequence[Turn],
        newest: str,
        budget: int,
        low_water: int | None = None,
    ) -> TrimmedPrompt:
        return trim_prompt(self.parts(persona, history, newest), budget, low_water)


def render_prompt_text(persona: str, history: Sequence[Turn], newest: str) -> str:
    """The untrimmed prompt as text (for logs, tests and the naive baseline)."""
    lines = [render_persona(persona)]
    lines += [render_line(t.role, t.text) for t in history]
    lines.append(render_line(Role.USER, newest))
    return "".join(lines) + ROLE_PREFIX[Role.AI]
