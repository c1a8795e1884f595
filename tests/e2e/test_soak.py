"""Soak: many people chatting while the bot process is SIGKILLed and Redis is flushed.

A real `kobot telegram` subprocess (PTB, the tiny model through the backend factory,
PostgreSQL in a database of its own, Redis in a logical database of its own) against the fake
Bot API, which keeps unconfirmed updates and hands them out again as Telegram does. Each person
sends their next message once the previous one was answered. The bot is SIGKILLed while replies
are being generated and restarted at once; later its Redis database is flushed. Then: every
message got exactly one reply, every exchange was stored once, the inbox is empty, every reply
is marked sent, nobody waits more than one lock lease (plus a little) once the restarted bot is
ready, and no log line holds an id.

The webhook variant does the same with Telegram pushing updates (retrying until a 200).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from core.dialogue import texts
from core.messages import ConversationKey, Role
from storage.base import Delivery
from storage.sql import SqlStorage
from tests.support.kobot import Kobot, kobot_env
from tests.support.services import (
    POSTGRES_URL,
    asyncpg_dsn,
    closed_port,
    require_postgres,
    require_redis,
)
from tests.support.telegram import JSON, TOKEN, FakeTelegram, private_chat, user

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning"),
]
POLLING_STARTED = "long polling as"
WEBHOOK_STARTED = "telegram: webhook as"
MAX_WAIT_AFTER_READY_S = 20.0  # the killed process's 15 s lease, plus a few seconds
REPLY_TIMEOUT_S = 90.0
BAD_REPLIES = {texts.BUSY_TEXT, texts.STORAGE_FAILED, *texts.GENERATION_FAILED.values()}
SECRET = "soak-webhook-secret"
CLAIM = "soak:claim"  # marks a Redis logical database as taken by one soak run
SENT_REPLIES = "SELECT count(*) FROM turns WHERE role = 'ai' AND delivery = 'sent'"


@dataclass
class Person:
    """One private chat; `sent_at[i]` is when message i went out."""

    id: int
    messages: int
    sent_at: list[float] = field(default_factory=list)

    def text(self, index: int) -> str:
        return f"{self.id % 1000}번 사용자의 {index + 1}번째 말이에요"


@dataclass
class Figures:
    sent: int
    replied: int
    lost: int
    duplicated: int
    worst_wait_after_restart_s: float
    restart_took_s: float
    in_flight_at_kill: int
    sends_cut_by_the_kill: int


# --- the servers ------------------------------------------------------------------------------


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A database of its own (a subprocess cannot be given a schema's search_path)."""
    await require_postgres()
    name = f"soak_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(asyncpg_dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@asynccontextmanager
async def redis_database() -> AsyncIterator[str]:
    """An empty logical database of the shared Redis, for this run alone (FLUSHDB is safe)."""
    await require_redis()
    for number in range(15, 0, -1):
        client = Redis.from_url(f"redis://127.0.0.1:6379/{number}")
        try:
            if await client.dbsize() == 0 and await client.set(CLAIM, "1", nx=True):
                yield f"redis://127.0.0.1:6379/{number}"
                await client.flushdb()
                return
        finally:
            await client.aclose()
    pytest.skip("no empty Redis logical database for the soak test")


async def flush_redis(url: str) -> None:
    """What an operator's FLUSHDB does to the bot; the claim on the database is kept."""
    client = Redis.from_url(url)
    try:
        async with client.pipeline(transaction=True) as pipe:
            pipe.flushdb()
            pipe.set(CLAIM, "1")
            await pipe.execute()
    finally:
        await client.aclose()


# --- people -----------------------------------------------------------------------------------


async def chat(fake: FakeTelegram, person: Person, send: Callable[[JSON], Any]) -> None:
    """Send each message once the previous one got its reply."""
    for index in range(person.messages):
        person.sent_at.append(time.monotonic())
        update = fake.new_update(
            {"message": fake.message(private_chat(person.id), user(person.id), person.text(index))}
        )
        send(update)

        def answered(sent: int = index + 1) -> bool:
            return len(fake.replies_to(person.id)) >= sent

        await fake.wait_for(answered, REPLY_TIMEOUT_S)


def replied(fake: FakeTelegram, people: list[Person]) -> int:
    return sum(min(len(fake.replies_to(p.id)), p.messages) for p in people)


def figures(
    fake: FakeTelegram, people: list[Person], restarted_at: float, ready_at: float, in_flight: int
) -> Figures:
    waits = [0.0]
    for person in people:
        calls = fake.calls_to("sendMessage", person.id)
        for sent_at, call in zip(person.sent_at, calls, strict=False):
            if call.at > restarted_at:
                waits.append(call.at - max(sent_at, restarted_at))
    counts = [len(fake.replies_to(p.id)) for p in people]
    return Figures(
        sent=sum(len(p.sent_at) for p in people),
        replied=sum(min(c, p.messages) for c, p in zip(counts, people, strict=True)),
        lost=sum(max(p.messages - c, 0) for c, p in zip(counts, people, strict=True)),
        duplicated=sum(max(c - p.messages, 0) for c, p in zip(counts, people, strict=True)),
        worst_wait_after_restart_s=max(waits),
        restart_took_s=ready_at - restarted_at,
        in_flight_at_kill=in_flight,
        sends_cut_by_the_kill=fake.dropped_sends,
    )


async def until(condition: Callable[[], bool], fake: FakeTelegram, timeout_s: float) -> None:
    await fake.wait_for(condition, timeout_s)


# --- checks -----------------------------------------------------------------------------------


async def check_storage(database_url: str, fake: FakeTelegram, people: list[Person]) -> None:
    """Every exchange stored once, in order, its reply the one sent and marked sent; no
    unfinished update left in the inbox."""
    storage = await SqlStorage.create(database_url, upgrade=False)
    try:
        for person in people:
            key = ConversationKey("telegram", str(person.id), str(person.id))
            turns = await storage.recent(key, 1000)
            said = [t.text for t in turns if t.role is Role.USER]
            answers = [t.text for t in turns if t.role is Role.AI]
            assert said == [person.text(i) for i in range(person.messages)], person.id
            assert answers == fake.replies_to(person.id), person.id
            for turn in turns:
                if turn.role is Role.USER:
                    stored = await storage.reply_to(key, turn.message_id)
                    assert stored is not None and stored.delivery is Delivery.SENT
        assert await storage.inbox_pending("telegram") == []
    finally:
        await storage.close()


def check_logs(logs: str, people: list[Person]) -> None:
    """No plain user or chat id (a private chat's id is the user's) and no token, anywhere."""
    assert TOKEN not in logs and TOKEN.split(":")[1] not in logs
    leaked = [p.id for p in people if str(p.id) in logs]
    assert leaked == [], f"plain ids in the log: {leaked[:5]}"


def report(mode: str, result: Figures) -> None:
    print(
        f"\nsoak ({mode}): sent {result.sent}, replied {result.replied}, lost {result.lost}, "
        f"duplicated {result.duplicated}, waiting at the kill {result.in_flight_at_kill} "
        f"({result.sends_cut_by_the_kill} of them mid-send), "
        f"worst wait after the restart {result.worst_wait_after_restart_s:.1f}s "
        f"(the restart took {result.restart_took_s:.1f}s)"
    )


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Soak:
    fake: FakeTelegram
    env: dict[str, str]
    workdir: Path
    started_line: str
    database_url: str
    logs: list[str] = field(default_factory=list)

    async def start(self) -> Kobot:
        bot = await Kobot.start(["telegram"], self.env, self.workdir)
        await bot.wait_for_stderr(self.started_line)
        return bot

    async def kill_between_sends(self, bot: Kobot, people: list[Person]) -> int:
        """SIGKILL while replies are generated and sends are in flight, but not inside the
        few milliseconds between Telegram accepting a message and the outbox recording it:
        no Bot API can tell a restarted bot whether that send happened (see the README).
        Returns how many people were waiting for a reply."""
        self.fake.accepting_sends.clear()
        await self._outbox_settled(people)
        waiting = sum(len(p.sent_at) > len(self.fake.replies_to(p.id)) for p in people)
        bot.process.kill()
        await bot.process.wait()
        self.logs.append(bot.stderr)
        await asyncio.sleep(0.2)  # the dead process's sockets are closed by now
        self.fake.accepting_sends.set()
        return waiting

    async def _outbox_settled(self, people: list[Person]) -> None:
        """Until every reply Telegram accepted is marked sent in the database."""
        accepted = sum(len(self.fake.replies_to(p.id)) for p in people)
        connection = await asyncpg.connect(asyncpg_dsn(self.database_url))
        try:
            async with asyncio.timeout(20):
                while await connection.fetchval(SENT_REPLIES) < accepted:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)  # another process's database: nothing to await
        finally:
            await connection.close()

    async def stop(self, bot: Kobot) -> None:
        bot.process.send_signal(signal.SIGTERM)
        _, err, code = await bot.finish(timeout_s=60)
        self.logs.append(err)
        assert code == 0, err[-3000:]


async def run_soak(
    soak: Soak, people: list[Person], send: Callable[[JSON], Any], redis_url: str
) -> Figures:
    """Chat; SIGKILL at a third of the replies, restart at once; flush Redis at two thirds."""
    fake, total = soak.fake, sum(p.messages for p in people)
    bot = await soak.start()
    chatting = [asyncio.create_task(chat(fake, p, send)) for p in people]
    try:
        await until(lambda: replied(fake, people) >= total // 3, fake, REPLY_TIMEOUT_S)
        in_flight = await soak.kill_between_sends(bot, people)
        restarted_at = time.monotonic()
        bot = await soak.start()
        ready_at = time.monotonic()
        await until(lambda: replied(fake, people) >= 2 * total // 3, fake, REPLY_TIMEOUT_S)
        await flush_redis(redis_url)
        await asyncio.gather(*chatting)
        await asyncio.sleep(1.0)  # a duplicate, if any, would be sent by now
    finally:
        for task in chatting:
            task.cancel()
        if bot.process.returncode is None:
            await soak.stop(bot)
    return figures(fake, people, restarted_at, ready_at, in_flight)


def soak_env(
    model_dir: Path,
    workdir: Path,
    fake: FakeTelegram,
    database_url: str,
    redis_url: str,
    **extra: str,
) -> dict[str, str]:
    return kobot_env(
        model_dir, workdir, telegram_token=TOKEN, telegram_base_url=fake.base_url,
        database_url=database_url, redis_url=redis_url, rate_limit_per_minute="0",
        stream_replies="false", shutdown_timeout_s="5", **extra,
    )  # fmt: skip


@pytest.fixture
async def servers() -> AsyncIterator[tuple[str, str]]:
    async with postgres_database() as database_url, redis_database() as redis_url:
        yield database_url, redis_url


async def test_polling_soak_sigkill_restart_and_redis_flush(
    servers: tuple[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    database_url, redis_url = servers
    people = [Person(7_310_000 + i, messages=8) for i in range(40)]
    fake = await FakeTelegram().start()
    try:
        env = soak_env(tiny_model_dir, tmp_path, fake, database_url, redis_url)
        soak = Soak(fake, env, tmp_path, POLLING_STARTED, database_url)
        result = await run_soak(soak, people, fake.publish, redis_url)
    finally:
        await fake.stop()
    report("polling", result)
    for p in people:
        if len(fake.replies_to(p.id)) != p.messages:
            print(p.id, [(c.text, round(c.at, 2)) for c in fake.calls_to("sendMessage", p.id)])
    assert (result.lost, result.duplicated) == (0, 0)
    assert result.replied == result.sent == 320
    assert result.in_flight_at_kill > 0
    assert result.worst_wait_after_restart_s < result.restart_took_s + MAX_WAIT_AFTER_READY_S
    assert not BAD_REPLIES & {text for p in people for text in fake.replies_to(p.id)}
    await check_storage(database_url, fake, people)
    check_logs("".join(soak.logs), people)


class WebhookPusher:
    """Telegram's side of a webhook: each update is POSTed until the bot answers 200."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.tasks: set[asyncio.Task[None]] = set()
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    def push(self, update: JSON) -> None:
        task = asyncio.create_task(self._deliver(update))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _deliver(self, update: JSON) -> None:
        headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
        while True:
            try:
                async with self.session.post(self.url, json=update, headers=headers) as answer:
                    if answer.status == 200:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await self.session.close()


async def test_webhook_soak_sigkill_and_restart(
    servers: tuple[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    database_url, redis_url = servers
    people = [Person(7_320_000 + i, messages=5) for i in range(20)]
    port = closed_port()
    fake = await FakeTelegram().start()
    pusher = WebhookPusher(f"http://127.0.0.1:{port}/hook")
    try:
        env = soak_env(
            tiny_model_dir, tmp_path, fake, database_url, redis_url,
            telegram_webhook_url="https://bot.example.test/hook",
            telegram_webhook_listen="127.0.0.1", telegram_webhook_port=str(port),
            telegram_webhook_secret=SECRET,
        )  # fmt: skip
        soak = Soak(fake, env, tmp_path, WEBHOOK_STARTED, database_url)
        result = await run_soak(soak, people, pusher.push, redis_url)
    finally:
        await pusher.close()
        await fake.stop()
    report("webhook", result)
    assert (result.lost, result.duplicated) == (0, 0)
    assert result.replied == result.sent == 100
    assert result.worst_wait_after_restart_s < result.restart_took_s + MAX_WAIT_AFTER_READY_S
    await check_storage(database_url, fake, people)
    check_logs("".join(soak.logs), people)
