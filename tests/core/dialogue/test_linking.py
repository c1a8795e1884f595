"""One person across platforms, through a real DialogueManager (SQLite, the tiny GPT-2)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from core.dialogue import texts
from core.dialogue.linking import WRONG_CODES_ALLOWED, code_digest, new_code
from core.dialogue.manager import DialogueManager
from core.messages import ConversationKey, IncomingMessage, ReplyKind, utc_now
from storage.base import Account, Delivery
from tests.support.backends import RecordingBackend
from tests.support.dialogue import managed

CODE = re.compile(r"[0-9A-Z]{5}-[0-9A-Z]{5}")
TELEGRAM_USER, DISCORD_USER = "tg-user-777", "dc-user-888"

Chat = tuple[DialogueManager, RecordingBackend]


@pytest.fixture
async def chat(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[Chat]:
    async with managed(
        tiny_model_dir, tmp_path, context_scope="user", link_code_ttl_s=120
    ) as opened:
        yield opened


def on_telegram(text: str, chat: str = TELEGRAM_USER, **fields: Any) -> IncomingMessage:
    return IncomingMessage("telegram", TELEGRAM_USER, chat, text, **fields)


def on_discord(text: str, chat: str = "dm-1", **fields: Any) -> IncomingMessage:
    return IncomingMessage("discord", DISCORD_USER, chat, text, **fields)


async def code_from(manager: DialogueManager, message: IncomingMessage) -> str:
    reply = await manager.handle(message)
    found = CODE.search(reply.text)
    assert found is not None, reply.text
    return found.group()


async def link_both(manager: DialogueManager) -> None:
    code = await code_from(manager, on_telegram("/link"))
    reply = await manager.handle(on_discord(f"/link {code}"))
    assert reply.kind is ReplyKind.COMMAND, reply.text


def decoded(backend: RecordingBackend, index: int = -1) -> str:
    return backend.inner.tokenizer.decode(list(backend.requests[index].prompt_ids))  # type: ignore[attr-defined]


def test_codes_are_random_and_read_as_typed() -> None:
    codes = {new_code() for _ in range(200)}
    assert len(codes) == 200 and all(CODE.fullmatch(code) for code in codes)
    code = "7KQ20-XD41A"
    assert code_digest("7kq2o xd4la") == code_digest(code) == code_digest("7KQ20XD41A")
    assert code_digest("7KQ20-XD41B") != code_digest(code)
    assert len(code_digest(code)) == 64 and code not in code_digest(code)


async def test_linked_accounts_share_one_conversation(chat: Chat) -> None:
    manager, backend = chat
    code = await code_from(manager, on_telegram("/link"))
    linked = await manager.handle(on_discord(f"/연결 {code}"))  # the Korean alias
    assert linked.text == texts.LINK_DONE.format(platforms="Discord, Telegram")

    await manager.handle(on_telegram("텔레그램에서 한 말"))
    continued = on_discord("디스코드에서 이어서", message_id="m-1")
    assert (await manager.handle(continued)).pending_delivery
    await manager.delivered(continued, ["sent-1"])  # the adapter's message, not resolved

    assert "User: 텔레그램에서 한 말" in decoded(backend)
    person = await manager.storage.person_of(Account("telegram", TELEGRAM_USER))
    shared_key = ConversationKey("person", "", str(person))
    shared = await manager.storage.recent(shared_key, 10)
    assert [turn.text for turn in shared][::2] == ["텔레그램에서 한 말", "디스코드에서 이어서"]
    stored = await manager.storage.reply_to(shared_key, "m-1")
    assert stored is not None and stored.delivery is Delivery.SENT


async def test_a_code_works_once(chat: Chat) -> None:
    manager, _ = chat
    code = await code_from(manager, on_telegram("/link"))
    await manager.handle(on_discord(f"/link {code}"))

    again = await manager.handle(
        IncomingMessage("discord", "someone-else", "dm-2", f"/link {code}")
    )
    assert again.text == texts.LINK_WRONG
    assert await manager.storage.person_of(Account("discord", "someone-else")) is None


async def test_an_expired_code_is_refused(chat: Chat) -> None:
    manager, _ = chat
    code = await code_from(manager, on_telegram("/link"))
    manager.links.clock = lambda: utc_now() + timedelta(seconds=121)

    assert (await manager.handle(on_discord(f"/link {code}"))).text == texts.LINK_WRONG
    assert await manager.storage.person_of(Account("discord", DISCORD_USER)) is None


async def test_only_a_private_chat_or_an_ephemeral_answer_gets_a_code(chat: Chat) -> None:
    manager, _ = chat
    in_group = await manager.handle(on_telegram("/link", is_private=False, chat="group-1"))
    assert in_group.text == texts.LINK_PRIVATE_ONLY and not CODE.search(in_group.text)

    ephemeral = on_discord("/link", is_private=False, chat="channel-1", private_answer=True)
    assert CODE.search((await manager.handle(ephemeral)).text)


async def test_a_code_posted_in_a_group_is_cancelled(chat: Chat) -> None:
    manager, _ = chat
    code = await code_from(manager, on_telegram("/link"))

    shown = await manager.handle(on_discord(f"/link {code}", is_private=False, chat="ch"))
    assert shown.text == texts.LINK_CODE_SHOWN
    assert (await manager.handle(on_discord(f"/link {code}"))).text == texts.LINK_WRONG


async def test_wrong_codes_are_limited_per_account(chat: Chat) -> None:
    manager, _ = chat
    code = await code_from(manager, on_telegram("/link"))
    for attempt in range(WRONG_CODES_ALLOWED):
        wrong = await manager.handle(on_discord(f"/link AAAAA-AAAA{attempt}"))
        assert wrong.text == texts.LINK_WRONG

    blocked = await manager.handle(on_discord(f"/link {code}"))  # even the right one, for now
    assert blocked.text == texts.LINK_TOO_MANY.format(minutes=2)
    other = IncomingMessage("discord", "another-user", "dm-3", f"/link {code}")
    assert (await manager.handle(other)).kind is ReplyKind.COMMAND  # the limit is per account


async def test_own_code_and_already_linked_are_answered(chat: Chat) -> None:
    manager, _ = chat
    own = await code_from(manager, on_telegram("/link"))
    assert (await manager.handle(on_telegram(f"/link {own}"))).text == texts.LINK_OWN_CODE
    await link_both(manager)
    again = await code_from(manager, on_discord("/link"))
    assert (await manager.handle(on_telegram(f"/link {again}"))).text == texts.LINK_ALREADY


async def test_export_and_forget_cover_every_linked_account(chat: Chat) -> None:
    manager, backend = chat
    await manager.handle(on_discord("링크 전 디스코드"))  # before the link: discord's own
    await link_both(manager)
    await manager.handle(on_telegram("같이 쓰는 대화"))

    exported = await manager.handle(on_discord("/export"))
    assert exported.attachment is not None
    data = json.loads(exported.attachment.data)
    lines = [turn["text"] for turns in data["conversations"].values() for turn in turns]
    assert "링크 전 디스코드" in lines and "같이 쓰는 대화" in lines
    assert data["linked_accounts"] == [
        {"platform": "discord", "user_id": DISCORD_USER},
        {"platform": "telegram", "user_id": TELEGRAM_USER},
    ]

    forgot = await manager.handle(on_telegram("/forget"))
    assert forgot.text == texts.FORGET_TEXT.format(count=4) + texts.FORGET_UNLINKED
    for account in (Account("telegram", TELEGRAM_USER), Account("discord", DISCORD_USER)):
        left = await manager.storage.export_user(account.platform, account.user_id)
        assert left.conversations == {} and left.personas == {}
        assert await manager.storage.person_of(account) is None
    await manager.handle(on_discord("새로 시작"))
    assert "같이 쓰는 대화" not in decoded(backend)


async def test_unlink_gives_each_account_its_own_conversation_again(chat: Chat) -> None:
    manager, backend = chat
    await link_both(manager)
    await manager.handle(on_telegram("같이 쓰는 대화"))

    unlinked = await manager.handle(on_discord("/연결해제"))
    assert unlinked.text == texts.UNLINK_DONE
    await manager.handle(on_discord("이제 따로"))
    assert "같이 쓰는 대화" not in decoded(backend)
    await manager.handle(on_telegram("텔레그램은 계속"))
    assert "같이 쓰는 대화" in decoded(backend)  # the shared history stays with the other
    # the last account stays with the person, so its /forget still reaches that history
    assert (await manager.handle(on_telegram("/unlink"))).text == texts.UNLINK_NOTHING
    assert (await manager.handle(on_discord("/unlink"))).text == texts.UNLINK_NOTHING


async def test_logs_show_linked_ids_hashed(chat: Chat, caplog: pytest.LogCaptureFixture) -> None:
    manager, _ = chat
    caplog.set_level(logging.DEBUG, logger="core")
    caplog.set_level(logging.INFO)
    await link_both(manager)
    await manager.handle(on_discord("/unlink"))

    assert "linked" in caplog.text and "unlinked" in caplog.text
    assert TELEGRAM_USER not in caplog.text and DISCORD_USER not in caplog.text


async def test_help_lists_the_link_commands() -> None:
    help_text = texts.help_text()
    assert "/link [코드]" in help_text and "/unlink" in help_text


async def test_in_other_scopes_linking_covers_export_and_forget_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    scope = "user-in-chat"
    async with managed(tiny_model_dir, tmp_path, context_scope=scope) as (manager, backend):
        code = await code_from(manager, on_telegram("/link"))
        linked = await manager.handle(on_discord(f"/link {code}"))
        assert linked.text.endswith(texts.LINK_NEEDS_USER_SCOPE)
        await manager.handle(on_telegram("텔레그램에서 한 말"))
        await manager.handle(on_discord("디스코드는 따로"))
        assert "텔레그램에서 한 말" not in decoded(backend)  # each chat keeps its own context

        exported = await manager.handle(on_discord("/export"))
        assert exported.attachment is not None
        assert "텔레그램에서 한 말" in exported.attachment.data.decode()
