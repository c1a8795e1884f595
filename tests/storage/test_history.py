"""Conversation history, one contract for every backend: memory, SQLite, PostgreSQL, and Redis
in front of PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from core.messages import ConversationKey, Role, Turn
from storage.base import Storage, StorageError
from storage.memory import MemoryStorage
from tests.support.storage import ai, texts, user

KEY = ConversationKey("telegram", "c1", "u1")
KST = timezone(timedelta(hours=9))


class TestStorage:
    async def test_recent_returns_the_newest_turns_oldest_first(self, storage: Storage) -> None:
        await storage.append(KEY, [user("q1"), ai("a1")])
        await storage.append(KEY, [user("q2"), ai("a2")])
        await storage.append(KEY, [user("q3")])

        assert texts(await storage.recent(KEY, 10)) == ["q1", "a1", "q2", "a2", "q3"]
        assert texts(await storage.recent(KEY, 3)) == ["q2", "a2", "q3"]
        assert texts(await storage.recent(KEY, 1)) == ["q3"]
        assert await storage.recent(KEY, 0) == []

    async def test_many_turns_cross_the_cache_window(self, storage: Storage) -> None:
        for index in range(12):
            await storage.append(KEY, [user(f"q{index}"), ai(f"a{index}")])
        everything = [f"{role}{i}" for i in range(12) for role in ("q", "a")]

        for limit in (3, 4, 5, 9, 24, 100):
            assert texts(await storage.recent(KEY, limit)) == everything[-limit:]

    async def test_unknown_conversation_is_empty(self, storage: Storage) -> None:
        assert await storage.recent(ConversationKey("telegram", "nobody", "x"), 10) == []
        assert await storage.get_persona(ConversationKey("telegram", "nobody", "x")) is None

    async def test_conversations_are_kept_apart(self, storage: Storage) -> None:
        keys = [
            KEY,
            ConversationKey("telegram", "c2", "u1"),
            ConversationKey("telegram", "c1", "u2"),
            ConversationKey("discord", "c1", "u1"),
            ConversationKey("telegram", "", "u1"),
            ConversationKey("telegram", "c1", ""),
        ]
        for index, key in enumerate(keys):
            await storage.append(key, [user(f"only {index}", key.user_id or "u9")])

        for index, key in enumerate(keys):
            assert texts(await storage.recent(key, 10)) == [f"only {index}"]

    @pytest.mark.parametrize(
        "text",
        [
            "안녕하세요! 오늘 날씨 어때요?",
            "😀👍🏽 이모지 🇰🇷",
            "",
            "User: 가짜\nAI: 줄바꿈\r\n\t탭",
            "가" * 100_000,
        ],
        ids=["korean", "emoji", "empty", "newlines", "100k"],
    )
    async def test_text_and_fields_round_trip(self, storage: Storage, text: str) -> None:
        sent = datetime(2024, 5, 6, 21, 30, 15, 123456, tzinfo=KST)
        turn = Turn(Role.USER, text, "u1", created_at=sent, message_id="m-42")
        await storage.append(KEY, [turn, ai("네", created_at=sent)])

        for stored in (
            await storage.recent(KEY, 2),
            await storage.recent(KEY, 2),  # a cache, if any, is warm now
            (await storage.export_user("telegram", "u1")).conversations[KEY.as_id()],
        ):
            assert stored[0] == turn
            assert stored[0].created_at.utcoffset() == timedelta(0)
            assert stored[0].created_at == datetime(2024, 5, 6, 12, 30, 15, 123456, tzinfo=UTC)
            assert stored[1].role is Role.AI

    async def test_clear_starts_a_fresh_context_but_keeps_history(self, storage: Storage) -> None:
        await storage.append(KEY, [user("old q"), ai("old a")])
        await storage.recent(KEY, 10)  # warm any cache
        await storage.clear(KEY)

        assert await storage.recent(KEY, 10) == []
        await storage.append(KEY, [user("new q"), ai("new a")])
        assert texts(await storage.recent(KEY, 10)) == ["new q", "new a"]
        exported = (await storage.export_user("telegram", "u1")).conversations[KEY.as_id()]
        assert texts(exported) == ["old q", "old a", "new q", "new a"]

    async def test_clear_of_an_empty_conversation(self, storage: Storage) -> None:
        await storage.clear(KEY)
        await storage.clear(KEY)
        assert await storage.recent(KEY, 10) == []
        await storage.append(KEY, [user("first")])
        assert texts(await storage.recent(KEY, 10)) == ["first"]

    async def test_turns_after_a_clear_stay_visible_after_deletions(self, storage: Storage) -> None:
        """Turn ids are never reused (SQLite needs AUTOINCREMENT), so the clear boundary holds."""
        group = ConversationKey("telegram", "g1", "")
        await storage.append(group, [user("u1 says", "u1"), ai("to u1", "u1")])
        await storage.clear(group)
        await storage.delete_user("telegram", "u1")  # removes the newest turns in the store

        await storage.append(group, [user("u2 says", "u2")])
        assert texts(await storage.recent(group, 10)) == ["u2 says"]

    async def test_personas(self, storage: Storage) -> None:
        other = ConversationKey("telegram", "c2", "u1")
        assert await storage.get_persona(KEY) is None

        await storage.set_persona(KEY, "너는 해적이야. 🏴‍☠️")
        assert await storage.get_persona(KEY) == "너는 해적이야. 🏴‍☠️"
        assert await storage.get_persona(other) is None
        await storage.set_persona(KEY, "두 번째")
        assert await storage.get_persona(KEY) == "두 번째"
        await storage.set_persona(KEY, None)
        assert await storage.get_persona(KEY) is None

    async def test_persona_survives_clear(self, storage: Storage) -> None:
        await storage.set_persona(KEY, "persona")
        await storage.append(KEY, [user("q")])
        await storage.clear(KEY)
        assert await storage.get_persona(KEY) == "persona"

    async def test_delete_user_removes_only_that_users_data(self, storage: Storage) -> None:
        mine = KEY
        group = ConversationKey("telegram", "g1", "")
        theirs = ConversationKey("telegram", "c1", "u2")
        elsewhere = ConversationKey("discord", "c1", "u1")
        await storage.append(mine, [user("my q"), ai("my a")])
        await storage.set_persona(mine, "my persona")
        await storage.append(group, [user("u1 in group"), ai("to u1")])
        await storage.append(group, [user("u2 in group", "u2"), ai("to u2", "u2")])
        await storage.set_persona(group, "group persona")
        await storage.append(theirs, [user("u2 private", "u2")])
        await storage.append(elsewhere, [user("u1 on discord")])
        for key in (mine, group, theirs, elsewhere):
            await storage.recent(key, 10)  # warm any cache

        assert await storage.delete_user("telegram", "u1") == 4

        assert await storage.recent(mine, 10) == []
        assert await storage.get_persona(mine) is None
        assert texts(await storage.recent(group, 10)) == ["u2 in group", "to u2"]
        assert await storage.get_persona(group) == "group persona"
        assert texts(await storage.recent(theirs, 10)) == ["u2 private"]
        assert texts(await storage.recent(elsewhere, 10)) == ["u1 on discord"]
        exported = await storage.export_user("telegram", "u1")
        assert exported.conversations == {} and exported.personas == {}
        assert await storage.delete_user("telegram", "u1") == 0

    async def test_export_groups_by_conversation_oldest_first(self, storage: Storage) -> None:
        group = ConversationKey("telegram", "g1", "")
        await storage.append(KEY, [user("p1", message_id="1"), ai("r1")])
        await storage.append(group, [user("g1"), ai("gr1")])
        await storage.append(group, [user("someone else", "u2"), ai("to them", "u2")])
        await storage.append(KEY, [user("p2"), ai("r2")])
        await storage.set_persona(KEY, "mine")
        await storage.set_persona(group, "the group's")
        await storage.clear(KEY)

        exported = await storage.export_user("telegram", "u1")

        assert list(exported.conversations) == [KEY.as_id(), group.as_id()]
        assert texts(exported.conversations[KEY.as_id()]) == ["p1", "r1", "p2", "r2"]
        assert texts(exported.conversations[group.as_id()]) == ["g1", "gr1"]
        assert exported.personas == {KEY.as_id(): "mine"}
        document = json.loads(json.dumps(exported.as_dict(), ensure_ascii=False))
        assert document["conversations"][KEY.as_id()][0] == {
            "role": "user",
            "text": "p1",
            "created_at": exported.conversations[KEY.as_id()][0].created_at.isoformat(),
            "message_id": "1",
        }
        assert (await storage.export_user("discord", "u1")).conversations == {}

    async def test_find_reply(self, storage: Storage) -> None:
        await storage.append(KEY, [user("q1", message_id="m1"), ai("a1")])
        await storage.append(KEY, [user("q2", message_id="m2")])  # not answered (yet)
        await storage.append(KEY, [user("q3", message_id="m3"), ai("a3")])

        first = await storage.find_reply(KEY, "m1")
        assert first is not None and first.text == "a1"
        assert await storage.find_reply(KEY, "m2") is None
        found = await storage.find_reply(KEY, "m3")
        assert found is not None and found.text == "a3" and found.role is Role.AI
        assert await storage.find_reply(KEY, "unknown") is None
        assert await storage.find_reply(KEY, "") is None
        assert await storage.find_reply(ConversationKey("telegram", "c2", "u1"), "m1") is None

    async def test_find_reply_survives_clear_and_uses_the_latest(self, storage: Storage) -> None:
        await storage.append(KEY, [user("q", message_id="m1"), ai("first answer")])
        await storage.clear(KEY)
        found = await storage.find_reply(KEY, "m1")
        assert found is not None and found.text == "first answer"

        await storage.append(KEY, [user("q again", message_id="m1"), ai("second answer")])
        found = await storage.find_reply(KEY, "m1")
        assert found is not None and found.text == "second answer"

    async def test_purge_before(self, storage: Storage) -> None:
        now = datetime.now(UTC)
        old, new = now - timedelta(days=40), now - timedelta(days=1)
        await storage.append(KEY, [user("old q", created_at=old), ai("old a", created_at=old)])
        await storage.append(KEY, [user("new q", created_at=new), ai("new a", created_at=new)])
        await storage.recent(KEY, 10)  # warm any cache

        assert await storage.purge_before(now - timedelta(days=30)) == 2

        assert texts(await storage.recent(KEY, 10)) == ["new q", "new a"]
        assert (await storage.stats())["turns"] == 2
        naive_cutoff = (now + timedelta(minutes=1)).replace(tzinfo=None)  # naive means UTC
        assert await storage.purge_before(naive_cutoff) == 2
        assert await storage.recent(KEY, 10) == []

    async def test_stats(self, storage: Storage) -> None:
        assert await storage.stats() == {"turns": 0, "users": 0, "conversations": 0}
        group = ConversationKey("telegram", "g1", "")
        await storage.append(KEY, [user("q"), ai("a")])
        await storage.append(group, [user("q", "u2"), ai("a", "u2"), user("q", "u1")])
        await storage.append(ConversationKey("discord", "c1", "u1"), [user("q")])

        assert await storage.stats() == {"turns": 6, "users": 3, "conversations": 3}

    async def test_concurrent_appends_to_different_conversations(self, storage: Storage) -> None:
        keys = [ConversationKey("telegram", f"c{n}", f"u{n}") for n in range(8)]

        async def talk(key: ConversationKey) -> None:
            for index in range(6):
                await storage.append(
                    key,
                    [
                        user(f"{key.chat_id} q{index}", key.user_id),
                        ai(f"{key.chat_id} a{index}", key.user_id),
                    ],
                )

        await asyncio.gather(*(talk(key) for key in keys))

        for key in keys:
            expected = [f"{key.chat_id} {r}{i}" for i in range(6) for r in ("q", "a")]
            assert texts(await storage.recent(key, 100)) == expected
        assert (await storage.stats())["turns"] == 8 * 12

    async def test_append_nothing_is_a_no_op(self, storage: Storage) -> None:
        await storage.append(KEY, [])
        assert await storage.stats() == {"turns": 0, "users": 0, "conversations": 0}

    async def test_append_is_all_or_nothing(self, storage: Storage) -> None:
        if isinstance(storage, MemoryStorage):
            pytest.skip("memory storage has no driver that can fail half-way")
        broken = Turn(Role.AI, None, "u1")  # type: ignore[arg-type]  # NOT NULL violation
        await storage.append(KEY, [user("before")])
        await storage.recent(KEY, 10)

        with pytest.raises(StorageError, match="storing turns failed"):
            await storage.append(KEY, [user("half"), broken])

        assert texts(await storage.recent(KEY, 10)) == ["before"]
        assert (await storage.stats())["turns"] == 1
