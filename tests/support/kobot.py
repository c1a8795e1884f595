"""Running `kobot` as an admin would (a real subprocess), a gated generation server, and a strict
reader of the Prometheus text format."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.openai import Answer, completion_json

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


class GatedOpenAI:
    """An OpenAI-compatible `/v1/completions` whose answers wait until the test opens the gate."""

    def __init__(self, text: str = REPLY) -> None:
        self.text = text
        self.arrived = asyncio.Event()
        self.gate = asyncio.Event()
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/completions", self._complete)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/v1"
        return self.url

    async def stop(self) -> None:
        self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _complete(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        self.headers.append(dict(request.headers))
        self.arrived.set()
        await self.gate.wait()
        return web.json_response(completion_json(Answer(self.text)))


# --- the Prometheus text format ---------------------------------------------------------------

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})?'
    r" (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|NaN|Inf|\+Inf|-Inf))$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_exposition(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample and every metric's type; AssertionError on anything out of format."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    samples: Samples = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert name not in types, f"{name} typed twice"
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name = match["name"]
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or family in types, f"{name} has no # TYPE line before it"
        labels = frozenset(_LABEL.findall(match["labels"] or ""))
        assert (name, labels) not in samples, f"duplicate sample {line!r}"
        samples[(name, labels)] = float(match["value"])
    return samples, types


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def check_histograms(samples: Samples, types: dict[str, str]) -> None:
    """Buckets are cumulative and end with +Inf equal to _count."""
    for name, kind in types.items():
        if kind != "histogram":
            continue
        series: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
        for (sample_name, labels), value in samples.items():
            if sample_name == f"{name}_bucket":
                rest = frozenset(kv for kv in labels if kv[0] != "le")
                le = float(dict(labels)["le"].replace("+Inf", "inf"))
                series.setdefault(rest, []).append((le, value))
        for rest, buckets in series.items():
            counts = [count for _, count in sorted(buckets)]
            assert counts == sorted(counts), f"{name} buckets are not cumulative"
            assert sorted(buckets)[-1][0] == float("inf")
            assert counts[-1] == samples[(f"{name}_count", rest)]
