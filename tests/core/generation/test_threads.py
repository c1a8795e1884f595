"""Set-up runs on a thread that ends (so that only the serving thread keeps OpenMP workers)."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pytest

from core.generation.threads import on_a_fresh_thread
from tests.support.backends import engine_backend


def test_the_work_runs_on_a_thread_of_its_own_that_has_ended() -> None:
    ran_on = on_a_fresh_thread(threading.current_thread, name="kobot-load")
    assert ran_on is not threading.current_thread() and ran_on.name == "kobot-load"
    assert not ran_on.is_alive()


def test_its_exception_is_raised_on_the_callers_thread() -> None:
    def fail() -> None:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        on_a_fresh_thread(fail)


@contextmanager
def threads_calling(*functions: str) -> Iterator[dict[str, list[threading.Thread]]]:
    """The threads that call these functions (by name), this one and those started meanwhile."""
    seen: dict[str, list[threading.Thread]] = {name: [] for name in functions}

    def watch(frame: FrameType, event: str, _: object) -> None:
        if event == "call" and frame.f_code.co_name in seen:
            seen[frame.f_code.co_name].append(threading.current_thread())

    threading.setprofile(watch)
    sys.setprofile(watch)
    try:
        yield seen
    finally:
        sys.setprofile(None)
        threading.setprofile(None)


async def test_the_factory_loads_on_a_thread_that_ends_and_the_engine_thread_scores(
    tiny_model_dir: Path,
) -> None:
    """The caller's thread never loads (a thread that lives on would keep OpenMP workers), and
    scoring runs on the engine's thread, where the decode steps run."""
    with threads_calling("load_local_model", "continuation_log_probs") as seen:
        backend = await asyncio.to_thread(engine_backend, tiny_model_dir)
        try:
            scores = await backend.score([[400, 401]], [[402, 403]])
        finally:
            await backend.close()
    (loader,) = seen["load_local_model"]
    assert loader is not threading.current_thread() and not loader.is_alive()
    assert [thread.name for thread in seen["continuation_log_probs"]] == ["kobot-engine"]
    assert len(scores) == 1 and scores[0] < 0
