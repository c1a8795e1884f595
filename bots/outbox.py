"""How sending a reply ended, the same for every platform, and how the core's outbox learns it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from core.dialogue.manager import DialogueManager
from core.messages import IncomingMessage, Reply


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


async def record(
    manager: DialogueManager, incoming: IncomingMessage, reply: Reply, sent: Sent
) -> None:
    """A stored reply (`pending_delivery`) becomes sent (with the platform's message ids) or
    refused for good; one that failed for now stays pending, sent from storage at the next
    start."""
    if not reply.pending_delivery:
        return
    if sent.outcome is Outcome.SENT:
        await manager.delivered(incoming, sent.ids)
    elif sent.outcome is Outcome.REFUSED:
        await manager.undeliverable(incoming)
