"""`kobot chat` in a terminal: the reply streams in as it is generated, Ctrl-C stops it.

* `TerminalReply` shows one reply as it grows (the partials `DialogueManager.handle_stream`
  gives, the same ones Telegram and Discord edits show): it writes what was added, and redraws
  the reply when an earlier part changed (a masked word, a second attempt).
* `prompt_lines` reads what the user types (prompt_toolkit). Ctrl-C clears a line being typed;
  at an empty prompt it says how to quit, and a second one quits, like Ctrl-D.
* `TerminalAdapter` is the loop: a line in, a streamed reply out. Ctrl-C while a reply is being
  generated stops that reply (nothing of it is stored) and returns to the prompt; SIGTERM
  still stops the chat gracefully (`core.ops.lifecycle`).
* `status_line` names the model, device and dtype; `quiet_start` keeps log lines (at INFO) and
  the weight-loading bar off the screen, so nothing interleaves with the conversation.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TextIO

from bots.base import InFlight, done_or_stopped, until_stopped
from core.dialogue.streaming import PartialCallback
from core.generation.base import BackendInfo
from core.ops.lifecycle import Shutdown
from core.ops.logs import quiet_stderr

if TYPE_CHECKING:
    from prompt_toolkit.key_binding import KeyBindings

log = logging.getLogger(__name__)


class Answers(Protocol):
    """What the terminal loop talks to (the console adapter)."""

    async def answer(self, text: str, on_partial: PartialCallback | None = None) -> str: ...


BANNER = (
    "kobot 콘솔 채팅입니다. /help 로 사용법을, Ctrl-C 로 답을 멈추고, Ctrl-D 로 종료합니다. "
    "(Ctrl-C stops a reply, Ctrl-D quits.)"
)
EXIT_HINT = "(한 번 더 Ctrl-C 를 누르거나 Ctrl-D 로 종료해요. Ctrl-C again or Ctrl-D quits.)"
STOPPED_NOTE = " … (답을 멈췄어요. Reply stopped.)"
_CURSOR_UP_TO_LINE_START = "\x1b[{rows}F"
_CLEAR_TO_END = "\x1b[J"


def cell_width(text: str) -> int:
    """Terminal columns `text` takes (Hangul is two wide)."""
    from prompt_toolkit.utils import get_cwidth

    return sum(get_cwidth(char) for char in text)


def rows_taken(text: str, columns: int) -> int:
    """Screen rows `text` fills when written from column 0 of a terminal `columns` wide."""
    return sum(max(1, -(-cell_width(line) // columns)) for line in text.split("\n"))


def _columns() -> int:
    return max(1, shutil.get_terminal_size().columns)


class TerminalReply:
    """One reply on the screen while it grows (see the module doc)."""

    def __init__(self, out: TextIO, columns: Callable[[], int] = _columns) -> None:
        self.out = out
        self.columns = columns
        self.shown = ""

    def update(self, text: str) -> None:
        """The reply so far: append what is new, or redraw the reply when it changed before."""
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown) :])
        else:
            self._redraw(text)
        self.shown = text
        self.out.flush()

    def finish(self, text: str) -> None:
        self.update(text)
        self.out.write("\n")
        self.out.flush()

    def stopped(self) -> None:
        self.out.write(f"{STOPPED_NOTE}\n")
        self.out.flush()

    def _redraw(self, text: str) -> None:
        rows = rows_taken(self.shown, self.columns())
        home = _CURSOR_UP_TO_LINE_START.format(rows=rows - 1) if rows > 1 else "\r"
        self.out.write(f"{home}{_CLEAR_TO_END}{text}")


def status_line(info: BackendInfo) -> str:
    return f"모델 (model) {info.model} · {info.device} · {info.dtype} · {info.name}"


def quiet_start() -> None:
    """While the chat is on screen: only warnings on stderr, no weight-loading bar (a model
    download from the hub still shows its progress)."""
    quiet_stderr(logging.WARNING)
    try:
        import huggingface_hub.utils as hub
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - both come with transformers
        return
    hub_bars_off = hub.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    if not hub_bars_off:
        hub.enable_progress_bars()


async def prompt_lines(user: str) -> AsyncIterator[str]:
    """Lines typed at `user> ` until Ctrl-D, or Ctrl-C twice at an empty prompt."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout

    session: PromptSession[str] = PromptSession(key_bindings=_keys())
    warned = False
    while True:
        try:
            with patch_stdout():
                line = await session.prompt_async(f"{user}> ", set_exception_handler=False)
        except EOFError:
            return
        except KeyboardInterrupt:
            if warned:
                return
            warned = True
            print(EXIT_HINT, flush=True)
            continue
        warned = False
        yield line


def _keys() -> KeyBindings:
    """Ctrl-C clears a line being typed; at an empty prompt it interrupts (see prompt_lines)."""
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

    keys = KeyBindings()

    @keys.add("c-c")
    def _interrupt(event: KeyPressEvent) -> None:
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt())

    return keys


@dataclass(eq=False)
class TerminalAdapter:
    """`kobot chat` in a terminal: each typed line gets a streamed reply (see the module doc)."""

    console: Answers
    lines: AsyncIterator[str]
    shutdown: Shutdown
    out: TextIO = sys.stdout
    in_flight: InFlight = field(default_factory=InFlight)

    def is_connected(self) -> bool:
        return True

    async def start(self) -> None:
        """The prompt appears once `run` starts."""

    async def run(self, stop: asyncio.Event) -> None:
        """Answer each typed line until the lines end or the chat stops."""
        while (line := await until_stopped(anext(self.lines, None), stop)) is not None:
            if stop.is_set() or (line.strip() and not await self._turn(line, stop)):
                return

    async def drain(self, timeout_s: float) -> None:
        """A reply being generated at the stop gets `timeout_s` to finish, else it is cancelled."""
        await self.in_flight.drain(timeout_s)

    async def _turn(self, line: str, stop: asyncio.Event) -> bool:
        """One streamed reply; Ctrl-C stops it. False when the chat is stopping."""
        view = TerminalReply(self.out)
        answering = self.in_flight.spawn(self._show_answer(line, view))
        with self.shutdown.interrupts_to(answering.cancel):
            if not await done_or_stopped(answering, stop):
                return False
        if answering.cancelled():
            view.stopped()
        else:
            answering.result()
        return True

    async def _show_answer(self, line: str, view: TerminalReply) -> None:
        view.finish(await self.console.answer(line, view.update))
