"""`finish_reply`: the one streamed-reply finish Telegram and Discord share."""

from __future__ import annotations

from bots.live import LiveMessage, finish_reply, streaming
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
