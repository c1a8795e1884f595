"""`kobot chat` in a real pseudo-terminal (pexpect): streamed replies, a quiet screen, Ctrl-C;
and the pieces (`bots.console.terminal`, `Shutdown.interrupts_to`) driven directly."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import sys
from pathlib import Path

import pexpect

from bots.console.terminal import EXIT_HINT, STOPPED_NOTE, TerminalReply, rows_taken
from core.generation.cpu_features import fast_bf16_cpu
from core.ops.lifecycle import Shutdown

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROMPT_DONE = "\x1b[?2004l"  # prompt_toolkit leaves bracketed paste mode: a line was entered
LOG_LINE = re.compile(  # a log record (kobot's text format), a traceback, a progress bar
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ |Traceback \(most recent|Loading weights|"
    r"alembic\.|Press ENTER"
)
ROOT = Path(__file__).resolve().parents[3]


def spawn_chat(model_dir: Path, workdir: Path, max_new_tokens: int) -> pexpect.spawn:
    """`kobot chat` in a 24x100 terminal, everything it shows kept for `screen`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOBOT_")}
    env.update(
        KOBOT_MODEL=str(model_dir),
        KOBOT_MAX_NEW_TOKENS=str(max_new_tokens),
        KOBOT_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TERM="xterm",
        PROMPT_TOOLKIT_NO_CPR="1",  # pexpect does not answer cursor position requests
        PYTHONPATH=str(ROOT),
    )
    child = pexpect.spawn(
        sys.executable,
        ["-m", "bots.cli", "chat"],
        env=env,
        cwd=str(workdir),
        encoding="utf-8",
        timeout=90,
        dimensions=(24, 100),
    )
    child.logfile_read = io.StringIO()
    return child


def log_lines(shown: str) -> list[str]:
    return [line for line in shown.splitlines() if LOG_LINE.search(line)]


def screen(child: pexpect.spawn) -> str:
    """Everything the chat showed, without terminal escapes (closes it)."""
    child.close()
    return ANSI.sub("", child.logfile_read.getvalue())


def test_the_reply_streams_ctrl_c_stops_it_and_two_at_the_prompt_quit(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    child = spawn_chat(tiny_model_dir, tmp_path, max_new_tokens=512)
    dtype = "bf16" if fast_bf16_cpu() else "fp32"  # KOBOT_DTYPE=auto
    child.expect_exact(f"{tiny_model_dir} · cpu · {dtype} · local")  # the status line
    child.expect_exact("console>")
    child.sendline("안녕하세요")
    child.expect_exact(PROMPT_DONE)
    child.expect(r"[^\s\x1b]")  # the first characters of the reply are on the screen ...
    child.sendintr()  # ... and 512 tokens are far from done: Ctrl-C stops the reply
    child.expect_exact(STOPPED_NOTE.strip())
    child.expect_exact("console>")
    assert child.isalive()  # the program goes on

    child.sendintr()  # at an empty prompt: how to quit
    child.expect_exact(EXIT_HINT)
    child.expect_exact("console>")
    child.sendintr()  # a second time: quit
    child.expect(pexpect.EOF)
    shown = screen(child)
    assert child.exitstatus == 0, shown
    reply = shown.split("안녕하세요", 1)[1].split(STOPPED_NOTE.strip())[0]
    assert reply.strip(" …\r\n^C")  # some of the reply was shown before it was stopped
    assert log_lines(shown) == []


def test_a_whole_reply_comes_back_to_the_prompt_and_ctrl_d_quits(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    child = spawn_chat(tiny_model_dir, tmp_path, max_new_tokens=16)
    child.expect_exact("console>")
    child.sendline("오늘 날씨 어때?")
    child.expect_exact(PROMPT_DONE)
    child.expect_exact("console>")  # the reply is done: a new prompt
    reply = ANSI.sub("", child.before).strip()
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    shown = screen(child)
    assert reply and STOPPED_NOTE.strip() not in shown
    assert child.exitstatus == 0
    assert log_lines(shown) == []


# The pieces


def test_a_growing_reply_is_appended_and_a_changed_one_redrawn_in_place() -> None:
    out = io.StringIO()
    view = TerminalReply(out, columns=lambda: 4)
    view.update("안녕")
    view.update("안녕하세요")
    assert out.getvalue() == "안녕하세요"  # only what was added, each time
    view.update("○○하세요")  # a masked word: the reply so far changed, drawn again
    assert out.getvalue().endswith("\x1b[2F\x1b[J○○하세요")  # 10 cells on 4 columns: 3 rows
    view.finish("○○하세요!")
    assert out.getvalue().endswith("○○하세요!\n")


def test_rows_count_wide_characters_and_line_breaks() -> None:
    assert rows_taken("", 80) == 1
    assert rows_taken("안녕", 4) == 1  # exactly full: the cursor is still on that row
    assert rows_taken("안녕하", 4) == 2
    assert rows_taken("ab\ncd", 80) == 2


async def test_ctrl_c_goes_to_the_reply_inside_the_block_and_stops_the_chat_after() -> None:
    exits: list[int] = []
    shutdown = Shutdown(exit_now=exits.append)
    shutdown.install()
    stopped_reply = asyncio.Event()
    try:
        with shutdown.interrupts_to(stopped_reply.set):
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(stopped_reply.wait(), 5)
        assert not shutdown.requested.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.wait_for(shutdown.requested.wait(), 5)
        assert exits == []
    finally:
        shutdown.remove()
