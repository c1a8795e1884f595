"""Which threads run torch: set-up on a thread that ends, serving on one that stays.

OpenMP (torch's CPU thread pool) keeps a team of worker threads for every thread that ran a
parallel op, for as long as that thread lives. Once the process holds more such threads than
there are cores, libgomp stops spin-waiting and every parallel op waits for sleeping workers to
wake: a KoGPT2-base decode step on 2 cores took 13–17 ms at batch 1 and 30–37 ms at batch 32 on
an engine thread when the model had been loaded on another live thread, against 8–12 and 22–27
ms when the loading thread had ended (`bench/profile_step.py`-sized steps). So a local model is
loaded, its weights packed and its KV reserved `on_a_fresh_thread`, and afterwards every torch
op of it runs on the one thread that serves it (the engine's; the Hugging Face decoder's worker).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["on_a_fresh_thread"]

T = TypeVar("T")


def on_a_fresh_thread(work: Callable[[], T], name: str = "kobot-load") -> T:
    """`work()` run on a new thread that ends with it: its result, or its exception raised here."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as error:  # re-raised on the caller's thread
            failure.append(error)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
