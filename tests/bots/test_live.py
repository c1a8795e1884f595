"""`LiveMessage` (the pacing of a reply's edits) and `finish_reply` (the one streamed-reply
finish Telegram and Discord share). LiveMessage's pacing is checked on the recorded times."""

from __future__ import annotations

import asyncio
import itertools
import time

from bots.live import EditFailed, FloodWait, LiveMessage, finish_reply, streaming
from core.messages import Attachment, Reply


class Chat:
    """Posts and edits, as a platform would show them."""

    def __init__(self) -> None:
        self.shown: dict[int, str] = {}

    async def post(self, text: str) -> int:
        self.shown[len(self.shown) + 1] = text
        return len(self.shown)

    async def edit(self, message_id: int, text: str) -> None:
        self.shown[message_id] = text


def live_in(chat: Chat) -> LiveMessage[int]:
    return LiveMessage(chat.post, chat.edit, interval_s=0.0, first_after_s=0.0)


async def test_the_streamed_message_becomes_the_first_chunk_and_the_rest_is_left_to_send() -> None:
    chat = Chat()
    live = live_in(chat)
    live.handle = await chat.post("안녕")  # a partial already on the screen
    rest = await finish_reply(live, Reply("안녕하세요. 반가워요."), ["안녕하세요.", "반가워요."])
    assert rest == ["반가워요."] and chat.shown == {1: "안녕하세요."}


async def test_a_reply_that_was_not_streamed_is_sent_as_usual() -> None:
    chat = Chat()
    async with streaming(live_in(chat)) as live:
        pass  # no partial arrived
    assert await finish_reply(live, Reply("답"), ["답"]) is None
    assert await finish_reply(None, Reply("답"), ["답"]) is None
    streamed = live_in(chat)
    streamed.handle = await chat.post("기록")
    with_file = Reply("기록", attachment=Attachment("history.json", b"{}"))
    assert await finish_reply(streamed, with_file, ["기록"]) is None


# --- LiveMessage: pacing of the edits -------------------------------------------------------


class FakeMessage:
    """Records posts and edits with their times; can fail as told."""

    def __init__(self) -> None:
        self.ops: list[tuple[float, str]] = []
        self.failures: list[Exception] = []
        self.changed = asyncio.Condition()

    async def post(self, text: str) -> int:
        return await self._op(text)

    async def edit(self, handle: int, text: str) -> None:
        await self._op(text)

    async def _op(self, text: str) -> int:
        if self.failures:
            raise self.failures.pop(0)
        self.ops.append((time.monotonic(), text))
        async with self.changed:
            self.changed.notify_all()
        return 1

    def gaps(self) -> list[float]:
        return [b[0] - a[0] for a, b in itertools.pairwise(self.ops)]

    async def shown(self, text: str) -> None:
        """Wait until the message shows `text` (re-checked after every post or edit)."""
        async with asyncio.timeout(10), self.changed:
            await self.changed.wait_for(lambda: bool(self.ops) and self.ops[-1][1] == text)


async def test_updates_are_coalesced_and_paced() -> None:
    target = FakeMessage()
    live = LiveMessage(target.post, target.edit, interval_s=0.2, first_after_s=0.0)
    live.update("하")
    await target.shown("하")
    for text in ("하나", "하나 둘", "하나 둘 셋"):
        live.update(text)
    await target.shown("하나 둘 셋")
    assert await live.finish("하나 둘 셋 넷")
    assert [text for _, text in target.ops] == ["하", "하나 둘 셋", "하나 둘 셋 넷"]
    assert all(gap >= 0.2 for gap in target.gaps())


async def test_a_flood_limit_pushes_the_next_edit_back() -> None:
    target = FakeMessage()
    live = LiveMessage(target.post, target.edit, interval_s=0.05, first_after_s=0.0)
    live.update("첫")
    await target.shown("첫")
    target.failures.append(FloodWait(0.3))
    refused_at = time.monotonic()
    live.update("첫 번째")
    await target.shown("첫 번째")  # retried with the newest text after the wait
    assert target.ops[-1][0] - refused_at >= 0.3
    assert await live.finish("첫 번째 답")
    assert target.ops[-1][1] == "첫 번째 답"


async def test_a_quick_reply_is_never_posted_and_a_broken_one_is_given_up() -> None:
    target = FakeMessage()
    quick = LiveMessage(target.post, target.edit, interval_s=1.0)  # first post after 1 s
    quick.update("금방")
    assert not await quick.finish("금방 끝나요")
    assert target.ops == []

    broken = LiveMessage(target.post, target.edit, interval_s=0.05, first_after_s=0.0)
    broken.update("시작")
    await target.shown("시작")
    target.failures.append(EditFailed("message deleted"))
    broken.update("시작했는데")
    assert not await broken.finish("시작했는데 끝")
    assert broken.broken
    assert [text for _, text in target.ops] == ["시작"]
