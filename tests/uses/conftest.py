"""Fixtures for the model's uses: the real LocalBackend on the tiny model, optionally scripted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.app import build_dialogue_manager
from core.dialogue import DialogueManager
from tests.core.dialogue_helpers import RecordingBackend, make_settings
from tests.uses.helpers import RowScriptedBackend, Unclosed

ManagerFactory = Callable[..., Any]


@pytest.fixture(scope="module")
def scripted_local(tiny_model_dir: Path) -> Iterator[RowScriptedBackend]:
    """The real LocalBackend (not the engine): candidates, streaming and scoring as shipped."""
    backend = RowScriptedBackend(str(tiny_model_dir), device="cpu")
    yield backend
    asyncio.run(backend.close())


@pytest.fixture
async def make_manager(
    scripted_local: RowScriptedBackend, tiny_model_dir: Path, tmp_path: Path
) -> AsyncIterator[ManagerFactory]:
    """`await make_manager(**settings)` → (manager, recording backend); closed afterwards."""
    scripted_local.script()
    managers: list[DialogueManager] = []

    async def make(**overrides: Any) -> tuple[DialogueManager, RecordingBackend]:
        settings = make_settings(tiny_model_dir, tmp_path, **overrides)
        backend = RecordingBackend(Unclosed(scripted_local))
        manager = await build_dialogue_manager(settings, backend)
        managers.append(manager)
        return manager, backend

    yield make
    for manager in managers:
        await manager.close()
