"""The CTranslate2 peer of `bench/serve.py`, in a process of its own.

In the bench's process a CTranslate2 `Generator` slowed torch for the rest of the run, even once
deleted: a KoGPT2-base decode step on the engine's thread went from 9–11 ms to 13–16 at batch 1
and from 25–29 to 28–39 ms at batch 32 (2 cores). A bot never runs the two side by side, so the
peer runs in a child process (spawned: it imports CTranslate2 and nothing of torch) and the arms
no longer slow each other. Its peak RSS is the child's.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from multiprocessing.connection import Connection
from typing import Any

from bench.memory import peak_rss_mb, reset_peak_rss

Tokens = list[list[str]]


def serve(model_dir: str, threads: int, options: dict[str, Any], conn: Connection) -> None:
    """The child: load the int8 model, then answer batches of token lists until None comes."""
    import ctranslate2

    generator = ctranslate2.Generator(
        model_dir, device="cpu", compute_type="int8", intra_threads=threads
    )
    conn.send("ready")
    while (message := conn.recv()) is not None:
        if message == "reset":
            reset_peak_rss()
            continue
        results = generator.generate_batch(
            message, max_batch_size=len(message), include_prompt_in_result=False, **options
        )
        conn.send(([len(result.sequences_ids[0]) for result in results], peak_rss_mb()))


class Ct2Peer:
    """The parent's side: `run` sends one batch and waits for its new-token counts."""

    def __init__(self, model_dir: str, threads: int, options: dict[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=serve, args=(model_dir, threads, options, child), daemon=True
        )
        self._process.start()
        child.close()
        if self._conn.recv() != "ready":
            raise RuntimeError("the CTranslate2 process did not start")
        self.peak_rss_mb = 0.0

    def reset_peak_rss(self) -> None:
        self._conn.send("reset")
        self.peak_rss_mb = 0.0

    def run(self, batch: Tokens) -> list[int]:
        self._conn.send(batch)
        counts, peak = self._conn.recv()
        self.peak_rss_mb = max(self.peak_rss_mb, peak)
        return list(counts)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the child may be gone already (it failed)
            self._conn.send(None)
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()
