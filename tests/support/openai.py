"""A scriptable OpenAI-compatible completions server (what vLLM serves) on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Answer:
    """A completion: `choices[0].text` with vLLM's finish and stop reasons."""

    text: str
    finish_reason: str = "stop"
    stop_reason: str | int | None = None
    completion_tokens: int | None = 5


@dataclass(frozen=True)
class Status:
    """A non-200 answer, with headers such as Retry-After."""

    code: int
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "server error"


@dataclass(frozen=True)
class Hang:
    """Never answer (until the server stops): the client's timeout has to fire."""


Action = Answer | Status | Hang


@dataclass(frozen=True)
class Received:
    body: dict[str, Any]
    headers: dict[str, str]
    path: str


class FakeOpenAI:
    """Answers `POST /v1/completions` with the scripted actions in order, then `default`.

    `arrived` is set by the first request; `gated`: every request waits until the test sets
    `gate` (or the server stops)."""

    def __init__(self, default: Action | None = None, *, gated: bool = False) -> None:
        self.default: Action = default or Answer("안녕하세요! 반가워요.")
        self.script: deque[Action] = deque()
        self.received: list[Received] = []
        self.arrived = asyncio.Event()
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def then(self, *actions: Action) -> FakeOpenAI:
        self.script.extend(actions)
        return self

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
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        self.received.append(Received(await request.json(), dict(request.headers), request.path))
        self.arrived.set()
        await self.gate.wait()
        action = self.script.popleft() if self.script else self.default
        if isinstance(action, Hang):
            await self._release.wait()
            return web.Response(status=503)
        if isinstance(action, Status):
            return web.Response(status=action.code, text=action.body, headers=action.headers)
        return web.json_response(completion_json(action))


def completion_json(answer: Answer) -> dict[str, Any]:
    return {
        "id": "cmpl-test",
        "object": "text_completion",
        "model": "skt/kogpt2-base-v2",
        "choices": [
            {
                "index": 0,
                "text": answer.text,
                "finish_reason": answer.finish_reason,
                "stop_reason": answer.stop_reason,
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": answer.completion_tokens},
    }
