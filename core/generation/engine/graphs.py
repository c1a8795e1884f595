"""The decode step at static shapes, captured in CUDA graphs.

On a GPU, a decode step of a 125M-parameter model is bound by kernel launches (a dozen per layer,
each a few microseconds of work), not by arithmetic. `DecodeGraphs` runs a step whose every
sequence decodes one token over the decode pool (`slots`) at shapes that do not change from step
to step:
- the batch padded to a power of two (`batch_bucket`);
- attention over every slot of the pool and a span of whole `LENGTH_BUCKET`s;
- every index (pool rows, key lengths, masks) computed on the device from one small input tensor
  (token ids, positions, slots: `GPT2Forward.static_decode`).

So the step is captured once per (batch bucket, span) and replayed; prefill and mixed steps stay
eager. Padding rows feed token 0 at position 0 of a free slot: that position is rewritten before
any sequence reads it (a slot's KV is copied in when it is handed out), and their outputs are
dropped. A pool re-layout (more slots, more positions) drops every graph, which held its address.
Where a new static step fails (an op that cannot be captured, say), it is logged once and every
later step stays eager: the step that failed runs eagerly too, so no request sees the failure.

Modes (`KOBOT_ENGINE_GRAPHS`): `auto` captures on CUDA and does nothing elsewhere; `static` runs
the same static-shape step eagerly on any device where the pool runs (a CPU without the decode
kernel), which is what the tests on a CPU check, and a way to tell a capture problem from a shape
one; `off` keeps the eager step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from core.generation.errors import describe

__all__ = ["DecodeGraphs", "GraphMode", "batch_bucket", "graph_capture"]

logger = logging.getLogger(__name__)

GraphMode = Literal["auto", "off", "static"]
StaticStep = Callable[[torch.Tensor, int], torch.Tensor]
"""`(inputs [3, batch] of token ids, positions and slots, span) -> hidden [batch, n_embd]`."""
Replay = Callable[[], torch.Tensor]
Layout = tuple[int, tuple[int, ...]]
"""A pool's storage address and shape: what a captured graph depends on."""


def batch_bucket(batch: int) -> int:
    """The static batch a step of `batch` sequences runs at: the next power of two."""
    return 1 << max(batch - 1, 0).bit_length()


def graph_capture(mode: GraphMode, device: torch.device) -> bool | None:
    """Whether steps are captured (True), run at static shapes eagerly (False), or neither."""
    if mode not in ("auto", "off", "static"):
        raise ValueError(f"KOBOT_ENGINE_GRAPHS: must be auto, off or static (got {mode!r})")
    if mode == "static":
        return False
    return True if mode == "auto" and device.type == "cuda" else None


class DecodeGraphs:
    """Static-shape decode steps by (batch bucket, span), captured or eager (module docstring)."""

    def __init__(self, step: StaticStep, device: torch.device, capture: bool) -> None:
        self.step = step
        self.device = device
        self.capture = capture
        self._inputs: dict[int, torch.Tensor] = {}
        self._replays: dict[tuple[int, int], Replay] = {}
        self._layout: Layout | None = None
        self._memory = torch.cuda.graph_pool_handle() if capture else None
        self.captured = 0
        """Graphs captured so far (every layout)."""
        self.steps = 0
        """Steps run at static shapes (replayed, or eager in `static` mode)."""
        self.failed = False
        """A static step failed once: every step stays eager from then on."""

    @property
    def held(self) -> int:
        """Static steps ready for the current pool layout."""
        return len(self._replays)

    def run(
        self,
        pool: torch.Tensor,
        tokens: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int],
        spare_slot: int | None,
        span: int,
    ) -> torch.Tensor | None:
        """The step's hidden states `[len(tokens), n_embd]` (a copy); None when it is left to
        the eager step: static steps failed before, or it needs padding and the pool has no free
        slot to pad into."""
        batch = len(tokens)
        bucket = batch_bucket(batch)
        pad = bucket - batch
        if self.failed or (pad and spare_slot is None):
            return None
        self._follow(pool)
        host = torch.tensor(
            [[*tokens, *[0] * pad], [*positions, *[0] * pad], [*slots, *[spare_slot] * pad]],
            dtype=torch.long,
        )
        inputs = self._inputs.get(bucket)
        if inputs is None:
            inputs = self._inputs[bucket] = torch.zeros(
                3, bucket, dtype=torch.long, device=self.device
            )
        inputs.copy_(host)
        key = (bucket, span)
        fresh = key not in self._replays
        try:
            if fresh:
                self._replays[key] = self._prepare(inputs, span)
            hidden = self._replays[key]()[:batch].clone()
        except Exception as error:
            if not fresh:
                raise
            self._give_up(error)
            return None
        self.steps += 1
        return hidden

    def clear(self) -> None:
        """Drop every graph (their memory goes back to the allocator's graph pool)."""
        self._replays.clear()
        self._layout = None

    def _give_up(self, error: Exception) -> None:
        logger.warning(
            "decode steps at static shapes failed (%s); the engine decodes eagerly from now on "
            "(KOBOT_ENGINE_GRAPHS=off skips them)",
            describe(error),
        )
        self.failed = True
        self.clear()

    def _follow(self, pool: torch.Tensor) -> None:
        layout = (pool.data_ptr(), tuple(pool.shape))
        if layout != self._layout:
            self._replays.clear()
            self._layout = layout

    def _prepare(self, inputs: torch.Tensor, span: int) -> Replay:
        run = lambda: self.step(inputs, span)  # noqa: E731
        if not self.capture:
            return run
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            run()  # warm-up outside the capture: kernels chosen, workspaces allocated
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory):
            output = run()
        self.captured += 1

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay
