"""One person across platforms: `/link` codes, linked accounts, and what they cover.

`/link` in a private chat (or an ephemeral Discord answer) gives a one-time code; `/link <code>`
sent from another account joins both accounts into one person. Codes are random
(`secrets`, 50 bits), live `KOBOT_LINK_CODE_TTL_S`, work once, and are stored only as a SHA-256
digest, so they are looked up by hash, never compared as text. Wrong codes are limited per
account (`WRONG_CODES_ALLOWED` per code lifetime), so they cannot be guessed by trying.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from core.dialogue import texts
from core.dialogue.commands import Command
from core.dialogue.ratelimit import RateLimiter
from core.messages import PERSON, ContextScope, IncomingMessage, Reply, ReplyKind, utc_now
from core.ops.logs import UserIds
from storage.base import Account, LinkCode, Storage, UserExport

log = logging.getLogger(__name__)

CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's base32: no I, L, O, U
CODE_LENGTH = 10  # 32**10 = 2**50 codes
WRONG_CODES_ALLOWED = 5
PERSON_COMMANDS = frozenset({Command.LINK, Command.UNLINK, Command.EXPORT, Command.FORGET})
PLATFORM_NAMES = {"telegram": "Telegram", "discord": "Discord", "console": "console"}


def new_code() -> str:
    """A fresh code, shown as two groups of five (`7KQ2M-XD4PA`)."""
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    return f"{raw[:5]}-{raw[5:]}"


def code_digest(code: str) -> str:
    """What is stored and looked up: the SHA-256 of the code as typed, case and dashes aside
    (Crockford's look-alikes read as the digits they resemble)."""
    typed = "".join(character for character in code.upper() if character.isalnum())
    canonical = typed.translate(str.maketrans("OIL", "011"))
    return hashlib.sha256(canonical.encode("ascii", "replace")).hexdigest()


def new_person_id() -> str:
    return secrets.token_hex(8)


def account_of(message: IncomingMessage) -> Account:
    return Account(message.platform, message.user_id)


def merged_export(message: IncomingMessage, exports: Sequence[UserExport]) -> UserExport:
    """One history file for every account of a person (conversation ids never collide: each
    starts with its platform, the shared one with `person`)."""
    merged = UserExport(message.platform, message.user_id)
    for export in exports:
        merged.conversations.update(export.conversations)
        merged.personas.update(export.personas)
    linked = tuple(Account(e.platform, e.user_id) for e in exports if e.platform != PERSON)
    return replace(merged, linked_accounts=linked if len(linked) > 1 else ())


class AccountLinks:
    """Links accounts into persons and tells which accounts a message speaks for."""

    def __init__(
        self,
        storage: Storage,
        code_ttl_s: float,
        scope: ContextScope,
        user_ids: UserIds,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.storage = storage
        self.code_ttl = timedelta(seconds=code_ttl_s)
        self.scope = scope
        self.user_ids = user_ids
        self.clock = clock
        self.wrong_codes = RateLimiter(WRONG_CODES_ALLOWED, window_s=code_ttl_s)

    async def resolved(
        self, message: IncomingMessage, command: Command | None = None
    ) -> IncomingMessage:
        """The message with the person its account belongs to (`person_id`), if linked.

        Looked up only where the person matters: every message in the `user` scope (it picks
        the conversation), and in the other scopes only the commands that act on the person."""
        if self.scope is not ContextScope.USER and command not in PERSON_COMMANDS:
            return message
        person = await self.storage.person_of(account_of(message))
        return replace(message, person_id=person or "")

    async def owners(self, message: IncomingMessage) -> list[Account]:
        """Whose data `/export` and `/forget` cover: every account of the person and the
        person's shared conversation; the sender's account alone when it is not linked."""
        if not message.person_id:
            return [account_of(message)]
        accounts = await self.storage.accounts_of(message.person_id)
        return [*accounts, Account(PERSON, message.person_id)]

    async def _accounts(self, message: IncomingMessage) -> list[Account]:
        if not message.person_id:
            return []
        return await self.storage.accounts_of(message.person_id)

    async def unlink_all(self, message: IncomingMessage) -> bool:
        """`/forget`: the links are data about the person too; False when there were none."""
        if not message.person_id:
            return False
        for account in await self.storage.accounts_of(message.person_id):
            await self.storage.unlink(account)
        return True

    # /link, /link <code>

    async def link(self, message: IncomingMessage, code: str) -> Reply:
        if not code:
            return await self._new_code(message)
        if self._too_many_wrong(message):
            minutes = max(1, round(self._wrong_wait(message) / 60))
            return Reply(texts.LINK_TOO_MANY.format(minutes=minutes), ReplyKind.NOTICE)
        issuer = await self.storage.link_code_take(code_digest(code), self.clock())
        if issuer is None:
            self.wrong_codes.allow(self._limit_key(message))
        if not message.answered_privately:
            shown = texts.LINK_CODE_SHOWN if issuer is not None else texts.LINK_PRIVATE_ONLY
            return Reply(shown, ReplyKind.NOTICE)
        if issuer is None:
            return Reply(texts.LINK_WRONG, ReplyKind.NOTICE)
        return await self._join(issuer, account_of(message))

    async def _new_code(self, message: IncomingMessage) -> Reply:
        if not message.answered_privately:
            return Reply(texts.LINK_PRIVATE_ONLY, ReplyKind.NOTICE)
        code = new_code()
        expires_at = self.clock() + self.code_ttl
        await self.storage.link_code_put(
            LinkCode(code_digest(code), account_of(message), expires_at)
        )
        minutes = max(1, round(self.code_ttl.total_seconds() / 60))
        return Reply(texts.LINK_CODE.format(code=code, minutes=minutes), ReplyKind.COMMAND)

    def _limit_key(self, message: IncomingMessage) -> str:
        return f"{message.platform}:{message.user_id}"

    def _too_many_wrong(self, message: IncomingMessage) -> bool:
        return self._wrong_wait(message) > 0

    def _wrong_wait(self, message: IncomingMessage) -> float:
        return self.wrong_codes.retry_after(self._limit_key(message))

    async def _join(self, issuer: Account, sender: Account) -> Reply:
        if issuer == sender:
            return Reply(texts.LINK_OWN_CODE, ReplyKind.NOTICE)
        first, second = await self.storage.person_of(issuer), await self.storage.person_of(sender)
        if first and second:
            answer = texts.LINK_ALREADY if first == second else texts.LINK_OTHER_PERSON
            return Reply(answer, ReplyKind.NOTICE)
        person = first or second or new_person_id()
        await self.storage.link(person, [issuer, sender])
        accounts = await self.storage.accounts_of(person)
        log.info(
            "linked %s:%s and %s:%s as one person (%d accounts)",
            issuer.platform,
            self.user_ids(issuer.platform, issuer.user_id),
            sender.platform,
            self.user_ids(sender.platform, sender.user_id),
            len(accounts),
        )
        return Reply(self._linked_text(accounts), ReplyKind.COMMAND)

    def _linked_text(self, accounts: Sequence[Account]) -> str:
        names = ", ".join(sorted({PLATFORM_NAMES.get(a.platform, a.platform) for a in accounts}))
        text = texts.LINK_DONE.format(platforms=names)
        if self.scope is not ContextScope.USER:
            text += "\n" + texts.LINK_NEEDS_USER_SCOPE
        return text

    # /unlink

    async def unlink(self, message: IncomingMessage, argument: str = "") -> Reply:
        """Take the sender's account out of its person. The last account stays: the person's
        shared conversation always has an owner whose `/forget` reaches it."""
        account = account_of(message)
        others = [a for a in await self._accounts(message) if a != account]
        if not others or not await self.storage.unlink(account):
            return Reply(texts.UNLINK_NOTHING, ReplyKind.NOTICE)
        log.info(
            "unlinked %s:%s",
            account.platform,
            self.user_ids(account.platform, account.user_id),
        )
        return Reply(texts.UNLINK_DONE, ReplyKind.COMMAND)
