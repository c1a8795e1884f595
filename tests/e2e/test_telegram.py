"""The Telegram adapter end to end: the real python-telegram-bot against a fake Bot API server.

Every test runs the real PTB `Application` (through `TelegramAdapter`) against `FakeTelegram`
on 127.0.0.1, a SQLite file in `tmp_path`, and the tiny random GPT-2 with KoGPT2's tokenizer.
Nothing sleeps to wait: tests wait for recorded calls, or for the bot to confirm an update
(it confirms only after handling, so a confirmed update is a finished one).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bots.app import build_dialogue_manager
from bots.cli import main as cli_main
from bots.telegram.adapter import (
    EXPORT_NEEDS_PRIVATE_CHAT,
    EXPORT_SENT_PRIVATELY,
    MENU,
    TelegramAdapter,
    TelegramOptions,
)
from bots.telegram.pacing import Pacing, Rate, TokenBucket
from bots.telegram.routing import NON_TEXT_REPLY, BotIdentity, strip_mentions
from bots.telegram.runner import main, run_telegram
from bots.telegram.updates import PollingConfig
from core.dialogue import texts
from core.errors import StartupError
from core.generation.base import (
    FinishReason,
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
)
from core.messages import ConversationKey, Role, Turn
from core.settings import Settings
from storage.base import StorageError
from tests.support.backends import Wrapping
from tests.support.platforms import telegram_settings
from tests.support.telegram import (
    BOT_ID,
    BOT_USERNAME,
    JSON,
    TOKEN,
    Call,
    FakeTelegram,
    group_chat,
    private_chat,
    user,
    utf16_len,
)

# PTB's own RetryAfter constructor warns about its int-or-timedelta attribute (PTB 22.2+).
pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
ADMIN_ID = 4242
OPTIONS = TelegramOptions(  # faster group pacing than Telegram's 20 a minute, for quick tests
    polling=PollingConfig(long_poll_s=10, error_backoff_s=0.1),
    pacing=Pacing(group=Rate(per_second=20.0, burst=5.0)),
    drain_timeout_s=5.0,
)
PHOTO = [{"file_id": "photo-1", "file_unique_id": "p1", "width": 90, "height": 90}]
STICKER = {
    "file_id": "sticker-1",
    "file_unique_id": "s1",
    "type": "regular",
    "width": 512,
    "height": 512,
    "is_animated": False,
    "is_video": False,
}
VOICE = {"file_id": "voice-1", "file_unique_id": "v1", "duration": 2}


# Fixtures and helpers


class ScriptedBackend(Wrapping):
    """Replies with a fixed text, or the model's; can hold a generation until released."""

    def __init__(self, inner: GenerationBackend, reply: str | None = None) -> None:
        super().__init__(inner)
        self.reply = reply
        self.hold = False
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.hold:
            self.held.set()
            await self.release.wait()
        if self.reply is None:
            return await self.inner.generate(request)
        return GenerationResult(self.reply, 1, FinishReason.STOP)


@pytest.fixture
def backend(tiny_backend: GenerationBackend) -> Wrapping:
    return Wrapping(tiny_backend)


@pytest.fixture
def fake(fake_telegram: FakeTelegram) -> FakeTelegram:
    return fake_telegram


@pytest.fixture
def make_settings(
    tmp_path: Path, fake: FakeTelegram, tiny_model_dir: Path
) -> Callable[..., Settings]:
    return partial(
        telegram_settings, fake, tmp_path, tiny_model_dir, telegram_admin_ids=[ADMIN_ID],
        stream_replies=False,  # streamed replies: tests/e2e/test_streaming_telegram.py
    )  # fmt: skip


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@asynccontextmanager
async def running(
    settings: Settings, backend: GenerationBackend, options: TelegramOptions = OPTIONS
) -> AsyncIterator[TelegramAdapter]:
    """A started adapter (one "process"): stopped, and its manager closed, on exit."""
    manager = await build_dialogue_manager(settings, backend)
    try:
        adapter = TelegramAdapter(manager, settings, options=options)
        fake = FakeTelegram.at(settings.telegram_base_url)
        if fake is not None:
            fake.busy = adapter.dispatcher.is_running
        await adapter.start()
        try:
            yield adapter
        finally:
            await adapter.stop()
    finally:
        await manager.close()


def key(chat_id: int, user_id: int) -> ConversationKey:
    return ConversationKey("telegram", str(chat_id), str(user_id))


async def turns_of(adapter: TelegramAdapter, chat_id: int, user_id: int) -> list[Turn]:
    return await adapter.manager.storage.recent(key(chat_id, user_id), 100)


def texts_of(turns: list[Turn], role: Role) -> list[str]:
    return [turn.text for turn in turns if turn.role is role]


def message_id(update: JSON) -> int:
    return int(update["message"]["message_id"])


def quoted(call: Call) -> int | None:
    """The message id a sent message replies to (quotes), if any."""
    reply = call.value("reply_parameters")
    return None if reply is None else int(reply["message_id"])


# Private chats


async def test_private_chat_round_trip(
    fake: FakeTelegram, settings: Settings, backend: Wrapping
) -> None:
    alice, chat = user(101, "앨리스"), private_chat(101)
    async with running(settings, backend) as adapter:
        update = fake.send(chat, alice, "안녕하세요, 반가워요")
        await fake.wait_for(lambda: len(fake.replies_to(101)) == 1)
        start = fake.send(chat, alice, "/start")
        await fake.wait_handled(start)
        turns = await turns_of(adapter, 101, 101)

    first, second = fake.calls_to("sendMessage", 101)
    assert texts_of(turns, Role.USER) == ["안녕하세요, 반가워요"]
    assert texts_of(turns, Role.AI) == [first.text] and first.text.strip()
    assert turns[0].message_id == f"101:{message_id(update)}"
    assert second.text == texts.START_TEXT
    assert "parse_mode" not in first.params and quoted(first) is None
    typing = fake.calls_to("sendChatAction", 101)
    assert typing and typing[0].value("action") == "typing" and typing[0].at <= first.at

    methods = [call.method for call in fake.calls]
    assert methods[0] == "getMe"
    assert methods.index("deleteWebhook") < methods.index("getUpdates")
    assert fake.calls_to("getUpdates")[0].value("allowed_updates") == ["message"]
    menus = fake.calls_to("setMyCommands")
    assert [call.value("language_code") for call in menus] == [None, "en"]
    for call, language in zip(menus, (0, 1), strict=True):
        commands = call.value("commands")
        assert [c["command"] for c in commands] == [c.value for c in MENU]
        assert commands[0]["description"] == texts.DESCRIPTIONS[texts.Command.START][language]


async def test_non_text_captions_bots_and_edits(
    fake: FakeTelegram, settings: Settings, backend: Wrapping
) -> None:
    dave, chat = user(111), private_chat(111)
    robot = user(112, is_bot=True)
    async with running(settings, backend) as adapter:
        fake.send(chat, dave, sticker=STICKER)
        fake.send(chat, dave, voice=VOICE)
        fake.send(chat, dave, photo=PHOTO, caption="이 사진은 바다예요")
        fake.send(private_chat(112), robot, "나는 봇이야")
        edited = fake.message(chat, dave, "고친 메시지", edit_date=int(time.time()))
        fake.add_update({"edited_message": edited})
        fake.send(chat, dave, "/nosuchcommand")
        last = fake.send(chat, dave, "/help")
        await fake.wait_handled(last)
        turns = await turns_of(adapter, 111, 111)

    replies = fake.replies_to(111)
    assert replies[:2] == [NON_TEXT_REPLY, NON_TEXT_REPLY]
    assert texts_of(turns, Role.USER) == ["이 사진은 바다예요"]
    unknown = texts.UNKNOWN_COMMAND.format(name="nosuchcommand")
    assert replies[2:] == [*texts_of(turns, Role.AI), unknown, texts.help_text()]
    assert fake.replies_to(112) == []


# Groups


async def test_group_mentions_replies_commands_and_ignores(
    fake: FakeTelegram, settings: Settings, backend: Wrapping
) -> None:
    group, bob, carol = group_chat(-100500), user(202), user(203)
    robot = user(909, is_bot=True)
    async with running(settings, backend) as adapter:
        ignored = [
            fake.send(group, bob, "우리끼리 하는 얘기예요"),
            fake.send(group, bob, "/reset@other_bot"),
            fake.send(group, carol, "/unknowncommand"),
            fake.send(group, robot, f"@{BOT_USERNAME} 나도 봇이야"),
            fake.send(group, bob, photo=PHOTO),
        ]
        mention = fake.send(group, bob, f"@{BOT_USERNAME} 안녕 반가워")
        reset = fake.send(group, carol, f"/reset@{BOT_USERNAME}")
        await fake.wait_handled(reset)
        bot_message = fake.sent_messages(-100500)[0]
        answered = [
            mention,
            reset,
            fake.send(group, carol, "그게 무슨 뜻이야?", reply_to=bot_message),
            fake.send(group, bob, photo=PHOTO, caption=f"이 사진 어때 @{BOT_USERNAME}"),
            fake.send(group, carol, sticker=STICKER, reply_to=bot_message),
        ]
        ignored.append(fake.send(group, bob, "ㅋㅋ", reply_to=mention["message"]))
        for update in [*answered, *ignored]:  # bob's and carol's turns run side by side
            await fake.wait_handled(update)
        bob_turns = await turns_of(adapter, -100500, 202)
        carol_turns = await turns_of(adapter, -100500, 203)

    sent = {quoted(call): call.text for call in fake.calls_to("sendMessage", -100500)}
    assert len(fake.calls_to("sendMessage", -100500)) == len(answered)
    assert set(sent) == {message_id(update) for update in answered}
    assert sent[message_id(reset)] == texts.RESET_TEXT
    assert sent[message_id(answered[-1])] == NON_TEXT_REPLY
    assert texts_of(bob_turns, Role.USER) == ["안녕 반가워", "이 사진 어때"]
    assert texts_of(carol_turns, Role.USER) == ["그게 무슨 뜻이야?"]


async def test_long_reply_is_split_at_sentence_ends(
    fake: FakeTelegram, settings: Settings, tiny_backend: GenerationBackend
) -> None:
    sentence = "오늘은 정말 좋은 날이에요 😀 같이 산책하러 갈까요? 바람이 시원하네요. "
    long_reply = (sentence * 240).strip()
    assert utf16_len(long_reply) > 2 * 4096
    group, erin = group_chat(-100600), user(301)
    async with running(settings, ScriptedBackend(tiny_backend, long_reply)):
        update = fake.send(group, erin, f"@{BOT_USERNAME} 길게 말해 줘")
        await fake.wait_handled(update)

    chunks = fake.calls_to("sendMessage", -100600)
    assert len(chunks) >= 3
    assert all(quoted(call) == message_id(update) for call in chunks)
    assert all(utf16_len(call.text) <= 4096 for call in chunks)
    assert all(call.text.endswith(("요.", "요?", "요")) for call in chunks)
    assert " ".join(call.text for call in chunks).split() == long_reply.split()
    assert sum(call.text.count("😀") for call in chunks) == long_reply.count("😀")


async def test_export_sends_a_json_document(
    fake: FakeTelegram, settings: Settings, backend: Wrapping
) -> None:
    frank, chat, group = user(401), private_chat(401), group_chat(-100700)
    async with running(settings, backend):
        fake.send(chat, frank, "기억해 줘: 나는 사과를 좋아해")
        export = fake.send(chat, frank, "/export")
        await fake.wait_handled(export)
        in_group = fake.send(group, frank, f"/export@{BOT_USERNAME}")
        await fake.wait_handled(in_group)
        fake.fail_next("sendDocument", status=403, retry_after=None)
        refused = fake.send(group, frank, f"/export@{BOT_USERNAME}")
        await fake.wait_handled(refused)

    private, to_private, _ = fake.calls_to("sendDocument", ok=False)
    assert private.chat_id == 401 and private.params["caption"] == texts.EXPORT_TEXT
    upload = private.files["document"]
    assert upload.filename == "kobot-history-telegram-401.json"
    history = json.loads(upload.data)
    assert history["user_id"] == "401"
    assert "기억해 줘: 나는 사과를 좋아해" in json.dumps(history, ensure_ascii=False)
    assert to_private.chat_id == 401 and to_private.ok
    assert fake.replies_to(-100700) == [EXPORT_SENT_PRIVATELY, EXPORT_NEEDS_PRIVATE_CHAT]


# Webhook


async def test_webhook_mode_checks_the_secret(
    fake: FakeTelegram, make_settings: Callable[..., Settings], backend: Wrapping
) -> None:
    url = "https://bot.example.test/kobot/hook"
    secret = "webhook-Secret_42"
    settings = make_settings(
        telegram_webhook_url=url,
        telegram_webhook_listen="127.0.0.1",
        telegram_webhook_secret=secret,
    ).model_copy(update={"telegram_webhook_port": 0})
    chat, gina = private_chat(501), user(501)
    update = {"update_id": 1, "message": fake.message(chat, gina, "웹훅으로 안녕")}
    async with running(settings, backend) as adapter:
        assert adapter.webhook is not None
        local = f"http://127.0.0.1:{adapter.webhook.port}/kobot/hook"
        assert fake.webhook == {"url": url, "secret_token": secret, "allowed_updates": ["message"]}
        assert await fake.post_webhook(local, update, "wrong-secret") == 403
        assert await fake.post_webhook(local, update, None) == 403
        assert fake.replies_to(501) == []
        assert await fake.post_webhook(local, update, secret) == 200
        await fake.wait_for(lambda: len(fake.replies_to(501)) == 1)
        assert await fake.post_webhook(local, update, secret) == 200  # a redelivery
        assert await fake.post_webhook(local + "x", update, secret) == 404
        await asyncio.sleep(0.2)  # a second reply, if any, would be sent by now
    assert len(fake.replies_to(501)) == 1
    assert not fake.calls_to("getUpdates") and not fake.calls_to("deleteWebhook")


# Flood control


async def test_retry_after_is_honoured(
    fake: FakeTelegram, settings: Settings, backend: Wrapping
) -> None:
    fake.fail_next("sendMessage", status=429, retry_after=1)
    async with running(settings, backend) as adapter:
        update = fake.send(private_chat(601), user(601), "빨리 대답해 줘")
        await fake.wait_handled(update)
        turns = await turns_of(adapter, 601, 601)

    refused, sent = fake.calls_to("sendMessage", 601, ok=False)
    assert refused.status == 429 and sent.ok
    assert sent.at - refused.at >= 0.95
    assert sent.text == refused.text == texts_of(turns, Role.AI)[0]


async def test_sends_to_a_busy_group_are_paced(
    fake: FakeTelegram, settings: Settings, backend: Wrapping
) -> None:
    options = replace(OPTIONS, pacing=Pacing(group=Rate(per_second=5.0, burst=1.0)))
    group = group_chat(-100800)
    async with running(settings, backend, options):
        updates = [fake.send(group, user(700 + i), f"@{BOT_USERNAME} {i}번") for i in range(5)]
        await fake.wait_handled(updates[-1])
        await fake.wait_for(lambda: len(fake.replies_to(-100800)) == 5)

    times = [call.at for call in fake.calls_to("sendMessage", -100800, ok=False)]
    assert len(times) == 5
    assert all(later - earlier >= 0.1 for earlier, later in itertools.pairwise(times))


def test_token_bucket_reserves_in_order() -> None:
    now = [0.0]
    bucket = TokenBucket(Rate(per_second=20 / 60, burst=3), clock=lambda: now[0])
    assert [round(bucket.reserve(), 6) for _ in range(5)] == [0, 0, 0, 3, 6]
    now[0] = 9.0
    assert bucket.reserve() == 0


async def test_a_stuck_chat_blocks_nobody_else(
    fake: FakeTelegram, settings: Settings, tiny_backend: GenerationBackend
) -> None:
    """The offset never waits for a slow conversation: updates are stored, then confirmed at
    once, even while one chat's generation hangs and 150 more updates (over the 100 a
    `getUpdates` returns) arrive behind it."""
    slow = ScriptedBackend(tiny_backend, "빠른 답")
    slow.hold = True
    async with running(settings, slow):
        stuck = fake.send(private_chat(1701), user(1701), "오래 걸리는 질문")
        await asyncio.wait_for(slow.held.wait(), 20)
        slow.hold = False
        others = [
            fake.send(private_chat(1800 + i % 50), user(1800 + i % 50), f"{i}번")
            for i in range(150)
        ]
        await fake.wait_for(
            lambda: sum(len(fake.replies_to(1800 + i)) for i in range(50)) == 150, timeout_s=60
        )
        assert fake.confirmed > others[-1]["update_id"] > stuck["update_id"] >= 0
        assert fake.replies_to(1701) == []
        slow.release.set()
        await fake.wait_handled(stuck)
    assert fake.replies_to(1701) == ["빠른 답"]


def test_mentions_are_stripped_with_utf16_offsets() -> None:
    from telegram import MessageEntity

    me = BotIdentity.create(BOT_ID, BOT_USERNAME)
    text = f"😀😀 @{BOT_USERNAME} 안녕 @someone"
    entity = MessageEntity(MessageEntity.MENTION, offset=5, length=len(BOT_USERNAME) + 1)
    assert strip_mentions(text, (entity,), me) == "😀😀 안녕 @someone"


# Access control and limits


async def test_allowlists_admin_stats_and_rate_limit(
    fake: FakeTelegram, make_settings: Callable[..., Settings], backend: Wrapping
) -> None:
    group = group_chat(-100900)
    settings = make_settings(
        telegram_allowed_users=[801],
        telegram_allowed_chats=[-100900],
        rate_limit_per_minute=2,
    )
    allowed, stranger, admin = user(801), user(802), user(ADMIN_ID)
    async with running(settings, backend):
        fake.send(private_chat(802), stranger, "들여보내 주세요")
        fake.send(group, stranger, f"@{BOT_USERNAME} 여기서는 돼요?")
        fake.send(private_chat(ADMIN_ID), admin, "/stats")
        for text in ("/stats", "하나", "둘", "셋"):
            last = fake.send(private_chat(801), allowed, text)
        await fake.wait_handled(last)

    assert fake.replies_to(802) == []
    assert len(fake.replies_to(-100900)) == 1
    (stats,) = fake.replies_to(ADMIN_ID)
    assert "메시지" in stats and "Telegram updates in flight" in stats
    replies = fake.replies_to(801)
    assert replies[0] == texts.NOT_ADMIN
    assert replies[3].startswith(texts.RATE_LIMITED.split("{")[0])


async def test_typing_is_refreshed_while_generating(
    fake: FakeTelegram, settings: Settings, tiny_backend: GenerationBackend
) -> None:
    slow = ScriptedBackend(tiny_backend)
    slow.hold = True
    options = replace(OPTIONS, typing_interval_s=0.05)
    async with running(settings, slow, options):
        update = fake.send(private_chat(901), user(901), "천천히 생각해 봐")
        await fake.wait_for(lambda: len(fake.calls_to("sendChatAction", 901)) >= 3)
        slow.release.set()
        await fake.wait_handled(update)

    (sent,) = fake.calls_to("sendMessage", 901)
    assert len([c for c in fake.calls_to("sendChatAction", 901) if c.at < sent.at]) >= 3


# Start-up


async def test_bad_token_stops_start_up_in_one_line(
    fake: FakeTelegram,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = "123456:this-token-is-wrong"
    with pytest.raises(StartupError) as error:
        await run_telegram(make_settings(telegram_token=bad))
    assert "KOBOT_TELEGRAM_TOKEN" in str(error.value) and bad not in str(error.value)
    assert fake.calls_to("getMe", ok=False)[0].status == 401
    assert not fake.calls_to("getUpdates", ok=False)

    with pytest.raises(StartupError, match="not set"):
        await asyncio.to_thread(main, make_settings(telegram_token=None))

    nowhere = make_settings(telegram_base_url="http://127.0.0.1:9/bot")
    with pytest.raises(StartupError, match=r"cannot reach the Telegram Bot API at 127\.0\.0\.1:9"):
        await run_telegram(nowhere)

    env = tmp_path / "bad.env"
    env.write_text(
        f"KOBOT_MODEL={tmp_path / 'no-model-needed'}\n"
        f"KOBOT_DATABASE_URL=sqlite+aiosqlite:///{tmp_path / 'cli.db'}\n"
        f"KOBOT_TELEGRAM_TOKEN={bad}\nKOBOT_TELEGRAM_BASE_URL={fake.base_url}\n"
    )
    status = await asyncio.to_thread(cli_main, ["--env-file", str(env), "telegram"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("\n") == 1 and "KOBOT_TELEGRAM_TOKEN" in err and bad not in err


async def test_token_never_reaches_the_logs(
    fake: FakeTelegram,
    settings: Settings,
    backend: Wrapping,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("httpx").setLevel(logging.NOTSET)
    async with running(settings, backend):
        assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
        logging.getLogger("kobot.test").warning("a careless line with %s in it", TOKEN)
        update = fake.send(private_chat(951), user(951), "로그 확인")
        await fake.wait_handled(update)
    assert "a careless line with *** in it" in caplog.text
    assert TOKEN not in caplog.text
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


async def test_run_telegram_serves_until_stopped(
    fake: FakeTelegram, settings: Settings, tiny_backend: GenerationBackend
) -> None:
    """The `kobot telegram` entry point: token check, model load, polling, clean stop."""
    stop = asyncio.Event()
    serving = asyncio.create_task(run_telegram(settings, OPTIONS, stop))
    update = fake.send(private_chat(961), user(961), "진짜 진입점으로 안녕")
    await fake.wait_handled(update)
    stop.set()
    assert await asyncio.wait_for(serving, 20) == 0
    assert len(fake.replies_to(961)) == 1
    assert fake.confirmed > update["update_id"]


# Scale and restarts


async def test_twenty_users_at_once_each_get_their_replies_in_order(
    fake: FakeTelegram, settings: Settings, backend: Wrapping
) -> None:
    people = [user(1000 + i) for i in range(20)]
    firsts = {p["id"]: f"안녕하세요, 저는 {i}번 사용자예요" for i, p in enumerate(people)}
    seconds = {p["id"]: f"{i}번 사용자의 두 번째 질문이에요" for i, p in enumerate(people)}
    async with running(settings, backend) as adapter:
        started = time.monotonic()
        for p in people:
            fake.send(private_chat(p["id"]), p, firsts[p["id"]])
        for p in people:
            fake.send(private_chat(p["id"]), p, seconds[p["id"]])
        await fake.wait_for(
            lambda: all(len(fake.replies_to(p["id"])) == 2 for p in people), timeout_s=60
        )
        stored = {p["id"]: await turns_of(adapter, p["id"], p["id"]) for p in people}

    for p in people:
        turns = stored[p["id"]]
        assert texts_of(turns, Role.USER) == [firsts[p["id"]], seconds[p["id"]]]
        assert texts_of(turns, Role.AI) == fake.replies_to(p["id"])
    assert all(call.ok for call in fake.calls_to("sendMessage", ok=False))
    first_latency = [fake.calls_to("sendMessage", p["id"])[0].at - started for p in people]
    all_done = max(fake.calls_to("sendMessage", p["id"])[1].at for p in people) - started
    print(
        f"\n20 simultaneous users: first reply p50 {statistics.median(first_latency):.3f}s, "
        f"max {max(first_latency):.3f}s; all 40 replies sent after {all_done:.3f}s"
    )


async def test_restart_neither_loses_nor_repeats_an_answer(
    fake: FakeTelegram, settings: Settings, tiny_backend: GenerationBackend
) -> None:
    erin, chat = user(1501), private_chat(1501)
    first_life = ScriptedBackend(tiny_backend)
    options = replace(OPTIONS, drain_timeout_s=0.2)
    async with running(settings, first_life, options):
        answered = fake.send(chat, erin, "첫 번째 메시지예요")
        await fake.wait_handled(answered)
        first_life.hold = True
        interrupted = fake.send(chat, erin, "두 번째 메시지예요")
        await asyncio.wait_for(first_life.held.wait(), 20)
    # The first process stopped mid-generation: the second update was stored and confirmed,
    # but not finished; it waits in the inbox.
    assert fake.confirmed > interrupted["update_id"]
    assert len(fake.replies_to(1501)) == 1
    # Pretend Telegram also lost the confirmations (a crash before the next getUpdates).
    fake.rewind(answered["update_id"])
    while_down = fake.send(chat, erin, "세 번째 메시지예요")

    async with running(settings, Wrapping(tiny_backend)) as adapter:
        await fake.wait_handled(while_down)
        await fake.wait_handled(interrupted)
        turns = await turns_of(adapter, 1501, 1501)
        pending = await adapter.manager.storage.inbox_pending("telegram")

    replies = fake.replies_to(1501)
    assert texts_of(turns, Role.USER) == [
        "첫 번째 메시지예요",
        "두 번째 메시지예요",
        "세 번째 메시지예요",
    ]
    assert texts_of(turns, Role.AI) == replies
    assert pending == []


async def test_a_reply_stored_but_not_sent_is_sent_from_storage(
    fake: FakeTelegram, settings: Settings, tiny_backend: GenerationBackend
) -> None:
    """The outbox: the reply was stored, then every send failed (the bot died, in effect):
    the next start sends the stored reply without generating again, then marks it sent."""
    chat, ivy = private_chat(1901), user(1901)
    fake.fail_next("sendMessage", status=502, retry_after=None, times=4)  # all 4 attempts
    first_life = ScriptedBackend(tiny_backend, "저장된 답")
    options = replace(OPTIONS, send_attempts=4)
    async with running(settings, first_life, options) as adapter:
        update = fake.send(chat, ivy, "답을 기다려요")
        await fake.wait_handled(update, timeout_s=30)
        stored = await adapter.manager.storage.reply_to(
            key(1901, 1901), f"1901:{message_id(update)}"
        )
        pending = await adapter.manager.storage.inbox_pending("telegram")
    assert fake.replies_to(1901) == []
    assert stored is not None and stored.delivery == "pending"
    assert [item.item_id for item in pending] == [str(update["update_id"])]

    second_life = ScriptedBackend(tiny_backend, "새로 만든 답 (보내지면 안 됨)")
    async with running(settings, second_life) as adapter:
        await fake.wait_for(lambda: len(fake.replies_to(1901)) == 1)
        await fake.wait_handled(update)
        stored = await adapter.manager.storage.reply_to(
            key(1901, 1901), f"1901:{message_id(update)}"
        )
        pending = await adapter.manager.storage.inbox_pending("telegram")
    (sent,) = fake.calls_to("sendMessage", 1901)
    assert sent.text == "저장된 답"
    assert stored is not None and stored.delivery == "sent"
    assert stored.sent_ids == (str(sent.result["message_id"]),)
    assert pending == []


async def test_a_retry_redelivered_after_a_restart_is_sent_from_storage(
    fake: FakeTelegram, settings: Settings, tiny_backend: GenerationBackend
) -> None:
    """/retry stored its new answer, then every send failed: the next start answers the
    redelivered /retry with that stored answer; nothing is generated or replaced again."""
    chat, kim = private_chat(1971), user(1971)
    first_life = ScriptedBackend(tiny_backend, "처음 답")
    async with running(settings, first_life, replace(OPTIONS, send_attempts=4)):
        await fake.wait_handled(fake.send(chat, kim, "안녕하세요"))
        first_life.reply = "다시 한 답"
        fake.fail_next("sendMessage", status=502, retry_after=None, times=4)
        retry = fake.send(chat, kim, "/retry")
        await fake.wait_handled(retry, timeout_s=30)
    assert fake.replies_to(1971) == ["처음 답"]

    second_life = ScriptedBackend(tiny_backend, "세 번째 답 (만들면 안 됨)")
    async with running(settings, second_life) as adapter:
        await fake.wait_for(lambda: len(fake.replies_to(1971)) == 2)
        await fake.wait_handled(retry)
        turns = await turns_of(adapter, 1971, 1971)
        pending = await adapter.manager.storage.inbox_pending("telegram")
        stored = await adapter.manager.storage.reply_to(
            key(1971, 1971), f"1971:{message_id(retry)}"
        )
    assert fake.replies_to(1971) == ["처음 답", "다시 한 답"]
    assert texts_of(turns, Role.AI) == ["다시 한 답"]
    assert stored is not None and stored.delivery == "sent"
    assert pending == []


async def test_a_retry_sent_but_not_finished_is_not_answered_again(
    fake: FakeTelegram,
    settings: Settings,
    tiny_backend: GenerationBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/retry was answered, then the process died before its update was finished: after the
    restart the update is handled again, and neither answers nor changes the reply again."""
    chat, lee = private_chat(1981), user(1981)
    first_life = ScriptedBackend(tiny_backend, "처음 답")
    async with running(settings, first_life) as adapter:
        await fake.wait_handled(fake.send(chat, lee, "안녕하세요"))
        first_life.reply = "다시 한 답"

        async def died_before_finishing(platform: str, item_id: str) -> None:
            raise StorageError("the process died here")

        monkeypatch.setattr(adapter.manager.storage, "inbox_done", died_before_finishing)
        retry = fake.send(chat, lee, "/retry")
        await fake.wait_for(lambda: len(fake.replies_to(1981)) == 2)
        await fake.wait_handled(retry)

    second_life = ScriptedBackend(tiny_backend, "세 번째 답 (만들면 안 됨)")
    async with running(settings, second_life) as adapter:
        async with asyncio.timeout(20):
            while await adapter.manager.storage.inbox_pending("telegram"):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        turns = await turns_of(adapter, 1981, 1981)
    assert fake.replies_to(1981) == ["처음 답", "다시 한 답"]
    assert texts_of(turns, Role.AI) == ["다시 한 답"]


async def test_a_blocked_bot_marks_the_reply_failed_for_good(
    fake: FakeTelegram, settings: Settings, backend: Wrapping
) -> None:
    chat, jay = private_chat(1951), user(1951)
    fake.fail_next("sendMessage", status=403, retry_after=None)
    async with running(settings, backend) as adapter:
        update = fake.send(chat, jay, "차단하기 전에 한 말")
        await fake.wait_handled(update)
        stored = await adapter.manager.storage.reply_to(
            key(1951, 1951), f"1951:{message_id(update)}"
        )
        pending = await adapter.manager.storage.inbox_pending("telegram")
    assert stored is not None and stored.delivery == "failed"
    assert pending == []
    assert len(fake.calls_to("sendMessage", 1951, ok=False)) == 1  # never retried


async def test_commands_followed_by_a_line_break(
    fake: FakeTelegram, settings: Settings, backend: Wrapping
) -> None:
    """`/help\\n…` is /help (Telegram's entity says so) in a private chat and in a group."""
    hana, group = user(1601), group_chat(-101600)
    async with running(settings, backend) as adapter:
        fake.send(private_chat(1601), hana, "/help\n두 번째 줄")
        fake.send(group, hana, "/help\n그룹에서도")
        last = fake.send(private_chat(1601), hana, "/persona\n친절한\n선생님")
        await fake.wait_handled(last)
        persona = await adapter.manager.storage.get_persona(key(1601, 1601))

    assert fake.replies_to(1601) == [
        texts.help_text(),
        texts.PERSONA_SET.format(persona="친절한 선생님"),
    ]
    assert fake.replies_to(-101600) == [texts.help_text()]
    assert persona == "친절한 선생님"


async def test_no_plain_id_in_any_log_line(
    fake: FakeTelegram,
    make_settings: Callable[..., Settings],
    backend: Wrapping,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ignored users, refused and failing sends, duplicates: every line hashes the ids (the
    soak test scans a real process's log the same way)."""
    caplog.set_level(logging.DEBUG)
    settings = make_settings(telegram_allowed_users=[7_770_001, 7_770_002])
    allowed, refused, stranger = user(7_770_001), user(7_770_002), user(7_770_003)
    fake.fail_next("sendMessage", status=403, retry_after=None)
    fake.fail_next("sendMessage", status=429, retry_after=1)
    async with running(settings, backend):
        fake.send(private_chat(7_770_003), stranger, "누구세요")
        fake.send(group_chat(-1_007_770_004), allowed, "혼잣말")
        first = fake.send(private_chat(7_770_002), refused, "차단했어요")
        await fake.wait_handled(first)
        last = fake.send(private_chat(7_770_001), allowed, "안녕")
        await fake.wait_handled(last)
        fake.rewind(first["update_id"])  # delivered again: answered already
        await fake.wait_handled(last)
    ours = ("bots", "core", "storage", "kobot")  # at DEBUG, libraries log whole payloads
    text = "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.INFO or r.name.split(".")[0] in ours
    )
    assert "not in the allowlists" in text and "refused a message" in text
    assert "flood control" in text
    for plain in ("7770001", "7770002", "7770003", "1007770004"):
        assert plain not in text


async def test_an_update_that_cannot_be_stored_is_not_confirmed(
    fake: FakeTelegram,
    make_settings: Callable[..., Settings],
    backend: Wrapping,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Polling: the batch is fetched again (not confirmed) until the inbox takes it; webhook:
    a 500, so Telegram delivers it again."""

    def failing_once(storage: Any) -> None:
        real = storage.inbox_add
        calls = {"n": 0}

        async def inbox_add(items: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise StorageError("storing received updates failed: database is down")
            return await real(items)

        monkeypatch.setattr(storage, "inbox_add", inbox_add)

    options = replace(OPTIONS, polling=replace(OPTIONS.polling, error_backoff_s=0.3))
    async with running(make_settings(), backend, options) as adapter:
        failing_once(adapter.manager.storage)
        update = fake.send(private_chat(2001), user(2001), "저장이 안 되면?")
        await fake.wait_handled(update)
    offsets = [call.value("offset") for call in fake.calls_to("getUpdates")]
    assert offsets.count(None) >= 2  # fetched again from the same place before it was stored
    assert len(fake.replies_to(2001)) == 1

    settings = make_settings(
        telegram_webhook_url="https://bot.example.test/hook",
        telegram_webhook_listen="127.0.0.1",
        telegram_webhook_secret="s3cret-hook",
        database_url=make_settings().database_url.replace("kobot.db", "hook.db"),
    ).model_copy(update={"telegram_webhook_port": 0})
    update = {"update_id": 1, "message": fake.message(private_chat(2002), user(2002), "웹훅")}
    async with running(settings, backend) as adapter:
        failing_once(adapter.manager.storage)
        assert adapter.webhook is not None
        local = f"http://127.0.0.1:{adapter.webhook.port}/hook"
        assert await fake.post_webhook(local, update, "s3cret-hook") == 500
        assert await fake.post_webhook(local, update, "s3cret-hook") == 200
        await fake.wait_for(lambda: len(fake.replies_to(2002)) == 1)
