"""Streaming, below the adapters: the backend's `generate_stream` and the dialogue manager's
`handle_stream` (the edit pacing is `bots.live`, tested in tests/bots/test_live.py).

Nothing here waits on a timer to let something happen: the model is held at a gate until the
test has seen a partial reply."""

from __future__ import annotations

import itertools
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import torch

from core.dialogue import texts
from core.generation.base import (
    Attempt,
    FinishReason,
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StreamChunk,
)
from core.generation.engine.decoder import EngineDecoder
from core.generation.engine.sampling import LogitsHook
from core.generation.policy import ReplyBackend
from core.generation.reply_text import partial_reply
from tests.support.backends import Wrapping, close_now, engine_backend
from tests.support.dialogue import ManagerFactory, message
from tests.support.scripts import force_hook

# The backend


class Gate:
    """Scripts the model and, before step `at`, holds the engine until `opened` is set (an
    `AttemptHook` for the engine decoder)."""

    def __init__(self, script: list[int], at: int, opened: threading.Event) -> None:
        self.script = script
        self.at = at
        self.opened = opened

    def __call__(self, attempt: Attempt, row: int) -> LogitsHook:
        forced = force_hook(self.script)
        steps = itertools.count()

        def hook(ids: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
            if next(steps) == self.at and not self.opened.wait(timeout=30):
                raise AssertionError("no partial reply reached the event loop")
            return forced(ids, scores)

        return hook


def gate(backend: ReplyBackend, hook: Gate | None) -> None:
    assert isinstance(backend.decoder, EngineDecoder)
    backend.decoder.logits_hook = hook


@pytest.fixture(scope="module")
def gated(tiny_model_dir: Path) -> Iterator[ReplyBackend]:
    backend = engine_backend(tiny_model_dir)
    yield backend
    close_now(backend)


def test_a_partial_reply_hides_what_may_become_a_stop_marker() -> None:
    assert partial_reply("좋아요 Us") == "좋아요"
    assert partial_reply("좋아요 A") == "좋아요"
    assert partial_reply("좋아요 User: 또") == "좋아요"
    assert partial_reply("AI: 네 좋아요") == "네 좋아요"


async def test_the_stream_grows_and_ends_with_what_generate_gives(gated: ReplyBackend) -> None:
    tokenizer = gated.tokenizer
    reply = "오늘은 날씨가 정말 좋네요"
    opened = threading.Event()
    gate(gated, Gate([*tokenizer.encode_text(reply), tokenizer.eos_id], at=3, opened=opened))
    request = GenerationRequest(tuple(tokenizer.encode_text("User: 안녕\nAI:")), SamplingParams())
    partials: list[str] = []
    final: GenerationResult | None = None
    async for chunk in gated.generate_stream(request):
        if chunk.result is None:
            partials.append(chunk.text)
            opened.set()
        else:
            final = chunk.result
    gate(gated, Gate([*tokenizer.encode_text(reply), tokenizer.eos_id], at=99, opened=opened))
    assert final is not None and final == await gated.generate(request)
    assert final.text == reply and final.finish_reason is FinishReason.EOS
    assert partials and all(reply.startswith(partial) for partial in partials)
    assert len(partials[0]) < len(reply)


async def test_a_sampled_stream_ends_exactly_like_the_same_seeded_generate(
    gated: ReplyBackend,
) -> None:
    gate(gated, None)
    prompt = tuple(gated.tokenizer.encode_text("User: 오늘 뭐 해?\nAI:"))
    request = GenerationRequest(prompt, SamplingParams(max_new_tokens=12), seed=7)
    chunks = [chunk async for chunk in gated.generate_stream(request)]
    assert chunks[-1].result == await gated.generate(request)
    assert all(chunk.result is None for chunk in chunks[:-1])


# The dialogue manager


class ScriptedStream(Wrapping):
    """Streams fixed partials, then the final text."""

    def __init__(self, inner: GenerationBackend, partials: list[str], final: str) -> None:
        super().__init__(inner)
        self.partials = partials
        self.final = final

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return GenerationResult(self.final, 3, FinishReason.STOP)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        for partial in self.partials:
            yield StreamChunk(partial)
        yield StreamChunk(self.final, await self.generate(request))


async def test_handle_stream_shows_partials_as_the_reply_will_look(
    make_manager: ManagerFactory,
) -> None:
    manager, _ = await make_manager(max_message_chars=100)
    services = manager.services  # what the chat turn generates through
    services.backend = ScriptedStream(services.backend, ["반가", "반가워요"], "반가워요!")
    seen: list[str] = []
    reply = await manager.handle_stream(message("안녕 " * 60), seen.append)
    assert reply.text == texts.TRIMMED_NOTE + "반가워요!" and reply.trimmed
    assert seen == [texts.TRIMMED_NOTE + "반가", texts.TRIMMED_NOTE + "반가워요"]

    seen.clear()
    completed = await manager.handle_stream(message("/complete 오늘은"), seen.append)
    assert seen == ["오늘은반가", "오늘은반가워요"] and completed.text == "오늘은반가워요!"

    seen.clear()
    await manager.handle_stream(message("/help"), seen.append)
    await manager.handle(message("또 안녕"))  # no listener: not streamed
    assert seen == []


async def test_streamed_and_plain_replies_are_the_same(make_manager: ManagerFactory) -> None:
    manager, _ = await make_manager(temperature=0.0, max_new_tokens=16)  # the real model, greedy
    streamed = await manager.handle_stream(message("안녕하세요", chat="a"), lambda text: None)
    plain = await manager.handle(message("안녕하세요", chat="b"))
    assert streamed == plain
