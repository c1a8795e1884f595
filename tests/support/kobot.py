"""Running `kobot` as an admin would (a real subprocess), and waiting for what it does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[2]
REPLY = "안녕하세요! 반가워요."
START_TIMEOUT_S = 120.0


def kobot_env(model_dir: Path, workdir: Path, **settings: str) -> dict[str, str]:
    """The environment of a `kobot` process: no developer KOBOT_* variables, the tiny model,
    SQLite in `workdir`, one CPU thread, no hub; `settings` are KOBOT_<NAME> values."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KOBOT_")}
    env |= {
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "KOBOT_MODEL": str(model_dir),
        "KOBOT_DEVICE": "cpu",
        "KOBOT_MAX_NEW_TOKENS": "8",
        "KOBOT_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'kobot.db'}",
    }
    env |= {f"KOBOT_{name.upper()}": value for name, value in settings.items()}
    return env


@dataclass
class Kobot:
    """A running `kobot` subprocess whose stderr is collected line by line as it arrives."""

    process: asyncio.subprocess.Process
    stderr_lines: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, args: list[str], env: Mapping[str, str], cwd: Path) -> Kobot:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bots.cli", *args, cwd=cwd, env=dict(env),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        kobot = cls(process)
        kobot._reader = asyncio.create_task(kobot._read_stderr())
        return kobot

    async def __aenter__(self) -> Kobot:
        return self

    async def __aexit__(self, *_: object) -> None:
        """Kills the process if it still runs (a check failed before it exited)."""
        if self.process.returncode is None:
            self.process.kill()

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.stderr_lines.append(line.decode("utf-8", "replace"))

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{line}\n".encode())
        await self.process.stdin.drain()

    async def wait_for_stderr(self, text: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.stderr:
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} on stderr:\n{self.stderr[-3000:]}")
            await asyncio.sleep(0.05)

    async def finish(self, timeout_s: float = 60.0) -> tuple[str, str, int]:
        """Close stdin, wait for the exit: stdout, stderr, return code."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            assert self.process.stdout is not None
            out = await asyncio.wait_for(self.process.stdout.read(), timeout_s)
            code = await asyncio.wait_for(self.process.wait(), timeout_s)
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, timeout_s)
        return out.decode("utf-8", "replace"), self.stderr, code


def run_kobot(
    args: list[str], env: Mapping[str, str], cwd: Path, stdin: str = "", timeout_s: float = 120
) -> tuple[str, str, int]:
    """`kobot ARGS` to the end (blocking): stdout, stderr, return code."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "bots.cli", *args], input=stdin, capture_output=True, text=True,
        cwd=cwd, env=dict(env), timeout=timeout_s, check=False,
    )  # fmt: skip
    return done.stdout, done.stderr, done.returncode


def stored_turns(database: Path) -> list[tuple[str, str]]:
    """(role, text) of every stored turn, in order, read straight from the SQLite file."""
    if not database.is_file():
        return []
    with contextlib.closing(sqlite3.connect(database)) as connection:
        return list(connection.execute("SELECT role, text FROM turns ORDER BY id"))


async def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return response.status, await response.text()


async def wait_until(check: Callable[[], Any], timeout_s: float = START_TIMEOUT_S) -> Any:
    """Poll an async `check` until it returns something true."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            result = await check()
            if result:
                return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a synchronous `condition` until it holds."""
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)
