"""Replies that grow while they are generated: who listens, and generation that feeds them.

An adapter that can edit its messages calls `DialogueManager.handle_stream(message, on_partial)`;
for the rest of that task, `generate` below streams from the backend and hands each partial
reply (formatted like the final one) to `on_partial`. The listener is a context variable, so it
follows the one request through the dialogue manager without every method passing it along,
and concurrent requests never see each other's listener.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from core.generation.base import (
    GenerationBackend,
    GenerationError,
    GenerationErrorKind,
    GenerationRequest,
    GenerationResult,
)

PartialCallback = Callable[[str], None]
"""Gets the reply so far, as the user will see it. Called on the event loop; must not block."""

_listener: ContextVar[PartialCallback | None] = ContextVar("kobot_partial_listener", default=None)


@contextmanager
def partials_to(callback: PartialCallback | None) -> Iterator[None]:
    """Send partial replies generated inside the block (in this task) to `callback`."""
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)


def streaming() -> bool:
    return _listener.get() is not None


def _unchanged(text: str) -> str:
    return text


async def generate(
    backend: GenerationBackend,
    request: GenerationRequest,
    shown: Callable[[str], str] = _unchanged,
) -> GenerationResult:
    """`backend.generate(request)`; while someone listens, `generate_stream`, each partial text
    passed through `shown` (how the reply will be presented) to the listener."""
    listener = _listener.get()
    if listener is None:
        return await backend.generate(request)
    chunks = backend.generate_stream(request)
    try:
        async for chunk in chunks:
            if chunk.result is not None:
                return chunk.result
            if chunk.text:
                listener(shown(chunk.text))
    finally:
        close = getattr(chunks, "aclose", None)  # an async generator: stop it now, not at GC
        if close is not None:
            await close()
    raise GenerationError(GenerationErrorKind.INTERNAL, "the reply stream ended without a result")
