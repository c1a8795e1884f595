"""Wiring: settings → storage, locks, backend → one DialogueManager."""

from __future__ import annotations

import asyncio

from core.dialogue.manager import DialogueManager
from core.dialogue.services import DialogueServices
from core.generation.base import GenerationBackend
from core.generation.factory import build_backend
from core.ops.logs import UserIds
from core.settings import Settings
from storage.factory import build_locks, build_storage
from storage.locks import ConversationLocks


async def build_dialogue_manager(
    settings: Settings, backend: GenerationBackend | None = None
) -> DialogueManager:
    """Connect storage, load the model (off the event loop) and return a ready manager."""
    storage = await build_storage(settings.storage_options())
    try:
        if backend is None:
            backend = await asyncio.to_thread(build_backend, settings)
        return DialogueManager(DialogueServices(settings, storage, backend, _locks(settings)))
    except BaseException:
        await storage.close()
        raise


def _locks(settings: Settings) -> ConversationLocks:
    ids = UserIds.from_settings(settings)
    return build_locks(settings.lock_options(), describe_key=ids.conversation)
