"""Linked accounts and their one-time codes, on every backend."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from storage.base import Account, LinkCode, Storage

TELEGRAM = Account("telegram", "t1")
DISCORD = Account("discord", "d1")


def link_code(digest: str, account: Account = TELEGRAM, ttl_s: float = 600) -> LinkCode:
    return LinkCode(digest, account, datetime.now(UTC) + timedelta(seconds=ttl_s))


class TestLinkedAccounts:
    async def test_a_code_is_taken_once(self, storage: Storage) -> None:
        await storage.link_code_put(link_code("a" * 64))

        assert await storage.link_code_take("b" * 64, datetime.now(UTC)) is None
        assert await storage.link_code_take("a" * 64, datetime.now(UTC)) == TELEGRAM
        assert await storage.link_code_take("a" * 64, datetime.now(UTC)) is None

    async def test_an_expired_code_is_refused_and_gone(self, storage: Storage) -> None:
        await storage.link_code_put(link_code("a" * 64, ttl_s=60))

        later = datetime.now(UTC) + timedelta(seconds=61)
        assert await storage.link_code_take("a" * 64, later) is None
        assert await storage.link_code_take("a" * 64, datetime.now(UTC)) is None

    async def test_a_new_code_replaces_the_accounts_earlier_one(self, storage: Storage) -> None:
        await storage.link_code_put(link_code("a" * 64))
        await storage.link_code_put(link_code("c" * 64, DISCORD))
        await storage.link_code_put(link_code("b" * 64))

        now = datetime.now(UTC)
        assert await storage.link_code_take("a" * 64, now) is None
        assert await storage.link_code_take("b" * 64, now) == TELEGRAM
        assert await storage.link_code_take("c" * 64, now) == DISCORD

    async def test_two_takes_at_once_give_the_account_to_one(self, storage: Storage) -> None:
        await storage.link_code_put(link_code("a" * 64))

        now = datetime.now(UTC)
        taken = await asyncio.gather(*(storage.link_code_take("a" * 64, now) for _ in range(4)))
        assert sorted(taken, key=str) == [TELEGRAM, None, None, None]

    async def test_linked_accounts_share_a_person_until_unlinked(self, storage: Storage) -> None:
        assert await storage.person_of(TELEGRAM) is None
        await storage.link("p1", [TELEGRAM, DISCORD])
        await storage.link("p2", [Account("telegram", "t2")])

        assert await storage.person_of(TELEGRAM) == "p1"
        assert await storage.person_of(DISCORD) == "p1"  # a cache, if any, is warm after this
        assert await storage.accounts_of("p1") == [DISCORD, TELEGRAM]

        assert await storage.unlink(DISCORD) is True
        assert await storage.unlink(DISCORD) is False
        assert await storage.person_of(DISCORD) is None
        assert await storage.accounts_of("p1") == [TELEGRAM]
        assert await storage.accounts_of("nobody") == []

    async def test_linking_again_moves_an_account(self, storage: Storage) -> None:
        await storage.link("p1", [TELEGRAM])
        assert await storage.person_of(TELEGRAM) == "p1"  # cached, if a cache is there

        await storage.link("p2", [TELEGRAM, DISCORD])

        assert await storage.person_of(TELEGRAM) == "p2"
        assert await storage.accounts_of("p1") == []
        assert await storage.accounts_of("p2") == [DISCORD, TELEGRAM]
