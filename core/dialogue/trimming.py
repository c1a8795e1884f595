"""Fitting a prompt into the model's window: a pure function over token ids."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PromptParts:
    """A prompt cut into token-id pieces, so trimming never re-tokenizes anything.

    `turns` are the history lines, oldest first, each starting with its role prefix. The newest
    message is `newest_prefix` (`User:`) + `newest_body`; `suffix` is the closing `AI:`.
    `turn_is_user[i]` tells whether `turns[i]` is a user line.
    """

    persona: tuple[int, ...]
    turns: tuple[tuple[int, ...], ...]
    turn_is_user: tuple[bool, ...]
    newest_prefix: tuple[int, ...]
    newest_body: tuple[int, ...]
    suffix: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TrimmedPrompt:
    prompt_ids: tuple[int, ...]
    kept_turns: int
    dropped_turns: int
    persona_trimmed: bool
    newest_trimmed: bool

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids)


def token_budget(n_positions: int, max_new_tokens: int) -> int:
    """How many prompt tokens fit so that the prompt plus the reply stays inside the window."""
    budget = n_positions - max_new_tokens
    if budget < 8:
        raise ValueError(
            f"max_new_tokens {max_new_tokens} leaves no room in a {n_positions} window"
        )
    return budget


def trim_prompt(parts: PromptParts, budget: int, low_water: int | None = None) -> TrimmedPrompt:
    """Keep the persona and the newest turns so that the prompt has at most `budget` tokens.

    Whole turns go oldest first; a history never starts with an AI line. When the newest message
    alone does not fit, its beginning is cut (its end is kept). The persona yields at most half
    of the budget. When `low_water` is given and history must be dropped, history is dropped down
    to `low_water` tokens at once, so that the next turns fit without dropping again.
    """
    persona, persona_trimmed = _fit_persona(parts.persona, budget // 2)
    fixed = len(persona) + len(parts.newest_prefix) + len(parts.suffix)
    body_room = budget - fixed
    newest_body = parts.newest_body[-body_room:] if body_room > 0 else ()
    newest_trimmed = len(newest_body) < len(parts.newest_body)
    history_room = body_room - len(newest_body)
    first = _first_kept_turn(parts, history_room, budget, low_water)
    kept = parts.turns[first:]
    ids = [*persona, *(i for turn in kept for i in turn)]
    ids += [*parts.newest_prefix, *newest_body, *parts.suffix]
    return TrimmedPrompt(tuple(ids), len(kept), first, persona_trimmed, newest_trimmed)


def _fit_persona(persona: tuple[int, ...], limit: int) -> tuple[tuple[int, ...], bool]:
    if len(persona) <= limit:
        return persona, False
    return persona[:limit], True


def _first_kept_turn(parts: PromptParts, room: int, budget: int, low_water: int | None) -> int:
    """Index of the oldest history turn that is kept."""
    total = sum(len(turn) for turn in parts.turns)
    if total <= room:
        return 0
    if low_water is not None:
        room = max(0, room - (budget - low_water))
    first = 0
    while first < len(parts.turns) and total > room:
        total -= len(parts.turns[first])
        first += 1
    while first < len(parts.turns) and not parts.turn_is_user[first]:
        first += 1
    return first
