"""One person across platforms: a Telegram user and a Discord user linked through both fakes.

Two bot "processes" (the real python-telegram-bot and discord.py adapters, each with its own
DialogueManager) share one SQLite file, as a deployment shares its database: the code made on
Telegram is redeemed on Discord, and the Discord prompt then carries the Telegram turn.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bots.discord.rendering import displayable
from core.dialogue import texts
from core.generation.base import GenerationBackend
from core.settings import Settings
from tests.e2e.test_discord import (
    TestBackend,
    contains_run,
    running_bot,
)
from tests.e2e.test_telegram import OPTIONS, running
from tests.support.discord import FakeDiscord
from tests.support.platforms import discord_settings
from tests.support.telegram import TOKEN, FakeTelegram, group_chat, private_chat, user

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
CODE = re.compile(r"[0-9A-Z]{5}-[0-9A-Z]{5}")
EPHEMERAL = 64


def shared_settings(
    fake_discord: FakeDiscord, fake_telegram: FakeTelegram, tmp_path: Path, model_dir: Path
) -> Settings:
    """Both platforms' settings over one database, the context following the person."""
    return discord_settings(
        fake_discord,
        tmp_path,
        model_dir,
        context_scope="user",
        telegram_token=TOKEN,
        telegram_base_url=fake_telegram.base_url,
    )


async def test_a_telegram_and_a_discord_user_become_one_person(
    fake_telegram: FakeTelegram,
    fake_discord: FakeDiscord,
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_backend: GenerationBackend,
) -> None:
    settings = shared_settings(fake_discord, fake_telegram, tmp_path, tiny_model_dir)
    telegram_backend, discord_backend = TestBackend(tiny_backend), TestBackend(tiny_backend)
    alice, alice_chat = user(101, "앨리스"), private_chat(101)
    async with (
        running(settings, telegram_backend, OPTIONS),
        running_bot(fake_discord, settings, discord_backend) as discord_side,
    ):
        assert {c["name"] for c in fake_discord.calls[2].body} >= {"link", "unlink"}
        in_group = fake_telegram.send(group_chat(-500), alice, "/link")
        await fake_telegram.wait_handled(in_group)
        assert fake_telegram.replies_to(-500) == [texts.LINK_PRIVATE_ONLY]

        fake_telegram.send(alice_chat, alice, "/연결")
        await fake_telegram.wait_for(lambda: len(fake_telegram.replies_to(101)) == 1)
        code_text = fake_telegram.replies_to(101)[0]
        found = CODE.search(code_text)
        assert found is not None and code_text.startswith("연결 코드:")

        alex = discord_side.person("알렉스")
        linking = await fake_discord.send_command(alex, "link", {"code": found.group()})
        answer = (await discord_side.answers(linking))[0]["body"]["data"]
        linked = texts.LINK_DONE.format(platforms="Discord, Telegram")
        assert answer["content"] == displayable(linked) and answer["flags"] & EPHEMERAL

        said = fake_telegram.send(alice_chat, alice, "텔레그램에서 한 말")
        await fake_telegram.wait_handled(said)
        assert len(fake_telegram.replies_to(101)) == 2
        later = await fake_discord.send_message(alex, "디스코드에서 이어서")
        await discord_side.replies(later)

        earlier_line = discord_backend.tokenizer.encode_text("User: 텔레그램에서 한 말\n")
        assert contains_run(discord_backend.requests[-1].prompt_ids, earlier_line)

        reused = await fake_discord.send_command(alex, "link", {"code": found.group()})
        again = (await discord_side.answers(reused))[0]["body"]["data"]["content"]
        assert again == displayable(texts.LINK_WRONG)  # a code works once

        unlinking = await fake_discord.send_command(alex, "unlink")
        unlinked = (await discord_side.answers(unlinking))[0]["body"]["data"]["content"]
        assert unlinked == displayable(texts.UNLINK_DONE)
        alone = await fake_discord.send_message(alex, "이제 따로 말해요")
        await discord_side.replies(alone)
        assert not contains_run(discord_backend.requests[-1].prompt_ids, earlier_line)
