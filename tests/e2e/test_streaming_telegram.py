"""Streamed replies on Telegram: the real python-telegram-bot against the fake Bot API.

The reply grows in one message by `editMessageText`; operations on that message are at least a
second apart (the production setting), a `RetryAfter` pushes the next edit back, and the message
ends exactly as the reply the core returns (and stores). The scripted stream below hands out its
next partial only once the fake shows the previous one, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bots.app import build_dialogue_manager
from bots.telegram.adapter import chunks
from core.generation.base import (
    FinishReason,
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
)
from core.messages import ConversationKey, IncomingMessage, Role
from core.moderation.reply_filter import MASK_CHAR, build_filter
from core.settings import Settings
from tests.e2e.test_telegram import OPTIONS, running
from tests.support.backends import Unclosed
from tests.support.platforms import telegram_settings
from tests.support.telegram import Call, FakeTelegram, private_chat, user

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
PARTIALS = ["오늘은", "오늘은 날씨가", "오늘은 날씨가 정말"]
FINAL = "오늘은 날씨가 정말 좋네요!"


class PacedStream(Unclosed):
    """Streams `PARTIALS`, each only after the chat shows the one before, then `FINAL`."""

    def __init__(self, inner: GenerationBackend, fake: FakeTelegram, chat_id: int) -> None:
        super().__init__(inner)
        self.fake = fake
        self.chat_id = chat_id
        self.final = FINAL

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return GenerationResult(self.final, 7, FinishReason.STOP)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        for partial in PARTIALS:
            yield StreamChunk(partial)
            await self.fake.wait_for(self._showing(partial))
        yield StreamChunk(self.final, await self.generate(request))

    def _showing(self, text: str) -> Callable[[], bool]:
        return lambda: text in self.fake.shown_in(self.chat_id)


@pytest.fixture
def make_settings(
    tmp_path: Path, fake_telegram: FakeTelegram, tiny_model_dir: Path
) -> Callable[..., Settings]:
    return functools.partial(
        telegram_settings, fake_telegram, tmp_path, tiny_model_dir, rate_limit_per_minute=0
    )


def operations(fake_telegram: FakeTelegram, chat_id: int) -> list[Call]:
    """Accepted sends and edits in a chat, in order."""
    methods = ("sendMessage", "editMessageText")
    return [c for c in fake_telegram.calls if c.method in methods and c.ok and c.chat_id == chat_id]


def gaps(calls: list[Call]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(calls)]


async def stored_reply(manager: Any, chat_id: int) -> str:
    turns = await manager.storage.recent(ConversationKey("telegram", str(chat_id), str(chat_id)), 9)
    return str([t.text for t in turns if t.role is Role.AI][-1])


async def test_a_reply_grows_in_place_at_most_once_a_second(
    fake_telegram: FakeTelegram,
    make_settings: Callable[..., Settings],
    tiny_backend: GenerationBackend,
) -> None:
    chat = private_chat(801)
    options = replace(OPTIONS, stream_first_after_s=0.0)  # the 1 s interval is the default
    async with running(
        make_settings(), PacedStream(tiny_backend, fake_telegram, 801), options
    ) as adapter:
        update = fake_telegram.send(chat, user(801), "날씨 어때?")
        await fake_telegram.wait_handled(update, timeout_s=30)
        stored = await stored_reply(adapter.manager, 801)

    calls = operations(fake_telegram, 801)
    assert [c.method for c in calls] == ["sendMessage"] + ["editMessageText"] * 3
    assert [c.text for c in calls] == [*PARTIALS, FINAL]
    assert fake_telegram.shown_in(801) == [FINAL] == [stored]  # one message, exactly the reply
    assert all(gap >= 1.0 for gap in gaps(calls)), gaps(calls)
    edited = {int(c.params["message_id"]) for c in fake_telegram.edits_of(801)}
    assert edited == {fake_telegram.sent_messages(801)[0]["message_id"]}


async def test_retry_after_pushes_the_next_edit_back(
    fake_telegram: FakeTelegram,
    make_settings: Callable[..., Settings],
    tiny_backend: GenerationBackend,
) -> None:
    fake_telegram.fail_next("editMessageText", status=429, retry_after=1)
    options = replace(OPTIONS, stream_interval_s=0.2, stream_first_after_s=0.0)
    async with running(make_settings(), PacedStream(tiny_backend, fake_telegram, 802), options):
        update = fake_telegram.send(private_chat(802), user(802), "날씨 어때?")
        await fake_telegram.wait_handled(update, timeout_s=30)

    refused = [
        c for c in fake_telegram.calls_to("editMessageText", 802, ok=False) if c.status == 429
    ]
    assert len(refused) == 1
    after = [c for c in operations(fake_telegram, 802) if c.at > refused[0].at]
    assert after and after[0].at - refused[0].at >= 1.0  # Telegram's retry_after, honoured
    assert fake_telegram.shown_in(802) == [FINAL]
    assert len(fake_telegram.edits_of(802)) <= len(PARTIALS)


async def test_the_real_model_streams_to_the_same_text_as_without_streaming(
    fake_telegram: FakeTelegram,
    make_settings: Callable[..., Settings],
    tiny_backend: GenerationBackend,
) -> None:
    settings = make_settings(temperature=0.0, max_new_tokens=24)
    options = replace(OPTIONS, stream_interval_s=0.2, stream_first_after_s=0.0)
    async with running(settings, Unclosed(tiny_backend), options) as adapter:
        update = fake_telegram.send(private_chat(803), user(803), "안녕하세요, 반가워요")
        await fake_telegram.wait_handled(update, timeout_s=60)
        plain_manager = await build_dialogue_manager(
            make_settings(temperature=0.0, max_new_tokens=24, stream_replies=False),
            Unclosed(tiny_backend),
        )
        try:
            incoming = IncomingMessage("telegram", "804", "804", "안녕하세요, 반가워요")
            plain = await plain_manager.handle(incoming)
        finally:
            await plain_manager.close()
        stored = await stored_reply(adapter.manager, 803)

    assert fake_telegram.shown_in(803) == [plain.text] == [stored]
    assert all(gap >= 0.2 for gap in gaps(operations(fake_telegram, 803)))


async def test_a_quick_reply_is_sent_once_and_streaming_can_be_off(
    fake_telegram: FakeTelegram,
    make_settings: Callable[..., Settings],
    tiny_backend: GenerationBackend,
) -> None:
    async with running(make_settings(), Unclosed(tiny_backend)):  # first post only after 1 s
        update = fake_telegram.send(private_chat(805), user(805), "/sentiment 정말 행복해")
        await fake_telegram.wait_handled(update, timeout_s=30)
    async with running(
        make_settings(stream_replies=False), PacedStream(tiny_backend, fake_telegram, 806)
    ):
        update = fake_telegram.send(private_chat(806), user(806), "날씨 어때?")
        await fake_telegram.wait_handled(update, timeout_s=30)

    assert fake_telegram.edits_of(805) == [] and len(fake_telegram.shown_in(805)) == 1
    assert "확신도" in fake_telegram.shown_in(805)[0]
    assert fake_telegram.edits_of(806) == [] and fake_telegram.shown_in(806) == [FINAL]


async def test_the_model_commands_on_telegram(
    fake_telegram: FakeTelegram,
    make_settings: Callable[..., Settings],
    tiny_backend: GenerationBackend,
) -> None:
    chat, person = private_chat(807), user(807)
    settings = make_settings(story_max_new_tokens=16)
    async with running(settings, Unclosed(tiny_backend)) as adapter:
        for text in ("안녕 반가워", "/complete 오늘 날씨가", "/story 옛날 옛적에", "/retry"):
            await fake_telegram.wait_handled(fake_telegram.send(chat, person, text), timeout_s=30)
        stored = await stored_reply(adapter.manager, 807)

    menu = [
        command["command"]
        for command in fake_telegram.calls_to("setMyCommands")[0].value("commands")
    ]
    assert {"complete", "story", "sentiment", "retry"} <= set(menu)
    _, completed, story, retried = fake_telegram.shown_in(807)
    assert completed.startswith("오늘 날씨가") and story.startswith("옛날 옛적에")
    assert retried == stored  # the new answer replaced the stored one


async def test_a_streamed_reply_longer_than_a_message_continues_in_new_ones(
    fake_telegram: FakeTelegram,
    make_settings: Callable[..., Settings],
    tiny_backend: GenerationBackend,
) -> None:
    long_reply = " ".join(f"{i}번째 문장이 이어져요." for i in range(500))
    backend = PacedStream(tiny_backend, fake_telegram, 808)
    backend.final = long_reply
    options = replace(OPTIONS, stream_interval_s=0.2, stream_first_after_s=0.0)
    async with running(make_settings(), backend, options):
        await fake_telegram.wait_handled(
            fake_telegram.send(private_chat(808), user(808), "길게"), timeout_s=30
        )

    pieces = chunks(long_reply)
    assert len(pieces) >= 2 and fake_telegram.shown_in(808) == pieces
    first_id = fake_telegram.sent_messages(808)[0]["message_id"]
    assert {int(call.params["message_id"]) for call in fake_telegram.edits_of(808)} == {first_id}


# The reply filter (core.moderation), seen from a platform: no adapter code knows about it

SWEARING = ["아 씨", "아 씨발", "아 씨발 또 늦었다"]
SWORE = "아 씨발 또 늦었다!"
MASKED = f"아 {MASK_CHAR * 2} 또 늦었다!"
WORDS = build_filter()


class SwearingStream(Unclosed):
    """Streams `SWEARING`, each once the chat shows it (as the filter lets it through)."""

    def __init__(self, inner: GenerationBackend, fake: FakeTelegram, chat_id: int) -> None:
        super().__init__(inner)
        self.fake = fake
        self.chat_id = chat_id

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return GenerationResult(SWORE, 7, FinishReason.STOP)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        for partial in SWEARING:
            yield StreamChunk(partial)
            await self.fake.wait_for(self._showing(WORDS.mask(partial)))
        yield StreamChunk(SWORE, await self.generate(request))

    def _showing(self, text: str) -> Callable[[], bool]:
        return lambda: text in self.fake.shown_in(self.chat_id)


async def test_the_reply_filter_masks_every_edit_and_the_stored_reply(
    fake_telegram: FakeTelegram,
    make_settings: Callable[..., Settings],
    tiny_backend: GenerationBackend,
) -> None:
    options = replace(OPTIONS, stream_interval_s=0.2, stream_first_after_s=0.0)
    settings = make_settings(reply_filter="mask")
    async with running(
        settings, SwearingStream(tiny_backend, fake_telegram, 811), options
    ) as adapter:
        update = fake_telegram.send(private_chat(811), user(811), "늦었어?")
        await fake_telegram.wait_handled(update, timeout_s=30)
        stored = await stored_reply(adapter.manager, 811)

    shown = [call.text for call in operations(fake_telegram, 811)]
    assert len(shown) >= 2  # it did stream: posted, then edited
    assert not any("씨발" in text for text in shown), shown
    assert fake_telegram.shown_in(811) == [MASKED] == [stored]


class DiesMidStream(PacedStream):
    """Streams the first partial, then never finishes (the process dies there)."""

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        yield StreamChunk(PARTIALS[0])
        await self.fake.wait_for(self._showing(PARTIALS[0]))
        await asyncio.Event().wait()
        yield StreamChunk(self.final)  # never reached


async def test_a_restart_finishes_the_half_streamed_message(
    fake_telegram: FakeTelegram,
    make_settings: Callable[..., Settings],
    tiny_backend: GenerationBackend,
) -> None:
    """The inbox notes the message a reply streams into: after a crash mid-stream the next
    run finishes that message, instead of leaving it half-written beside a new one."""
    options = replace(OPTIONS, stream_interval_s=0.05, stream_first_after_s=0.0)
    first_life = replace(options, drain_timeout_s=0.2)
    async with running(
        make_settings(), DiesMidStream(tiny_backend, fake_telegram, 811), first_life
    ):
        update = fake_telegram.send(private_chat(811), user(811), "날씨 어때?")
        await fake_telegram.wait_for(lambda: fake_telegram.shown_in(811) == [PARTIALS[0]])
    async with running(
        make_settings(), PacedStream(tiny_backend, fake_telegram, 811), options
    ) as adapter:
        await fake_telegram.wait_handled(update, timeout_s=30)
        reply = await stored_reply(adapter.manager, 811)

    (posted,) = fake_telegram.calls_to("sendMessage", 811)
    assert fake_telegram.shown_in(811) == [FINAL] == [reply]
    assert posted.text == PARTIALS[0]
