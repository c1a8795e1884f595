"""`UpdateDispatcher`: one conversation's updates in arrival order, others alongside; a drain
waits, then cancels what is left."""

from __future__ import annotations

import asyncio

from telegram import Update

from bots.telegram.dispatch import UpdateDispatcher


def update(update_id: int, chat_id: int, user_id: int) -> Update:
    message = {
        "message_id": update_id,
        "date": 0,
        "chat": {"id": chat_id, "type": "private"},
        "from": {"id": user_id, "is_bot": False, "first_name": "u"},
        "text": "hi",
    }
    return Update.de_json({"update_id": update_id, "message": message}, None)


class Gates:
    """Each update waits at its own gate; the order in which updates started is kept."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.arrived = asyncio.Event()

    async def process(self, update: Update) -> None:
        self.started.append(update.update_id)
        self.arrived.set()
        await self.gates.setdefault(update.update_id, asyncio.Event()).wait()

    def open(self, update_id: int) -> None:
        self.gates.setdefault(update_id, asyncio.Event()).set()

    async def until_started(self, count: int) -> None:
        while len(self.started) < count:
            self.arrived.clear()
            await self.arrived.wait()


async def test_one_conversation_waits_its_turn_while_another_goes_ahead() -> None:
    gates = Gates()
    dispatcher = UpdateDispatcher(gates.process, max_concurrent=8)
    first = dispatcher.submit(update(1, 10, 7))
    dispatcher.submit(update(2, 10, 7))  # same chat and person: after 1
    dispatcher.submit(update(3, 20, 8))  # another conversation: alongside
    await gates.until_started(2)
    assert gates.started == [1, 3] and dispatcher.in_flight == 3
    assert dispatcher.submit(update(1, 10, 7)) is first  # already running: the same task
    gates.open(1)
    await gates.until_started(3)
    assert gates.started == [1, 3, 2]
    gates.open(2)
    gates.open(3)
    await dispatcher.drain(5.0)
    assert dispatcher.in_flight == 0 and not dispatcher.is_running(2)


async def test_a_drain_cancels_what_does_not_finish_in_time() -> None:
    gates = Gates()
    dispatcher = UpdateDispatcher(gates.process, max_concurrent=8)
    stuck = dispatcher.submit(update(1, 10, 7))
    await gates.until_started(1)
    await dispatcher.drain(0.0)
    assert stuck.cancelled() and dispatcher.in_flight == 0
