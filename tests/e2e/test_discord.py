"""The real discord.py client, through `bots.discord_adapter`, against the fake Discord.

Every test starts the bot on a fresh fake (REST + gateway on 127.0.0.1, port 0) with a SQLite
file in tmp_path. The tiny KoGPT2-format model is loaded once per session and shared; where a
test needs a reply it can predict (5,000 characters, `@everyone`) a script replaces the model
output, everything else (prompting, storage, splitting, discord.py) stays real.
No test sleeps for a fixed time: each waits for a condition with a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bots.app import build_dialogue_manager
from bots.discord.adapter import NO_TEXT, NOT_ALLOWED
from bots.discord.client import MISSING_INTENT, TOKEN_REJECTED
from bots.discord.endpoints import api_base, discord_endpoints
from bots.discord.rendering import FILE_IN_PRIVATE, displayable
from bots.discord.runner import DiscordBot
from core.dialogue import texts
from core.dialogue.manager import DialogueManager
from core.errors import StartupError
from core.generation.base import (
    FinishReason,
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
)
from core.messages import ConversationKey, Role
from core.settings import Settings
from storage.base import StorageError
from tests.support.backends import Wrapping
from tests.support.discord import JSON, FakeDiscord
from tests.support.platforms import discord_settings

WAIT_S = 30.0
REPO = Path(__file__).resolve().parents[2]
NO_PING: JSON = {"parse": []}


# ---------------------------------------------------------------------------------------------
# The model: one tiny GPT-2 per session; a script or a gate where a test needs control


class TestBackend(Wrapping):
    """The shared tiny model, optionally scripted or held at a gate; `close` leaves it open."""

    __test__ = False

    def __init__(self, inner: GenerationBackend, script: str | None = None) -> None:
        super().__init__(inner)
        self.script = script
        self.gate: asyncio.Event | None = None
        self.started = 0
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.started += 1
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if self.script is not None:
            return GenerationResult(self.script, 1, FinishReason.STOP)
        return await self.inner.generate(request)


# ---------------------------------------------------------------------------------------------
# Running the bot against the fake


@dataclass
class Harness:
    fake: FakeDiscord
    bot: DiscordBot
    manager: DialogueManager
    backend: TestBackend
    users: dict[str, JSON] = field(default_factory=dict)

    def person(self, name: str) -> JSON:
        if name not in self.users:
            self.users[name] = self.fake.user(name)
        return self.users[name]

    async def replies(self, message: JSON, count: int = 1) -> list[JSON]:
        """Wait for `count` replies to `message`; return all of them."""
        found: list[JSON] = await self.fake.wait_for(
            lambda: (r := self.fake.replies_to(message)) and len(r) >= count and r, WAIT_S
        )
        return found

    async def reply_text(self, message: JSON) -> str:
        return str((await self.replies(message))[0]["content"])

    async def answers(self, interaction: JSON, count: int = 1) -> list[JSON]:
        calls = await self.fake.wait_for(
            lambda: (a := self.fake.interaction_answers(interaction)) and len(a) >= count and a,
            WAIT_S,
        )
        return [{"body": c.body, "files": c.files, "path": c.path} for c in calls]

    async def turns(self, chat_id: int, user: JSON) -> list[tuple[Role, str]]:
        key = ConversationKey("discord", str(chat_id), str(user["id"]))
        return [(t.role, t.text) for t in await self.manager.storage.recent(key, 100)]


async def wait_until_ready(bot: DiscordBot, task: asyncio.Task[None]) -> None:
    """Poll `is_ready` (a flag, not a race) until the bot is ready; a failed run raises."""
    deadline = time.monotonic() + WAIT_S
    while not bot.client.is_ready():
        if task.done():
            task.result()
            raise AssertionError("the bot stopped before it was ready")
        assert time.monotonic() < deadline, "the bot did not become ready"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running_bot(
    fake: FakeDiscord, settings: Settings, backend: TestBackend, **options: Any
) -> AsyncIterator[Harness]:
    manager = await build_dialogue_manager(settings, backend)
    options = {"guild_ready_timeout": 0.05, "identify_delay_s": 0.0, **options}
    bot = DiscordBot(settings, manager, **options)
    task = asyncio.create_task(bot.run())
    try:
        await wait_until_ready(bot, task)
        yield Harness(fake, bot, manager, backend)
    finally:
        await bot.close()
        await asyncio.wait_for(task, WAIT_S)
        await manager.close()


@pytest.fixture
def fake(fake_discord: FakeDiscord) -> FakeDiscord:
    return fake_discord


@pytest.fixture
async def harness(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> AsyncIterator[Harness]:
    settings = discord_settings(fake, tmp_path, tiny_model_dir)
    async with running_bot(fake, settings, TestBackend(tiny_backend)) as running:
        yield running


# ---------------------------------------------------------------------------------------------
# Tests


async def test_dm_round_trip_after_the_documented_start_up(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake, user = harness.fake, harness.person("민수")
    startup = [call.route() for call in fake.calls[:3]]
    assert startup == [
        "GET /users/@me",
        "GET /oauth2/applications/@me",
        f"PUT /applications/{fake.app_id}/commands",
    ]
    assert {c["name"] for c in fake.calls[2].body} >= {
        "reset",
        "help",
        "persona",
        "forget",
        "export",
    }
    identify = fake.identifies[0]
    assert identify["intents"] & (1 << 15) and not identify["intents"] & (1 << 1)

    first = await fake.send_message(user, "안녕하세요")
    second_body = await harness.replies(first)
    assert second_body[0]["allowed_mentions"] == {**NO_PING, "replied_user": True}
    assert second_body[0]["content"].strip()
    assert fake.find(rf"POST /channels/{fake.dm_channel_id(user)}/typing")
    turns = await harness.turns(fake.dm_channel_id(user), user)
    assert turns[0] == (Role.USER, "안녕하세요") and turns[1][0] is Role.AI

    later = await fake.send_message(user, "다시 만나서 반가워요")
    await harness.replies(later)
    assert len(await harness.turns(fake.dm_channel_id(user), user)) == 4
    assert all(fake.token not in record.getMessage() for record in caplog.records)


async def test_server_messages_need_a_mention_a_reply_or_a_listed_channel(harness: Harness) -> None:
    fake, guild = harness.fake, harness.fake.guild
    user, other_bot = harness.person("지수"), fake.user("otherbot", bot=True)
    in_guild = {"guild_id": guild.id}
    ignored = [
        await fake.send_message(user, "그냥 잡담", guild.general_id, **in_guild),
        await fake.send_message(other_bot, "봇 메시지", guild.listed_id, **in_guild),
        await fake.send_message(fake.bot_user, "내 메시지", guild.listed_id, **in_guild),
        await fake.send_message(
            user, "웹훅", guild.listed_id, webhook_id=str(fake.ids.next()), **in_guild
        ),
    ]
    mentioned = await fake.mention_bot(user, "안녕", guild)
    by_role = await fake.send_message(
        user,
        f"<@&{guild.bot_role_id}> 역할로 불러요",
        guild.general_id,
        mention_roles=(guild.bot_role_id,),
        **in_guild,
    )
    bot_said = (await harness.replies(mentioned))[0]
    bot_message = fake.message_payload(
        fake.bot_user,
        bot_said["content"],
        guild.general_id,
        guild_id=guild.id,
        id=str(fake.ids.next()),
    )
    replied = await fake.send_message(
        user, "답장이에요", guild.general_id, reply_to=bot_message, **in_guild
    )
    listed = await fake.send_message(user, "등록된 채널", guild.listed_id, **in_guild)
    threaded = await fake.send_message(user, "스레드에서", guild.thread_id, **in_guild)
    for message in (by_role, replied, listed, threaded):
        await harness.replies(message)
    assert all(fake.replies_to(message) == [] for message in ignored)
    general = await harness.turns(guild.general_id, user)
    said = {text for role, text in general if role is Role.USER}
    assert said == {"안녕", "역할로 불러요", "답장이에요"}  # the bot's own mentions removed
    assert len(await harness.turns(guild.thread_id, user)) == 2  # a thread is its own context


async def test_media_without_text_and_typed_export_in_a_server(harness: Harness) -> None:
    fake, guild, user = harness.fake, harness.fake.guild, harness.person("하늘")
    attachment = {
        "id": str(fake.ids.next()),
        "filename": "cat.png",
        "size": 10,
        "url": "https://cdn.example/cat.png",
        "proxy_url": "https://cdn.example/cat.png",
    }
    photo = await fake.send_message(
        user, "", guild.listed_id, guild_id=guild.id, attachments=[attachment]
    )
    assert await harness.reply_text(photo) == discord_text(NO_TEXT)
    export = await fake.mention_bot(user, "/export", guild)
    await harness.replies(export)
    sent = fake.find(rf"POST /channels/{guild.general_id}/messages")[-1]
    assert sent.files == {} and discord_text(FILE_IN_PRIVATE) in sent.body["content"]


async def test_slash_commands_reset_persona_stats_and_help(harness: Harness) -> None:
    fake, guild, user = harness.fake, harness.fake.guild, harness.person("도윤")
    talk = await fake.send_message(user, "기억해 줘", guild.listed_id, guild_id=guild.id)
    await harness.replies(talk)

    reset = await fake.send_command(user, "reset", guild=guild)
    answer = (await harness.answers(reset))[0]["body"]
    assert answer["type"] == 4 and answer["data"]["content"] == discord_text(texts.RESET_TEXT)
    assert not answer["data"].get("flags") and answer["data"]["allowed_mentions"] == NO_PING

    persona = await fake.send_command(user, "persona", {"text": "친절한 선생님"}, guild=guild)
    assert "친절한 선생님" in (await harness.answers(persona))[0]["body"]["data"]["content"]
    stats = await fake.send_command(user, "stats")
    stats_answer = (await harness.answers(stats))[0]["body"]["data"]
    assert stats_answer["content"] == discord_text(texts.NOT_ADMIN)
    assert stats_answer["flags"] & 64
    help_answer = (await harness.answers(await fake.send_command(user, "help")))[0]["body"]["data"]
    assert "/reset" in help_answer["content"] and help_answer["flags"] & 64


async def test_slow_export_is_deferred_then_sent_as_a_private_file(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    settings = discord_settings(fake, tmp_path, tiny_model_dir, discord_guilds=[fake.guild.id])
    async with running_bot(fake, settings, TestBackend(tiny_backend), defer_after_s=0.0) as h:
        assert fake.find(rf"PUT /applications/{fake.app_id}/guilds/{fake.guild.id}/commands")
        user = h.person("서연")
        talk = await fake.send_message(user, "내 기록을 남겨요")
        await h.replies(talk)
        export = await fake.send_command(user, "export", guild=fake.guild)
        deferred, followup = await h.answers(export, count=2)
        assert deferred["body"] == {"type": 5, "data": {"flags": 64}}
        assert followup["path"].startswith(f"/webhooks/{fake.app_id}/")
        [(name, data)] = followup["files"].items()
        assert name.endswith(".json") and "내 기록을 남겨요" in data.decode()
        assert followup["body"]["allowed_mentions"] == NO_PING


async def test_a_5000_character_reply_is_split_in_order(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    sentences = [f"{i}번째 문장은 정말 길고 자세한 설명을 담고 있어요." for i in range(200)]
    long_text = " ".join(sentences)[:5000]
    backend = TestBackend(tiny_backend, script=long_text)
    settings = discord_settings(fake, tmp_path, tiny_model_dir)
    async with running_bot(fake, settings, backend) as h:
        message = await fake.send_message(h.person("예준"), "길게 말해 줘")
        parts = await h.replies(message, count=3)
    assert len(parts) == 3 and all(len(p["content"]) <= 2000 for p in parts)
    assert " ".join(p["content"] for p in parts).split() == long_text.split()
    assert all(p["content"].endswith(("요.", "요")) for p in parts[:-1])  # sentence ends
    pings = [p["allowed_mentions"].get("replied_user", False) for p in parts]
    assert pings == [True, False, False]
    assert all(p["allowed_mentions"]["parse"] == [] for p in parts)


async def test_mentions_and_markdown_in_model_output_never_ping(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    role = fake.guild.member_role_id
    output = f"@everyone @here <@{fake.owner['id']}> <@&{role}> **굵게**"
    settings = discord_settings(fake, tmp_path, tiny_model_dir)
    async with running_bot(fake, settings, TestBackend(tiny_backend, script=output)) as h:
        message = await fake.send_message(
            h.person("은우"), "모두 불러 줘", fake.guild.listed_id, guild_id=fake.guild.id
        )
        [body] = await h.replies(message)
    assert body["allowed_mentions"] == {"parse": [], "replied_user": True}
    content = body["content"]
    assert "@everyone" not in content and "@here" not in content
    assert "@\u200beveryone" in content and f"<@\u200b{fake.owner['id']}>" in content
    assert f"<@\u200b&{role}>" in content and "\\*\\*굵게\\*\\*" in content


async def test_reconnect_and_resume_mid_conversation_keeps_context(harness: Harness) -> None:
    fake, user = harness.fake, harness.person("지안")
    channel = fake.dm_channel_id(user)
    first = await fake.send_message(user, "첫 번째 말")
    await harness.replies(first)

    harness.backend.gate = asyncio.Event()
    started = harness.backend.started
    in_flight = await fake.send_message(user, "두 번째 말")
    await fake.wait_for(lambda: harness.backend.started > started, WAIT_S)
    old = await fake.request_reconnect()
    await fake.wait_for(lambda: old.connection is None, WAIT_S)
    buffered = await fake.send_message(user, "세 번째 말")  # sent while disconnected
    await fake.wait_for(lambda: fake.resumes, WAIT_S)
    harness.backend.gate.set()
    await harness.replies(in_flight)
    await harness.replies(buffered)

    assert fake.resumes[0]["session_id"] == old.id and len(fake.identifies) == 1
    said = [text for role, text in await harness.turns(channel, user) if role is Role.USER]
    assert said == ["첫 번째 말", "두 번째 말", "세 번째 말"]
    earlier_line = harness.backend.tokenizer.encode_text("User: 첫 번째 말\n")
    assert contains_run(harness.backend.requests[-1].prompt_ids, earlier_line)  # in the prompt

    await fake.dispatch("MESSAGE_CREATE", buffered)  # a replay of an answered message
    barrier = await fake.send_message(user, "네 번째 말")
    await harness.replies(barrier)
    assert len(fake.replies_to(buffered)) == 1
    # the replay never reached the core (the inbox)
    assert harness.manager.observer.totals().messages == 4


async def test_a_429_with_via_is_retried_by_discord_py(harness: Harness) -> None:
    fake, user = harness.fake, harness.person("로아")
    fake.rate_limit(rf"POST /channels/{fake.dm_channel_id(user)}/messages")
    message = await fake.send_message(user, "천천히")
    await harness.replies(message)
    assert len(fake.find(rf"POST /channels/{fake.dm_channel_id(user)}/messages")) == 2


async def test_twenty_users_at_once_each_get_their_own_reply(harness: Harness) -> None:
    fake, channel = harness.fake, harness.fake.guild.listed_id
    people = [harness.person(f"사용자{i}") for i in range(20)]
    sent_at: dict[str, float] = {}
    messages = []
    for i, person in enumerate(people):
        message = fake.message_payload(
            person, f"{i}번 사용자의 질문", channel, guild_id=fake.guild.id
        )
        messages.append(message)
    for message in messages:  # back to back, as fast as the gateway can send
        sent_at[message["id"]] = time.perf_counter()
        await fake.dispatch("MESSAGE_CREATE", message)
    for message in messages:
        await harness.replies(message)
    latencies = [first_reply_at(fake, m) - sent_at[m["id"]] for m in messages]
    print(
        f"\n20 simultaneous users, MESSAGE_CREATE → reply: min {min(latencies):.3f}s, "
        f"median {statistics.median(latencies):.3f}s, max {max(latencies):.3f}s"
    )
    for i, (person, message) in enumerate(zip(people, messages, strict=True)):
        assert len(fake.replies_to(message)) == 1
        turns = await harness.turns(channel, person)
        assert turns[0] == (Role.USER, f"{i}번 사용자의 질문") and len(turns) == 2


async def test_allowlists_roles_admins_and_the_user_rate_limit(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    guild = fake.guild
    admin = fake.user("관리자")
    settings = discord_settings(
        fake,
        tmp_path,
        tiny_model_dir,
        discord_allowed_guilds=[guild.id],
        discord_allowed_roles=[guild.member_role_id],
        discord_admin_ids=[int(admin["id"])],
        rate_limit_per_minute=1,
    )
    async with running_bot(fake, settings, TestBackend(tiny_backend)) as h:
        member, stranger = h.person("회원"), h.person("손님")
        in_guild = {"guild_id": guild.id}
        refused = await fake.send_message(stranger, "안녕", guild.listed_id, **in_guild)
        allowed = await fake.send_message(
            member, "안녕", guild.listed_id, roles=(guild.member_role_id,), **in_guild
        )
        await h.replies(allowed)
        assert fake.replies_to(refused) == []
        assert await h.reply_text(await fake.send_message(stranger, "DM")) == discord_text(
            NOT_ALLOWED
        )
        too_fast = await fake.send_message(
            member, "또", guild.listed_id, roles=(guild.member_role_id,), **in_guild
        )
        assert "초 뒤에 다시" in await h.reply_text(too_fast)
        await h.replies(await fake.send_message(admin, "관리자 DM"))
        stats = (await h.answers(await fake.send_command(admin, "stats")))[0]["body"]["data"]
        assert stats["content"].startswith("메시지") and stats["flags"] & 64
        denied = await fake.send_command(stranger, "reset", guild=guild)
        assert (await h.answers(denied))[0]["body"]["data"]["content"] == discord_text(NOT_ALLOWED)


async def test_auto_sharding_connects_every_shard(
    tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    async with FakeDiscord(recommended_shards=2, guild_shards=2) as fake:
        settings = discord_settings(fake, tmp_path, tiny_model_dir, discord_shards="auto")
        async with running_bot(fake, settings, TestBackend(tiny_backend)) as h:
            assert sorted(i["shard"] for i in fake.identifies) == [[0, 2], [1, 2]]
            user = h.person("샤드")
            far = fake.guilds[1]
            in_far_guild = await fake.mention_bot(user, "안녕", far)
            await h.replies(in_far_guild)
            await h.replies(await fake.send_message(user, "DM은 0번 샤드"))
            assert fake.find(r"GET /gateway/bot")


async def test_a_bad_token_stops_start_up_with_a_clear_message(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path
) -> None:
    settings = discord_settings(fake, tmp_path, tiny_model_dir, discord_token="not-the-token")
    with pytest.raises(StartupError) as caught:
        await asyncio.wait_for(DiscordBot(settings).run(), WAIT_S)
    assert str(caught.value) == TOKEN_REJECTED and "not-the-token" not in str(caught.value)
    assert [call.route() for call in fake.calls] == ["GET /users/@me"]


async def test_a_missing_message_content_intent_stops_start_up(
    tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    async with FakeDiscord(app_flags=0) as fake:
        settings = discord_settings(fake, tmp_path, tiny_model_dir)
        with pytest.raises(StartupError, match="Message Content Intent"):
            await asyncio.wait_for(DiscordBot(settings).run(), WAIT_S)
    async with FakeDiscord(allow_message_content=False) as fake:  # the gateway says 4014
        settings = discord_settings(fake, tmp_path, tiny_model_dir)
        manager = await build_dialogue_manager(settings, TestBackend(tiny_backend))
        try:
            with pytest.raises(StartupError) as caught:
                await asyncio.wait_for(DiscordBot(settings, manager).run(), WAIT_S)
        finally:
            await manager.close()
        assert str(caught.value).endswith(MISSING_INTENT) and 4014 in fake.closed_codes


async def test_kobot_discord_command_answers_and_stops_on_sigterm(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`kobot discord` as an admin runs it: settings from the environment, DEBUG logging."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.upper().startswith("KOBOT_")},
        "PYTHONPATH": str(REPO),
        "KOBOT_MODEL": str(tiny_model_dir),
        "KOBOT_DEVICE": "cpu",
        "KOBOT_MAX_NEW_TOKENS": "8",
        "KOBOT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
        "KOBOT_LOG_LEVEL": "DEBUG",
        "KOBOT_DISCORD_TOKEN": fake.token,
        "KOBOT_DISCORD_API_URL": fake.api_url,
        "KOBOT_DISCORD_GATEWAY_URL": fake.gateway_url,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bots.cli",
        "discord",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await fake.wait_for(lambda: 0 in fake.current or process.returncode is not None, 120)
        assert process.returncode is None, "kobot discord exited early"
        message = await fake.send_message(fake.user("명령줄"), "안녕하세요")
        await fake.wait_for(lambda: fake.replies_to(message), 60)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), WAIT_S)
    log = output.decode(errors="replace")
    assert process.returncode == 0, log[-3000:]
    assert fake.token not in log and "discord" in log


def test_proxy_urls_are_set_for_one_run_only() -> None:
    before = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    assert api_base("http://proxy:8080/") == "http://proxy:8080/api/v10"
    assert api_base("https://proxy/api/v9") == "https://proxy/api/v9"
    with discord_endpoints("http://proxy:8080", "ws://gateway:9000/"):
        assert Route("GET", "/users/@me").url == "http://proxy:8080/api/v10/users/@me"
        assert str(DiscordWebSocket.DEFAULT_GATEWAY) == "ws://gateway:9000/"
    assert before == (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
    with (
        pytest.raises(StartupError, match="KOBOT_DISCORD_GATEWAY_URL"),
        discord_endpoints(None, "http://not-a-websocket"),
    ):
        pass


# ---------------------------------------------------------------------------------------------
# Helpers


def discord_text(text: str) -> str:
    """What the adapter sends for a core text (markdown and mentions escaped)."""
    return displayable(text)


def contains_run(haystack: tuple[int, ...], needle: list[int]) -> bool:
    return any(
        list(haystack[i : i + len(needle)]) == needle
        for i in range(len(haystack) - len(needle) + 1)
    )


def first_reply_at(fake: FakeDiscord, message: JSON) -> float:
    for call in fake.find(rf"POST /channels/{message['channel_id']}/messages"):
        reference = (call.body or {}).get("message_reference") or {}
        if str(reference.get("message_id")) == message["id"]:
            return call.at
    raise AssertionError("no reply")


class CrashingBackend(TestBackend):
    """Holds generations at the gate; once `crash` is set, they die instead (the process in
    effect died mid-generation: nothing was stored or sent)."""

    __test__ = False

    crash = False

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        result = await super().generate(request)
        if self.crash:
            raise RuntimeError("the process died here")
        return result


async def test_a_restart_answers_what_died_mid_generation_once(
    fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, tiny_backend: GenerationBackend
) -> None:
    """Discord never sends a message again after a restart: the inbox has it, and the next
    run answers it; a replay of it afterwards is a no-op."""
    settings = discord_settings(fake, tmp_path, tiny_model_dir)
    first_life = CrashingBackend(tiny_backend, "첫 생에서는 못 보낸 답")
    first_life.gate = asyncio.Event()
    user = fake.user("재시작")
    async with running_bot(fake, settings, first_life) as harness:
        answered = await fake.send_message(user, "먼저 답을 받은 말")
        first_life.gate.set()
        await harness.replies(answered)
        first_life.gate.clear()
        interrupted = await fake.send_message(user, "답을 기다리던 말")
        await fake.wait_for(lambda: first_life.started == 2, WAIT_S)
        first_life.crash = True
        first_life.gate.set()
        await asyncio.sleep(0.1)
    assert fake.replies_to(interrupted) == []

    second_life = TestBackend(tiny_backend, "다시 시작한 뒤의 답")
    async with running_bot(fake, settings, second_life) as harness:
        (reply,) = await harness.replies(interrupted)
        await fake.dispatch("MESSAGE_CREATE", answered)  # replayed: no-op
        await fake.dispatch("MESSAGE_CREATE", interrupted)  # replayed: no-op
        barrier = await fake.send_message(user, "마지막 말")
        await harness.replies(barrier)
        said = await harness.turns(fake.dm_channel_id(user), user)

    assert reply["content"] == "다시 시작한 뒤의 답"
    assert [len(fake.replies_to(m)) for m in (answered, interrupted, barrier)] == [1, 1, 1]
    assert second_life.started == 2  # the interrupted message and the barrier, nothing else
    assert [text for role, text in said if role is Role.USER] == [
        "먼저 답을 받은 말",
        "답을 기다리던 말",
        "마지막 말",
    ]


def idle(harness: Harness) -> bool:
    adapter = harness.bot.adapter
    return adapter is not None and adapter.in_flight.count == 0


async def inbox_emptied(harness: Harness) -> None:
    """Wait until every stored message is finished (the bot's side has no event for it)."""
    async with asyncio.timeout(WAIT_S):
        while await harness.manager.storage.inbox_pending("discord"):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_a_retry_taken_up_again_after_a_restart_is_not_retried_twice(
    fake: FakeDiscord,
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_backend: GenerationBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A typed /retry was answered, then the process died before the inbox finished it: the
    next run takes it up again and neither answers it again nor replaces the reply again."""
    settings = discord_settings(fake, tmp_path, tiny_model_dir)
    first_life = TestBackend(tiny_backend, "처음 답")
    user = fake.user("다시")
    async with running_bot(fake, settings, first_life) as harness:
        await harness.replies(await fake.send_message(user, "안녕하세요"))
        await inbox_emptied(harness)
        first_life.script = "다시 한 답"

        async def died_before_finishing(platform: str, item_id: str) -> None:
            raise StorageError("the process died here")

        monkeypatch.setattr(harness.manager.storage, "inbox_done", died_before_finishing)
        retry = await fake.send_message(user, "/retry")
        assert await harness.reply_text(retry) == "다시 한 답"
        await fake.wait_for(lambda: idle(harness), WAIT_S)  # recorded as sent, not finished
        assert len(await harness.manager.storage.inbox_pending("discord")) == 1

    second_life = TestBackend(tiny_backend, "세 번째 답 (만들면 안 됨)")
    async with running_bot(fake, settings, second_life) as harness:
        await inbox_emptied(harness)
        said = await harness.turns(fake.dm_channel_id(user), user)

    assert [body["content"] for body in fake.replies_to(retry)] == ["다시 한 답"]
    assert [text for role, text in said if role is Role.AI] == ["다시 한 답"]
    assert second_life.started == 0


async def test_a_replayed_slash_retry_is_answered_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The same /retry interaction dispatched again (a replay after a resume) is not answered
    again and does not replace the reply again; the answer is recorded as sent."""
    fake, user = harness.fake, harness.person("재생")
    channel = fake.dm_channel_id(user)
    harness.backend.script = "처음 답"
    await harness.replies(await fake.send_message(user, "안녕하세요"))
    harness.backend.script = "다시 한 답"
    retry = await fake.send_command(user, "retry")
    (answer,) = await harness.answers(retry)
    await fake.wait_for(lambda: idle(harness), WAIT_S)
    started = harness.backend.started

    harness.backend.script = "세 번째 답 (만들면 안 됨)"
    with caplog.at_level(logging.INFO, logger="bots.discord.adapter"):
        await fake.dispatch("INTERACTION_CREATE", retry)
        replayed = f"interaction {retry['id']} was answered before"
        await fake.wait_for(lambda: replayed in caplog.text, WAIT_S)
    key = ConversationKey("discord", str(channel), str(user["id"]))
    stored = await harness.manager.storage.reply_to(key, retry["id"])

    assert answer["body"]["data"]["content"] == "다시 한 답"
    assert len(fake.interaction_answers(retry)) == 1
    assert harness.backend.started == started
    assert [text for role, text in await harness.turns(channel, user) if role is Role.AI] == [
        "다시 한 답"
    ]
    assert stored is not None and stored.delivery == "sent" and stored.sent_ids
