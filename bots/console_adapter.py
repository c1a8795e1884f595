"""`kobot chat`: talk to the bot in a terminal, or pipe one message per line through it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from itertools import count
from pathlib import Path
from typing import TextIO

from core.app import build_dialogue_manager
from core.dialogue import DialogueManager
from core.messages import IncomingMessage, Reply
from core.settings import Settings
from core.text import to_single_line

PLATFORM = "console"
BANNER = "kobot 콘솔 채팅입니다. /help 로 사용법을, Ctrl-D 로 종료합니다. (Ctrl-D quits.)"


class ConsoleAdapter:
    """Reads messages from a terminal or a pipe and prints one reply per message."""

    def __init__(
        self,
        manager: DialogueManager,
        user: str,
        out: TextIO = sys.stdout,
        one_line_replies: bool = True,
    ) -> None:
        self.manager = manager
        self.user = user
        self.out = out
        self.one_line_replies = one_line_replies
        self._ids = count(1)

    def message(self, text: str) -> IncomingMessage:
        return IncomingMessage(
            platform=PLATFORM,
            user_id=self.user,
            chat_id=self.user,
            text=text,
            user_name=self.user,
            is_private=True,
            is_admin=True,
        )

    async def answer(self, text: str) -> str:
        """The reply to one input line (exactly one output line when piped)."""
        reply = self._with_attachment(await self.manager.handle(self.message(text)))
        return to_single_line(reply) if self.one_line_replies else reply

    def _with_attachment(self, reply: Reply) -> str:
        if reply.attachment is None:
            return reply.text
        path = Path.cwd() / reply.attachment.filename
        path.write_bytes(reply.attachment.data)
        return f"{reply.text} → {path}"

    async def run_lines(self, lines: AsyncIterator[str]) -> None:
        async for line in lines:
            print(await self.answer(line), file=self.out, flush=True)


async def _stdin_lines() -> AsyncIterator[str]:
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        yield line.rstrip("\n")


async def _terminal_lines(user: str) -> AsyncIterator[str]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout

    session: PromptSession[str] = PromptSession()
    print(BANNER, flush=True)
    while True:
        try:
            with patch_stdout():
                yield await session.prompt_async(f"{user}> ")
        except (EOFError, KeyboardInterrupt):
            return


async def run_console(settings: Settings, user: str, interactive: bool) -> None:
    manager = await build_dialogue_manager(settings)
    try:
        adapter = ConsoleAdapter(manager, user, one_line_replies=not interactive)
        lines = _terminal_lines(user) if interactive else _stdin_lines()
        await adapter.run_lines(lines)
    finally:
        await manager.close()


def main(settings: Settings, user: str = "console") -> int:
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    asyncio.run(run_console(settings, user, interactive))
    return 0
