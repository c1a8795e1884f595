"""The commands every adapter offers: their names (Korean aliases too) and how a text names one.

What the bot says about them (descriptions, help, replies) is in `core.dialogue.texts`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Command(StrEnum):
    START = "start"
    HELP = "help"
    RESET = "reset"
    PERSONA = "persona"
    FORGET = "forget"
    EXPORT = "export"
    STATS = "stats"
    ABOUT = "about"
    COMPLETE = "complete"
    STORY = "story"
    SENTIMENT = "sentiment"
    RETRY = "retry"
    LINK = "link"
    UNLINK = "unlink"


ALIASES: dict[str, Command] = {
    **{command.value: command for command in Command},
    "도움말": Command.HELP,
    "초기화": Command.RESET,
    "페르소나": Command.PERSONA,
    "잊어줘": Command.FORGET,
    "forgetme": Command.FORGET,
    "내보내기": Command.EXPORT,
    "통계": Command.STATS,
    "정보": Command.ABOUT,
    "이어쓰기": Command.COMPLETE,
    "이야기": Command.STORY,
    "감정": Command.SENTIMENT,
    "다시": Command.RETRY,
    "연결": Command.LINK,
    "연결해제": Command.UNLINK,
}

PERSONA_CLEAR_WORDS = frozenset({"clear", "reset", "off", "none", "초기화", "해제", "삭제"})


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    name: str
    command: Command | None
    argument: str


def parse_command(text: str) -> ParsedCommand | None:
    """`/name@bot args` → ParsedCommand; None when the text is not a command at all.

    The name ends at any whitespace, a line break included (`/help\n두 번째 줄`), as
    Telegram's `bot_command` entity does; the argument keeps its inner line breaks."""
    stripped = text.strip()
    if not stripped.startswith("/") or stripped.startswith("//") or len(stripped) == 1:
        return None
    head, *rest = stripped[1:].split(maxsplit=1)
    argument = rest[0] if rest else ""
    name = head.split("@", 1)[0].lower()
    if not name:
        return None
    return ParsedCommand(name, ALIASES.get(name), argument.strip())
