"""`bots.base`: the one in-flight mechanism and the one start-up order, on a recording platform."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bots.base import InFlight, run_platform
from core.dialogue.manager import DialogueManager
from core.errors import StartupError
from core.ops.lifecycle import Shutdown
from tests.support.dialogue import make_manager, make_settings


async def test_a_drain_waits_for_what_finishes_in_time_and_cancels_the_rest() -> None:
    in_flight = InFlight()
    release = asyncio.Event()

    async def quick() -> str:
        await release.wait()
        return "done"

    finished = in_flight.spawn(quick())
    stuck = in_flight.spawn(asyncio.Event().wait())
    release.set()
    assert await in_flight.drain(0.05) is False
    assert finished.result() == "done" and stuck.cancelled() and in_flight.count == 0


async def test_tracking_counts_the_current_task_until_the_block_ends() -> None:
    in_flight = InFlight()
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def event_handler() -> None:
        with in_flight.track():
            inside.set()
            await leave.wait()

    task = asyncio.create_task(event_handler())
    await inside.wait()
    assert in_flight.count == 1
    leave.set()
    await task
    assert in_flight.count == 0 and await in_flight.drain(0.0)


class Recorder:
    """A platform and its adapter, writing down each step."""

    name = "recorder"

    def __init__(self, fail_connect: bool = False) -> None:
        self.steps: list[str] = []
        self.fail_connect = fail_connect

    async def connect(self) -> None:
        self.steps.append("connect")
        if self.fail_connect:
            raise StartupError("bad token")

    def adapter_for(self, manager: DialogueManager, shutdown: Shutdown) -> Recorder:
        self.steps.append("adapter")
        return self

    async def disconnect(self) -> None:
        self.steps.append("disconnect")

    async def start(self) -> None:
        self.steps.append("start")

    async def run(self, stop: asyncio.Event) -> None:
        self.steps.append("run")

    async def drain(self, timeout_s: float) -> None:
        self.steps.append(f"drain {timeout_s:g}")

    def is_connected(self) -> bool:
        return True


async def test_start_up_and_shutdown_run_in_one_order(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(tiny_model_dir, tmp_path)
    manager, _ = await make_manager(settings)
    recorder = Recorder()
    try:
        await run_platform(settings, recorder, Shutdown(), 3.0, manager=manager)
    finally:
        await manager.close()
    assert recorder.steps == ["connect", "adapter", "start", "run", "drain 3", "disconnect"]


async def test_a_failed_check_stops_before_the_model_loads(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "no-model-here", tmp_path)
    recorder = Recorder(fail_connect=True)
    with pytest.raises(StartupError, match="bad token"):
        await run_platform(settings, recorder, Shutdown(), 1.0)
    assert recorder.steps == ["connect", "disconnect"]
