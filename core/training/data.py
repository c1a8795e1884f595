"""Training data for `kobot train`: Q/A CSV or multi-turn JSONL → token ids with AI-only labels.

Every example is built from the very pieces the dialogue manager builds at inference
(`PromptBuilder.parts`: the persona line, the history lines, `User:` + the newest message,
`AI:`), so a fine-tuned model sees exactly the prompts it will be asked to continue. Labels are
-100 (no loss) everywhere except the AI replies: the tokens after `AI:` on each AI line,
including the line's end, and a final `</s>` so the model learns to stop after its reply.

Formats
    CSV with a header holding `Q` and `A` columns (ChatbotData's `Q,A,label`): one exchange per
    row. JSONL: one dialogue per line, `{"turns": [{"role": "user", "text": "…"}, …]}` or the
    chat format `{"messages": [{"role": "user"|"assistant", "content": "…"}, …]}`; roles `user`,
    `ai`, `assistant` or `bot`. A dialogue's trailing user turns are dropped; so are empty ones.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.dialogue.prompt import PromptBuilder
from core.generation.base import TokenCounter
from core.messages import Role, Turn
from core.text import to_single_line

IGNORE = -100
ROLE_NAMES = {"user": Role.USER, "human": Role.USER, "ai": Role.AI, "assistant": Role.AI}
ROLE_NAMES["bot"] = Role.AI
Dialogue = tuple[Turn, ...]


class DataError(ValueError):
    """The training file cannot be read; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class Example:
    """One training sequence: `input_ids`, and `labels` (-100 where no loss is taken)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_targets(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


# --- reading -----------------------------------------------------------------------------------


def read_dialogues(path: Path) -> list[Dialogue]:
    """Dialogues from a `.csv` (Q/A pairs) or `.jsonl` file; DataError when unreadable."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        dialogues = list(read_qa_csv(path))
    elif path.suffix.lower() in {".jsonl", ".json"}:
        dialogues = list(read_jsonl(path))
    else:
        raise DataError(f"{path}: expected a .csv (Q,A columns) or a .jsonl file")
    if not dialogues:
        raise DataError(f"{path}: no usable dialogues (need non-empty user and AI turns)")
    return dialogues


def read_qa_csv(path: Path) -> Iterator[Dialogue]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip(): name for name in reader.fieldnames or []}
        if "Q" not in columns or "A" not in columns:
            raise DataError(f"{path}: the header must name Q and A columns (got {columns})")
        for row in reader:
            dialogue = usable(
                (_turn(Role.USER, row[columns["Q"]]), _turn(Role.AI, row[columns["A"]]))
            )
            if dialogue:
                yield dialogue


def read_jsonl(path: Path) -> Iterator[Dialogue]:
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                dialogue = usable(_turns_of(json.loads(line)))
            except (ValueError, TypeError, KeyError) as error:
                raise DataError(f"{path}:{number}: not a dialogue ({error})") from None
            if dialogue:
                yield dialogue


def _turns_of(record: Any) -> list[Turn]:
    items = record.get("turns", record.get("messages")) if isinstance(record, dict) else record
    if not isinstance(items, list):
        raise ValueError('expected {"turns": [...]} or {"messages": [...]}')
    return [_turn(_role(item), str(item.get("text", item.get("content", "")))) for item in items]


def _role(item: dict[str, Any]) -> Role:
    name = str(item["role"]).strip().lower()
    if name not in ROLE_NAMES:
        raise ValueError(f"unknown role {name!r} (user, ai, assistant or bot)")
    return ROLE_NAMES[name]


def _turn(role: Role, text: str) -> Turn:
    return Turn(role, to_single_line(text), "")


def usable(turns: Iterable[Turn]) -> Dialogue:
    """Empty turns dropped, turns in a row by the same side joined, leading AI turns and
    everything after the last AI turn dropped; () when no exchange is left."""
    kept: list[Turn] = []
    for turn in turns:
        if not turn.text or (not kept and turn.role is Role.AI):
            continue
        if kept and kept[-1].role is turn.role:
            turn = _turn(turn.role, f"{kept.pop().text} {turn.text}")
        kept.append(turn)
    while kept and kept[-1].role is not Role.AI:
        kept.pop()
    return tuple(kept)


# --- examples ----------------------------------------------------------------------------------


class ExampleBuilder:
    """Dialogues → Examples with PromptBuilder's lines (see the module docstring)."""

    def __init__(self, tokenizer: TokenCounter, persona: str, eos_id: int, max_tokens: int) -> None:
        self._tokenizer = tokenizer
        self._prompts = PromptBuilder(tokenizer)
        self._persona = persona
        self._eos = eos_id
        self._max_tokens = max_tokens
        self._ai_prefix = tuple(tokenizer.encode_text("AI:"))

    def build(self, dialogue: Dialogue) -> Example | None:
        """The example for a dialogue, oldest exchanges dropped to fit; None if nothing fits."""
        for start in _user_turn_starts(dialogue):
            example = self._example(dialogue[start:])
            if len(example.input_ids) <= self._max_tokens:
                return example if example.n_targets else None
        return None

    def _example(self, dialogue: Dialogue) -> Example:
        """Persona + history lines + `User:` newest + `AI:` + reply, as at inference."""
        *history, newest, reply = dialogue
        parts = self._prompts.parts(self._persona, history, newest.text)
        ids: list[int] = list(parts.persona)
        labels: list[int] = [IGNORE] * len(ids)
        for line, is_user in zip(parts.turns, parts.turn_is_user, strict=True):
            ids += line
            labels += [IGNORE] * len(line) if is_user else self._reply_labels(line)
        prompt_tail = [*parts.newest_prefix, *parts.newest_body, *parts.suffix]
        target = [*self._tokenizer.encode_text(f"{reply.text}\n"), self._eos]
        ids += prompt_tail + target
        labels += [IGNORE] * len(prompt_tail) + target
        return Example(tuple(ids), tuple(labels))

    def _reply_labels(self, line: Sequence[int]) -> list[int]:
        """An AI history line: loss on what follows its `AI:` prefix (none if it does not start
        with exactly the prefix tokens the prompt ends with)."""
        n = len(self._ai_prefix)
        if tuple(line[:n]) != self._ai_prefix:
            return [IGNORE] * len(line)
        return [IGNORE] * n + list(line[n:])


def _user_turn_starts(dialogue: Dialogue) -> Iterator[int]:
    """Where a trimmed dialogue may start: at each user turn, oldest first (turns alternate)."""
    return (i for i, turn in enumerate(dialogue) if turn.role is Role.USER)


def build_examples(builder: ExampleBuilder, dialogues: Iterable[Dialogue]) -> list[Example]:
    return [example for d in dialogues if (example := builder.build(d)) is not None]


def split_held_out(
    examples: Sequence[Example], fraction: float, seed: int, max_held_out: int
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) by a seeded shuffle: at least one held out, at most `max_held_out`."""
    if len(examples) < 2:
        raise DataError("need at least 2 dialogues: one to train on, one held out")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = min(max_held_out, max(1, round(len(examples) * fraction)), len(examples) - 1)
    held = [examples[i] for i in order[:n_held]]
    train = [examples[i] for i in order[n_held:]]
    return train, held


def sample(dialogues: Sequence[Dialogue], limit: int | None, seed: int) -> list[Dialogue]:
    """A seeded random subset of `limit` dialogues (all of them when `limit` is None)."""
    if limit is None or limit >= len(dialogues):
        return list(dialogues)
    return random.Random(seed).sample(list(dialogues), limit)
