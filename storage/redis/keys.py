"""Every Redis key kobot uses, in one place (aiogram's KeyBuilder).

Layout (prefix `kobot` by default; the cache and the locks use these and no other keys):

    {prefix}:window:{conversation}   list   the newest turns since the last clear (bounded)
    {prefix}:meta:{conversation}     hash   v: version token, n: turns since the last clear,
                                            p: the persona as JSON (absent: not cached)
    {prefix}:user:{platform}:{user}  set    conversations whose cached window holds their turns
    {prefix}:lock:{conversation}     string the cross-process conversation lock (locks.py)
    {prefix}:person:{platform}:{user} string the person a linked account belongs to ("" none)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.messages import ConversationKey
from storage.base import Account

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


@dataclass(frozen=True, slots=True)
class RedisKeyBuilder:
    """Owns every Redis key kobot uses; several bots can share one Redis with distinct prefixes."""

    prefix: str = "kobot"
    separator: str = ":"

    def build(self, *parts: str) -> str:
        return self.separator.join((self.prefix, *parts))

    def window(self, key: ConversationKey) -> str:
        return self.build("window", key.as_id())

    def meta(self, key: ConversationKey) -> str:
        return self.build("meta", key.as_id())

    def user(self, platform: str, user_id: str) -> str:
        return self.build("user", platform, user_id)

    def lock(self, key: ConversationKey) -> str:
        return self.build("lock", key.as_id())

    def person(self, account: Account) -> str:
        return self.build("person", account.platform, account.user_id)

    def pattern(self, kind: str = "") -> str:
        """A SCAN pattern for every key of one kind (`window`, `meta`...) or of this prefix."""
        escaped = _GLOB_SPECIAL.sub(r"\\\1", self.build(kind) if kind else self.prefix)
        return f"{escaped}{self.separator}*"
