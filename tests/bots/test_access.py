"""One access policy: Telegram's lists (users or chats) and Discord's (guild, channel, role)."""

from __future__ import annotations

from bots.access import AccessPolicy, Place

ADMIN, ALICE, BOB = 1, 2, 3
CHAT, OTHER_CHAT, GUILD, ROLE = 100, 101, 200, 300


def test_no_list_lets_everyone_in_everywhere() -> None:
    assert AccessPolicy().allows(BOB, Place())


def test_a_listed_user_passes_anywhere_and_a_listed_chat_lets_anyone_in() -> None:
    policy = AccessPolicy(users=frozenset({ALICE}), chats=frozenset({CHAT}))
    assert policy.allows(ALICE, Place(frozenset({OTHER_CHAT})))
    assert policy.allows(BOB, Place(frozenset({CHAT})))
    assert not policy.allows(BOB, Place(frozenset({OTHER_CHAT})))


def test_users_alone_keep_everyone_else_out() -> None:
    policy = AccessPolicy(users=frozenset({ALICE}), admins=frozenset({ADMIN}))
    assert not policy.allows(BOB, Place(frozenset({CHAT})))
    assert policy.allows(ADMIN, Place(frozenset({CHAT})))


def test_every_place_list_that_is_set_must_pass() -> None:
    policy = AccessPolicy(guilds=frozenset({GUILD}), roles=frozenset({ROLE}))
    assert policy.allows(BOB, Place(frozenset({CHAT}), GUILD, frozenset({ROLE})))
    assert not policy.allows(BOB, Place(frozenset({CHAT}), GUILD))
    assert not policy.allows(BOB, Place(frozenset({CHAT}), GUILD + 1, frozenset({ROLE})))


def test_a_place_tied_to_nothing_passes_no_list_but_admins_pass() -> None:
    policy = AccessPolicy(chats=frozenset({CHAT}), admins=frozenset({ADMIN}))
    assert not policy.allows(BOB, Place())
    assert policy.allows(ADMIN, Place())
