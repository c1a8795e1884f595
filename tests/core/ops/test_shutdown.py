"""SIGTERM during a reply, with real `kobot chat` and `kobot telegram` processes and a generation
server the test holds: the reply is sent and stored, or (past KOBOT_SHUTDOWN_TIMEOUT_S, or on a
second signal) neither; never a stored turn whose reply was not sent. Also `/healthz`, `/metrics`
and `kobot health` of the live process, and the bot token never in its DEBUG output."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.kobot import (
    REPLY,
    START_TIMEOUT_S,
    Kobot,
    http_get,
    kobot_env,
    run_kobot,
    stored_turns,
    wait_until,
)
from tests.support.openai import Answer, FakeOpenAI
from tests.support.prometheus import parse_exposition, sample
from tests.support.services import closed_port
from tests.support.telegram import FakeTelegram, private_chat, user

STOPPING = "SIGTERM: stopping"


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAI]:
    gated = FakeOpenAI(Answer(REPLY), gated=True)
    await gated.start()
    yield gated
    await gated.stop()


async def start_chat(
    server: FakeOpenAI, model_dir: Path, workdir: Path, **settings: str
) -> tuple[Kobot, dict[str, str]]:
    env = kobot_env(model_dir, workdir, backend="openai", backend_url=server.url, **settings)
    return await Kobot.start(["chat"], env, workdir), env


async def asking(
    server: FakeOpenAI, model_dir: Path, workdir: Path, shutdown_timeout_s: str
) -> Kobot:
    """A `kobot chat` whose question the server holds: a reply in flight."""
    kobot, _ = await start_chat(server, model_dir, workdir, shutdown_timeout_s=shutdown_timeout_s)
    await kobot.send("오래 걸리는 질문")
    await asyncio.wait_for(server.arrived.wait(), 120)
    return kobot


async def ends_unanswered(kobot: Kobot, workdir: Path, code: int, note: str) -> None:
    """`kobot` exits with `code` and `note` on stderr, having shown and stored no reply."""
    out, err, returned = await kobot.finish(timeout_s=30)
    assert returned == code, err[-3000:]
    assert out == "" and note in err
    assert stored_turns(workdir / "kobot.db") == []


async def healthy(base: str) -> bool:
    status, _ = await http_get(f"{base}/healthz")
    return status == 200


async def test_sigterm_lets_the_reply_in_flight_finish_then_takes_nothing_more(
    server: FakeOpenAI, tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = closed_port()
    base = f"http://127.0.0.1:{port}"
    kobot, env = await start_chat(server, tiny_model_dir, tmp_path, metrics_port=str(port))
    async with kobot:
        await wait_until(lambda: healthy(base))
        out, err, code = await asyncio.to_thread(run_kobot, ["health"], env, tmp_path)
        assert code == 0 and json.loads(out)["status"] == "ok", err
        await kobot.send("안녕하세요")
        await asyncio.wait_for(server.arrived.wait(), 60)
        samples, _ = parse_exposition((await http_get(f"{base}/metrics"))[1])
        assert sample(samples, "kobot_in_flight") == 1
        assert sample(samples, "kobot_platform_connected", platform="console") == 1
        kobot.process.send_signal(signal.SIGTERM)
        await kobot.wait_for_stderr(STOPPING, 30)
        status, text = await http_get(f"{base}/healthz")
        assert status == 503 and json.loads(text)["status"] == "stopping"
        await kobot.send("이건 종료 신호 뒤에 보낸 메시지")  # after the signal: not taken
        await asyncio.sleep(0.3)
        server.gate.set()
        out, err, code = await kobot.finish()
    assert code == 0, err[-3000:]
    assert out.splitlines() == [REPLY]
    assert stored_turns(tmp_path / "kobot.db") == [("user", "안녕하세요"), ("ai", REPLY)]
    assert len(server.received) == 1


async def test_a_reply_past_the_bound_is_cancelled_and_not_stored(
    server: FakeOpenAI, tiny_model_dir: Path, tmp_path: Path
) -> None:
    kobot = await asking(server, tiny_model_dir, tmp_path, shutdown_timeout_s="1")
    started = time.monotonic()
    kobot.process.send_signal(signal.SIGTERM)
    await ends_unanswered(kobot, tmp_path, 0, "did not finish within 1 s")
    assert time.monotonic() - started < 15


async def test_a_second_signal_exits_at_once(
    server: FakeOpenAI, tiny_model_dir: Path, tmp_path: Path
) -> None:
    kobot = await asking(server, tiny_model_dir, tmp_path, shutdown_timeout_s="600")
    kobot.process.send_signal(signal.SIGTERM)
    await kobot.wait_for_stderr(STOPPING, 30)
    started = time.monotonic()
    kobot.process.send_signal(signal.SIGINT)
    await ends_unanswered(kobot, tmp_path, 128 + signal.SIGINT, "exiting now")
    assert time.monotonic() - started < 5


async def test_kobot_telegram_sends_the_reply_in_flight_after_sigterm(
    server: FakeOpenAI, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """At DEBUG, where PTB logs Bot API URLs (token included) and the token must not show."""
    token = "4242:CanaryTelegramTokenForShutdown"
    fake = await FakeTelegram(token).start()
    try:
        env = kobot_env(
            tiny_model_dir, tmp_path, backend="openai", backend_url=server.url,
            telegram_token=token, telegram_base_url=fake.base_url, log_level="DEBUG",
        )  # fmt: skip
        async with await Kobot.start(["telegram"], env, tmp_path) as kobot:
            update = fake.send(private_chat(77), user(77), "종료 직전의 질문")
            await asyncio.wait_for(server.arrived.wait(), START_TIMEOUT_S)
            kobot.process.send_signal(signal.SIGTERM)
            await kobot.wait_for_stderr(STOPPING, 30)
            later = fake.send(private_chat(78), user(78), "종료 신호 뒤의 질문")
            server.gate.set()
            out, err, code = await kobot.finish()
        assert code == 0, err[-3000:]
        assert fake.replies_to(77) == [REPLY] and fake.replies_to(78) == []
        assert fake.confirmed > update["update_id"] and fake.confirmed <= later["update_id"]
    finally:
        await fake.stop()
    assert stored_turns(tmp_path / "kobot.db") == [("user", "종료 직전의 질문"), ("ai", REPLY)]
    assert "getUpdates" in err and token not in out + err and token.split(":")[1] not in err
