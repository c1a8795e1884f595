"""Fixtures for the dialogue and moderation tests: managers over the factory's local backend on
the tiny model, optionally scripted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bots.app import build_dialogue_manager
from core.dialogue.manager import DialogueManager
from tests.support.backends import RecordingBackend, Unclosed, close_now, engine_backend
from tests.support.dialogue import ManagerFactory, make_settings
from tests.support.scripts import RowScripts


@pytest.fixture(scope="module")
def scripted_local(tiny_model_dir: Path) -> Iterator[RowScripts]:
    """The engine backend as the factory ships it: candidates, streaming and scoring."""
    backend = engine_backend(tiny_model_dir)
    yield RowScripts(backend)
    close_now(backend)


@pytest.fixture
async def make_manager(
    scripted_local: RowScripts, tiny_model_dir: Path, tmp_path: Path
) -> AsyncIterator[ManagerFactory]:
    """`await make_manager(**settings)` → (manager, recording backend); closed afterwards."""
    scripted_local.script()
    managers: list[DialogueManager] = []

    async def make(**overrides: Any) -> tuple[DialogueManager, RecordingBackend]:
        settings = make_settings(tiny_model_dir, tmp_path, **overrides)
        backend = RecordingBackend(Unclosed(scripted_local.backend))
        manager = await build_dialogue_manager(settings, backend)
        managers.append(manager)
        return manager, backend

    yield make
    for manager in managers:
        await manager.close()
