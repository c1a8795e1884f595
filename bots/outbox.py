"""How sending a reply ended, the same for every platform (the core's outbox records it)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    """Accepted; refused for good (chat gone, bot blocked, a bad request: trying again cannot
    help); or failed for now (network, flood limits past the retries)."""

    SENT = "sent"
    REFUSED = "refused"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Sent:
    """What a send did: its outcome and the ids of the messages the platform accepted."""

    outcome: Outcome
    ids: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SENT

    @classmethod
    def of(cls, ok: bool) -> Sent:
        return cls(Outcome.SENT if ok else Outcome.FAILED)
