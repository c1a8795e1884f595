"""Streamed replies and the model commands on Discord: real discord.py against the fake Discord.

A reply grows in one message by `PATCH /channels/{id}/messages/{id}`, at least a second between
operations on it (the production setting); a 429 on an edit is waited out; the message ends
exactly as the reply the core returns and stores. The scripted stream hands out its next partial
only once the fake shows the previous one, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bots.discord.rendering import chunks_of, displayable
from core.generation.base import (
    FinishReason,
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
)
from core.messages import Reply, Role
from tests.e2e.test_discord import WAIT_S, Harness, TestBackend, running_bot
from tests.support.backends import Unclosed
from tests.support.discord import JSON, Call, FakeDiscord
from tests.support.platforms import discord_settings

PARTIALS = ["오늘은", "오늘은 날씨가", "오늘은 날씨가 정말"]
FINAL = "오늘은 날씨가 정말 좋네요"
EDITS = r"PATCH /channels/\d+/messages/\d+"


class Forwarding(TestBackend, Unclosed):
    """The shared tiny model: `generate` as TestBackend's, streaming and scoring passed through
    (Unclosed's)."""

    __test__ = False


class PacedStream(TestBackend):
    """Streams `PARTIALS`, each only after the channel shows the one before, then `FINAL`."""

    __test__ = False

    def __init__(self, inner: GenerationBackend, fake: FakeDiscord) -> None:
        super().__init__(inner)
        self.fake = fake
        self.channel_id = 0

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return GenerationResult(FINAL, 6, FinishReason.STOP)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        for partial in PARTIALS:
            yield StreamChunk(partial)
            await self.fake.wait_for(self._showing(partial), WAIT_S)
        yield StreamChunk(FINAL, await self.generate(request))

    def _showing(self, text: str) -> Callable[[], bool]:
        return lambda: text in self.fake.shown_in(self.channel_id)


@pytest.fixture
def fake(fake_discord: FakeDiscord) -> FakeDiscord:
    return fake_discord


def streaming_settings(fake: FakeDiscord, tmp_path: Path, model: Path, **overrides: Any) -> Any:
    return discord_settings(fake, tmp_path, model, stream_replies=True, **overrides)


def operations(fake: FakeDiscord, channel_id: int) -> list[Call]:
    """Accepted posts and edits of messages in a channel, in order."""
    calls = fake.find(rf"(POST /channels/{channel_id}/messages|PATCH /channels/{channel_id}/.*)")
    return [call for call in calls if call.status == 200]


def gaps(calls: list[Call]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(calls)]


async def stored_replies(harness: Harness, channel_id: int, user: JSON) -> list[str]:
    return [text for role, text in await harness.turns(channel_id, user) if role is Role.AI]


async def final_answer(harness: Harness, interaction: JSON) -> str:
    """The text a slash command ends with, once it is done: its original response's last edit
    (streamed), or the answer sent in one piece."""
    fake, adapter = harness.fake, harness.bot.adapter
    assert adapter is not None
    await fake.wait_for(
        lambda: fake.interaction_answers(interaction) and adapter.in_flight.count == 0, WAIT_S
    )
    edits = fake.original_edits(interaction)
    if edits:
        return str(edits[-1].body["content"])
    body = fake.interaction_answers(interaction)[-1].body
    return str(body.get("data", body)["content"])


class PacedAnywhere(PacedStream):
    """`PacedStream` for any reply: each partial once a channel message or an interaction's
    original response shows it (a slash command's shows the command's text before it)."""

    __test__ = False

    def __init__(self, inner: GenerationBackend, fake: FakeDiscord, final: str = FINAL) -> None:
        super().__init__(inner, fake)
        self.final = final

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return GenerationResult(self.final, 6, FinishReason.STOP)

    def _showing(self, text: str) -> Callable[[], bool]:
        def shown() -> list[str]:
            return [
                content for _, content in self.fake.shown.values()
            ] + self.fake.originals_shown()

        return lambda: any(content.endswith(text) for content in shown())


async def test_slash_commands_stream_into_their_original_response(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    """/story and /retry: deferred, then the original response grows by edits at most once a
    second, the last edit exactly the reply (for /retry, the reply stored)."""
    backend = PacedAnywhere(tiny_backend, fake)
    settings = streaming_settings(fake, tmp_path, tiny_model_dir)
    async with running_bot(fake, settings, backend, stream_first_after_s=0.0) as harness:
        user = harness.person("지우")
        channel = fake.dm_channel_id(user)
        await fake.send_message(user, "날씨 어때?")
        await fake.wait_for(lambda: fake.shown_in(channel) == [FINAL], WAIT_S)
        story = await fake.send_command(user, "story", {"text": "옛날 옛적에"})
        story_text = await final_answer(harness, story)
        backend.final = "다른 날씨 이야기예요"
        retry = await fake.send_command(user, "retry")
        retry_text = await final_answer(harness, retry)
        stored = await stored_replies(harness, channel, user)

    for interaction, partials in [
        (story, [f"옛날 옛적에{partial}" for partial in PARTIALS]),
        (retry, PARTIALS),
    ]:
        (callback,) = fake.interaction_answers(interaction)  # nothing but the deferral posted
        assert callback.body == {"type": 5}  # deferred, public: no ephemeral flag
        edits = fake.original_edits(interaction)
        assert [edit.body["content"] for edit in edits][:-1] == partials
        assert all(gap >= 1.0 for gap in gaps(edits)), gaps(edits)
        assert all(edit.body["allowed_mentions"] == {"parse": []} for edit in edits)
    assert story_text == f"옛날 옛적에{FINAL}"
    assert stored == ["다른 날씨 이야기예요"] and retry_text == displayable(stored[0])


async def test_a_reply_grows_in_place_at_most_once_a_second(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    backend = PacedStream(tiny_backend, fake)
    settings = streaming_settings(fake, tmp_path, tiny_model_dir)
    async with running_bot(fake, settings, backend, stream_first_after_s=0.0) as harness:
        user = harness.person("하준")
        channel = backend.channel_id = fake.dm_channel_id(user)
        asked = await fake.send_message(user, "날씨 어때?")
        await fake.wait_for(lambda: fake.shown_in(channel) == [FINAL], WAIT_S)
        stored = await stored_replies(harness, channel, user)

    calls = operations(fake, channel)
    assert [call.method for call in calls] == ["POST", "PATCH", "PATCH", "PATCH"]
    assert [call.body["content"] for call in calls] == [*PARTIALS, FINAL]
    assert stored == [FINAL]
    assert all(gap >= 1.0 for gap in gaps(calls)), gaps(calls)
    first = fake.replies_to(asked)
    assert len(first) == 1 and first[0]["allowed_mentions"] == {"parse": [], "replied_user": True}


async def test_a_429_on_an_edit_is_waited_out(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    fake.rate_limit(EDITS, times=1)
    backend = PacedStream(tiny_backend, fake)
    settings = streaming_settings(fake, tmp_path, tiny_model_dir)
    options = {"stream_interval_s": 0.2, "stream_first_after_s": 0.0}
    async with running_bot(fake, settings, backend, **options) as harness:
        user = harness.person("서아")
        channel = backend.channel_id = fake.dm_channel_id(user)
        await fake.send_message(user, "날씨 어때?")
        await fake.wait_for(lambda: fake.shown_in(channel) == [FINAL], WAIT_S)

    limited = [call for call in fake.find(EDITS) if call.status == 429]
    assert len(limited) == 1
    assert len(fake.edits_in(channel)) == len(PARTIALS)
    assert all(gap >= 0.2 for gap in gaps(operations(fake, channel)))


async def test_the_model_commands_as_messages_and_slash_commands(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    settings = streaming_settings(fake, tmp_path, tiny_model_dir, story_max_new_tokens=16)
    async with running_bot(fake, settings, Forwarding(tiny_backend)) as harness:
        synced = {command["name"]: command for command in fake.calls[2].body}
        user = harness.person("민준")
        channel = fake.dm_channel_id(user)
        chat = await fake.send_message(user, "안녕 반가워")
        await harness.replies(chat)
        typed = await fake.send_message(user, "/sentiment 오늘 정말 행복해")
        sentiment = await harness.reply_text(typed)

        answers: dict[str, str] = {}
        for name, options in [
            ("complete", {"text": "오늘 날씨가"}),
            ("story", {"text": "옛날 옛적에"}),
            ("retry", None),
        ]:
            interaction = await fake.send_command(user, name, options)
            answers[name] = await final_answer(harness, interaction)
        stored = await stored_replies(harness, channel, user)

    for name in ("complete", "story", "sentiment"):
        [option] = synced[name]["options"]
        assert option["name"] == "text" and option["required"] is True
    assert "retry" in synced and not synced["retry"].get("options")
    assert "확신도" in sentiment and sentiment.split(" ")[0] in ("긍정", "부정")
    assert answers["complete"].startswith("오늘 날씨가")
    assert answers["story"].startswith("옛날 옛적에")
    assert [displayable(text) for text in stored] == [answers["retry"]]  # replaced in storage


class DiesMidStream(PacedStream):
    """Streams the first partial, then the process dies (nothing stored, nothing finished)."""

    __test__ = False

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        yield StreamChunk(PARTIALS[0])
        await self.fake.wait_for(self._showing(PARTIALS[0]), WAIT_S)
        raise RuntimeError("the process died here")


async def test_a_restart_finishes_the_half_streamed_message(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    settings = streaming_settings(fake, tmp_path, tiny_model_dir)
    options = {"stream_interval_s": 0.05, "stream_first_after_s": 0.0}
    user = fake.user("재시작")
    channel = fake.dm_channel_id(user)
    dying = DiesMidStream(tiny_backend, fake)
    dying.channel_id = channel
    async with running_bot(fake, settings, dying, **options):
        asked = await fake.send_message(user, "날씨 어때?")
        await fake.wait_for(lambda: fake.shown_in(channel) == [PARTIALS[0]], WAIT_S)
        await asyncio.sleep(0.1)
    again = PacedStream(tiny_backend, fake)
    again.channel_id = channel
    async with running_bot(fake, settings, again, **options) as harness:
        await fake.wait_for(lambda: fake.shown_in(channel) == [FINAL], WAIT_S)
        stored = await stored_replies(harness, channel, user)

    posts = [call for call in operations(fake, channel) if call.method == "POST"]
    assert [call.body["content"] for call in posts] == [PARTIALS[0]]
    assert stored == [FINAL] and len(fake.replies_to(asked)) == 1


async def test_a_long_streamed_slash_answer_continues_in_follow_ups(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    """Past 2,000 characters the original response ends with the first chunk and the rest of
    the reply follows as follow-ups, in order."""
    long_story = " ".join(f"{i}번째 문장은 길게 이어지는 이야기예요." for i in range(120))
    backend = PacedAnywhere(tiny_backend, fake, final=long_story)
    settings = streaming_settings(fake, tmp_path, tiny_model_dir)
    options = {"stream_interval_s": 0.2, "stream_first_after_s": 0.0}
    async with running_bot(fake, settings, backend, **options) as harness:
        user = harness.person("긴이야기")
        complete = await fake.send_command(user, "complete", {"text": "시작:"})
        await final_answer(harness, complete)

    callback, *follow_ups = fake.interaction_answers(complete)
    expected = chunks_of(Reply(f"시작:{long_story}"))
    assert callback.body == {"type": 5} and len(expected) > 1
    assert fake.original_edits(complete)[-1].body["content"] == expected[0]
    assert [call.body["content"] for call in follow_ups] == expected[1:]
