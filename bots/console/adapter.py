"""`kobot chat`: talk to the bot in a terminal (`bots.console.terminal`: streamed replies,
Ctrl-C), or pipe one message per line through it (exactly one reply line per input line)."""

from __future__ import annotations

import asyncio
import codecs
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from bots.base import Adapter, InFlight, done_or_stopped, run_adapter, until_stopped
from bots.console import terminal
from core.dialogue.manager import DialogueManager
from core.dialogue.streaming import PartialCallback
from core.messages import IncomingMessage, Reply
from core.ops.lifecycle import Shutdown
from core.settings import Settings
from core.text import to_single_line

PLATFORM = "console"


@dataclass(eq=False)
class ConsoleAdapter:
    """Reads messages from a terminal or a pipe and prints one reply per message (`lines`:
    standard input unless given)."""

    manager: DialogueManager
    user: str
    out: TextIO = sys.stdout
    one_line_replies: bool = True
    lines: AsyncIterator[str] | None = None
    in_flight: InFlight = field(default_factory=InFlight)

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

    async def answer(self, text: str, on_partial: PartialCallback | None = None) -> str:
        """The reply to one input line (exactly one output line when piped); streamed to
        `on_partial` while it is generated when given."""
        incoming = self.message(text)
        if on_partial is None:
            handled = await self.manager.handle(incoming)
        else:
            handled = await self.manager.handle_stream(incoming, on_partial)
        reply = self._with_attachment(handled)
        return to_single_line(reply) if self.one_line_replies else reply

    def _with_attachment(self, reply: Reply) -> str:
        if reply.attachment is None:
            return reply.text
        path = Path.cwd() / reply.attachment.filename
        path.write_bytes(reply.attachment.data)
        return f"{reply.text} → {path}"

    def is_connected(self) -> bool:
        """For `/healthz`: a terminal or a pipe is always there."""
        return True

    async def start(self) -> None:
        """Nothing to open: the lines are read once `run` starts."""

    async def run(self, stop: asyncio.Event) -> None:
        await self.run_lines(self.lines or _stdin_lines(), stop)

    async def drain(self, timeout_s: float) -> None:
        """A reply in flight at the stop gets `timeout_s` to finish (then it is printed), else
        it is cancelled and not stored."""
        await self.in_flight.drain(timeout_s)

    async def run_lines(self, lines: AsyncIterator[str], stop: asyncio.Event | None = None) -> None:
        """Answer each line, one after another, until the lines end or `stop` is set."""
        stop = stop or asyncio.Event()
        while (
            line := await until_stopped(anext(lines, None), stop)
        ) is not None and not stop.is_set():
            answering = self.in_flight.spawn(self._print_answer(line))
            if not await done_or_stopped(answering, stop):
                return
            answering.result()

    async def _print_answer(self, line: str) -> None:
        print(await self.answer(line), file=self.out, flush=True)


def _stdin_chunks() -> Iterator[str]:
    """Decoded pieces of standard input, read from the file descriptor itself: a daemon thread
    blocked here holds no lock of `sys.stdin`'s buffer, which interpreter shutdown would need."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        yield from iter(sys.stdin.readline, "")
        return
    decoder = codecs.getincrementaldecoder(sys.stdin.encoding or "utf-8")("replace")
    while chunk := os.read(fd, 65536):
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


def _read_stdin(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
    """In a daemon thread: a blocked read never keeps the process from exiting on SIGTERM."""
    pending = ""
    try:
        for chunk in _stdin_chunks():
            *lines, pending = (pending + chunk).split("\n")
            for line in lines:
                loop.call_soon_threadsafe(queue.put_nowait, line)
        if pending:
            loop.call_soon_threadsafe(queue.put_nowait, pending)
        loop.call_soon_threadsafe(queue.put_nowait, None)
    except RuntimeError:  # the event loop closed: the chat is over
        return


async def _stdin_lines() -> AsyncIterator[str]:
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    reader = threading.Thread(
        target=_read_stdin, args=(asyncio.get_running_loop(), queue), daemon=True
    )
    reader.start()
    while (line := await queue.get()) is not None:
        yield line


class ConsolePlatform:
    """`kobot chat`: no token to check; interactive in a terminal, else one line per line."""

    name = PLATFORM

    def __init__(self, user: str, interactive: bool) -> None:
        self.user = user
        self.interactive = interactive

    async def connect(self) -> None:
        if self.interactive:
            terminal.quiet_start()

    def adapter_for(self, manager: DialogueManager, shutdown: Shutdown) -> Adapter:
        console = ConsoleAdapter(manager, self.user, one_line_replies=not self.interactive)
        if not self.interactive:
            return console
        print(f"{terminal.BANNER}\n{terminal.status_line(manager.backend.info())}")
        return terminal.TerminalAdapter(console, terminal.prompt_lines(self.user), shutdown)

    async def disconnect(self) -> None:
        """Nothing was opened."""


def main(settings: Settings, user: str = "console") -> int:
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    asyncio.run(run_adapter(settings, ConsolePlatform(user, interactive)))
    return 0
