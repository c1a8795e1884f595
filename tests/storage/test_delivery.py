"""The reply outbox and the update inbox, on every backend."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from core.messages import ConversationKey
from storage.base import Delivery, DeliveryRecord, InboxItem, Storage, StoredReply
from tests.support.storage import ai, texts, user

KEY = ConversationKey("telegram", "c1", "u1")


class TestOutbox:
    async def test_a_reply_is_pending_then_sent_with_its_ids(self, storage: Storage) -> None:
        await storage.append(KEY, [user("q1", message_id="m1"), ai("a1")], Delivery.PENDING)

        assert await storage.reply_to(KEY, "m1") == StoredReply("a1", Delivery.PENDING)
        assert await storage.set_delivery(KEY, DeliveryRecord("m1", Delivery.SENT, ("77", "78")))
        assert await storage.reply_to(KEY, "m1") == StoredReply("a1", Delivery.SENT, ("77", "78"))
        found = await storage.find_reply(KEY, "m1")
        assert found is not None and found.text == "a1"

    async def test_delivery_states_are_per_reply(self, storage: Storage) -> None:
        other = ConversationKey("telegram", "c2", "u1")
        await storage.append(KEY, [user("q1", message_id="m1"), ai("a1")], Delivery.PENDING)
        await storage.append(KEY, [user("q2", message_id="m2"), ai("a2")], Delivery.PENDING)
        await storage.append(other, [user("q1", message_id="m1"), ai("b1")], Delivery.PENDING)
        await storage.recent(KEY, 10)  # warm any cache

        assert await storage.set_delivery(KEY, DeliveryRecord("m2", Delivery.FAILED))

        assert await storage.reply_to(KEY, "m1") == StoredReply("a1", Delivery.PENDING)
        assert await storage.reply_to(KEY, "m2") == StoredReply("a2", Delivery.FAILED)
        assert await storage.reply_to(other, "m1") == StoredReply("b1", Delivery.PENDING)
        assert texts(await storage.recent(KEY, 10)) == ["q1", "a1", "q2", "a2"]

    async def test_replies_without_a_state_count_as_sent(self, storage: Storage) -> None:
        await storage.append(KEY, [user("q1", message_id="m1"), ai("a1")])
        await storage.append(KEY, [user("unanswered", message_id="m2")], Delivery.PENDING)

        assert await storage.reply_to(KEY, "m1") == StoredReply("a1", Delivery.SENT)
        assert await storage.reply_to(KEY, "m2") is None
        assert await storage.reply_to(KEY, "nope") is None
        assert not await storage.set_delivery(KEY, DeliveryRecord("m2", Delivery.SENT))
        assert not await storage.set_delivery(KEY, DeliveryRecord("", Delivery.SENT))

    async def test_the_state_follows_the_newest_asking(self, storage: Storage) -> None:
        """A message asked again after a /reset is answered (and delivered) anew."""
        await storage.append(KEY, [user("q", message_id="m1"), ai("old")], Delivery.PENDING)
        await storage.set_delivery(KEY, DeliveryRecord("m1", Delivery.SENT, ("1",)))
        await storage.clear(KEY)
        await storage.append(KEY, [user("q", message_id="m1"), ai("new")], Delivery.PENDING)

        assert await storage.reply_to(KEY, "m1") == StoredReply("new", Delivery.PENDING)


def inbox_item(item_id: str, lane: str = "c1", platform: str = "telegram") -> InboxItem:
    return InboxItem(platform, item_id, lane, json.dumps({"id": item_id, "text": "안녕 😀"}))


class TestInbox:
    async def test_items_are_stored_once_and_pending_in_order(self, storage: Storage) -> None:
        first = [inbox_item("3"), inbox_item("1", "c2"), inbox_item("2")]
        assert await storage.inbox_add(first) == first
        assert await storage.inbox_add([inbox_item("1", "c2"), inbox_item("4")]) == [
            inbox_item("4")
        ]
        assert await storage.inbox_add([inbox_item("5"), inbox_item("5")]) == [inbox_item("5")]

        assert await storage.inbox_pending("telegram") == [*first, inbox_item("4"), inbox_item("5")]
        assert await storage.inbox_pending("discord") == []

    async def test_done_items_are_not_pending_and_not_new_again(self, storage: Storage) -> None:
        await storage.inbox_add([inbox_item("1"), inbox_item("2"), inbox_item("1", platform="d")])
        await storage.inbox_done("telegram", "1")

        assert await storage.inbox_pending("telegram") == [inbox_item("2")]
        assert await storage.inbox_pending("d") == [inbox_item("1", platform="d")]
        assert await storage.inbox_add([inbox_item("1")]) == []
        await storage.inbox_done("telegram", "unknown")  # no error

    async def test_a_note_is_kept_with_an_unfinished_item(self, storage: Storage) -> None:
        await storage.inbox_add([inbox_item("1"), inbox_item("2")])
        await storage.inbox_note("telegram", "2", "4242")
        await storage.inbox_note("telegram", "unknown", "x")  # no error

        pending = await storage.inbox_pending("telegram")
        assert [(item.item_id, item.note) for item in pending] == [("1", ""), ("2", "4242")]
        assert pending[1].payload == inbox_item("2").payload

    async def test_prune_forgets_only_finished_items(self, storage: Storage) -> None:
        await storage.inbox_add([inbox_item("1"), inbox_item("2")])
        await storage.inbox_done("telegram", "1")

        assert await storage.inbox_prune(datetime.now(UTC) - timedelta(hours=1)) == 0
        assert await storage.inbox_prune(datetime.now(UTC) + timedelta(minutes=1)) == 1
        assert await storage.inbox_pending("telegram") == [inbox_item("2")]
        assert await storage.inbox_add([inbox_item("1")]) == [inbox_item("1")]
