"""`replace_last_reply` (what `/retry` stores), against every backend."""

from __future__ import annotations

from datetime import UTC, datetime

from core.messages import ConversationKey, Role
from storage.base import Delivery, DeliveryRecord, Storage, StoredReply
from tests.support.storage import ai, texts, user

KEY = ConversationKey("telegram", "c1", "u1")
OTHER = ConversationKey("telegram", "c2", "u1")


async def test_the_newest_ai_turn_gets_the_new_text(storage: Storage) -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    await storage.append(KEY, [user("q1", message_id="m1"), ai("같은 답")])
    await storage.append(KEY, [user("q2", message_id="m2"), ai("같은 답", created_at=when)])
    await storage.append(OTHER, [user("q1"), ai("같은 답")])
    assert texts(await storage.recent(KEY, 10)) == ["q1", "같은 답", "q2", "같은 답"]  # cached

    assert await storage.replace_last_reply(KEY, "다른 답이에요")

    turns = await storage.recent(KEY, 10)
    assert texts(turns) == ["q1", "같은 답", "q2", "다른 답이에요"]
    assert turns[-1].role is Role.AI and turns[-1].user_id == "u1"
    assert turns[-1].created_at == when
    reply = await storage.find_reply(KEY, "m2")
    assert reply is not None and reply.text == "다른 답이에요"
    assert texts(await storage.recent(OTHER, 10)) == ["q1", "같은 답"]
    exported = (await storage.export_user("telegram", "u1")).conversations[KEY.as_id()]
    assert texts(exported)[-1] == "다른 답이에요"


async def test_twice_in_a_row_keeps_the_last_text(storage: Storage) -> None:
    await storage.append(KEY, [user("q"), ai("a")])
    assert await storage.replace_last_reply(KEY, "b")
    assert await storage.replace_last_reply(KEY, "c")
    assert texts(await storage.recent(KEY, 10)) == ["q", "c"]
    assert (await storage.stats())["turns"] == 2


async def test_nothing_changes_without_a_newest_ai_turn(storage: Storage) -> None:
    assert not await storage.replace_last_reply(KEY, "x")  # no conversation at all
    await storage.append(KEY, [user("q1"), ai("a1"), user("q2")])
    assert not await storage.replace_last_reply(KEY, "x")  # the newest turn is the user's
    assert texts(await storage.recent(KEY, 10)) == ["q1", "a1", "q2"]


async def test_a_reply_before_a_reset_is_not_replaced(storage: Storage) -> None:
    await storage.append(KEY, [user("q1"), ai("a1")])
    await storage.clear(KEY)
    assert not await storage.replace_last_reply(KEY, "x")
    exported = (await storage.export_user("telegram", "u1")).conversations[KEY.as_id()]
    assert texts(exported) == ["q1", "a1"]


async def test_a_retry_id_makes_the_reply_answer_the_retry_too(storage: Storage) -> None:
    """`/retry` stores its message id: a redelivered retry finds its answer (pending until
    sent), and the question's own lookups still find the same, newest text."""
    await storage.append(KEY, [user("q", message_id="m1"), ai("a")], Delivery.PENDING)
    assert await storage.set_delivery(KEY, DeliveryRecord("m1", Delivery.SENT, ("s1",)))
    assert await storage.reply_to(KEY, "r1") is None

    assert await storage.replace_last_reply(KEY, "b", message_id="r1")

    assert await storage.reply_to(KEY, "r1") == StoredReply("b", Delivery.PENDING)
    assert await storage.reply_to(KEY, "m1") == StoredReply("b", Delivery.PENDING)
    assert await storage.set_delivery(KEY, DeliveryRecord("r1", Delivery.SENT, ("s2",)))
    assert await storage.reply_to(KEY, "r1") == StoredReply("b", Delivery.SENT, ("s2",))
    assert await storage.replace_last_reply(KEY, "c", message_id="r2")
    assert await storage.find_reply(KEY, "r1") is None  # only the newest retry's id is kept
    assert await storage.reply_to(KEY, "r2") == StoredReply("c", Delivery.PENDING)
    assert texts(await storage.recent(KEY, 10)) == ["q", "c"]
    assert await storage.reply_to(OTHER, "r2") is None
