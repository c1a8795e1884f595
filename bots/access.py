"""Who may talk to the bot, and where: one policy for every platform.

Each platform fills the lists it has (Telegram: users and chats; Discord: guilds, channels and
roles) and describes a message as a `Place`. With every list empty everyone is answered. Once
one is set, a message passes when its sender is an admin or a listed user (anywhere), or when
its place passes every place list that is set (the chat, or a thread's parent channel; the
guild; one of the sender's roles). A place the platform cannot tie to any of them (a Discord DM,
without the members intent) passes none.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import Settings


@dataclass(frozen=True, slots=True)
class Place:
    """Where a message was sent, as ids: its chats (a thread: also its parent channel), its
    guild, and the sender's roles there."""

    chats: frozenset[int] = frozenset()
    guild: int | None = None
    roles: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Allowlists (empty = anything) and the admins, who pass every list and may use `/stats`."""

    users: frozenset[int] = frozenset()
    chats: frozenset[int] = frozenset()
    guilds: frozenset[int] = frozenset()
    roles: frozenset[int] = frozenset()
    admins: frozenset[int] = frozenset()

    @classmethod
    def of(cls, settings: Settings, platform: str) -> AccessPolicy:
        """The policy `KOBOT_<PLATFORM>_ALLOWED_…` and `…_ADMIN_IDS` set (see `SETTINGS`)."""
        fields = SETTINGS[platform]
        return cls(**{name: frozenset(getattr(settings, field)) for name, field in fields.items()})

    @property
    def restricted(self) -> bool:
        return bool(self.users) or self._places_listed

    @property
    def _places_listed(self) -> bool:
        return bool(self.chats or self.guilds or self.roles)

    def allows(self, user_id: int, place: Place) -> bool:
        if not self.restricted or user_id in self.admins or user_id in self.users:
            return True
        return self._places_listed and self._place_allowed(place)

    def _place_allowed(self, place: Place) -> bool:
        return (
            (not self.chats or bool(self.chats & place.chats))
            and (not self.guilds or place.guild in self.guilds)
            and (not self.roles or bool(self.roles & place.roles))
        )


SETTINGS: dict[str, dict[str, str]] = {  # platform → policy list → the setting that fills it
    "telegram": {
        "users": "telegram_allowed_users",
        "chats": "telegram_allowed_chats",
        "admins": "telegram_admin_ids",
    },
    "discord": {
        "chats": "discord_allowed_channels",
        "guilds": "discord_allowed_guilds",
        "roles": "discord_allowed_roles",
        "admins": "discord_admin_ids",
    },
}
