"""The generation engine: one scheduler thread decoding many conversations in the same passes.

Requests queue (`submit`, or `await generate` from the event loop). Every step the scheduler
thread (1) finishes requests that were cancelled or ran past their deadline, (2) admits queued
requests, first come first served, while fewer than `max_batch` run and their KV fits the budget
(evicting least recently used cached conversations when needed), (3) runs one forward pass over
every running request: one token for each decoding request plus up to `prefill_chunk` prompt
tokens of requests still reading their prompt (chunked prefill, packed without padding), and
(4) picks each request's next token with its own sampling settings; a request leaves as soon as
it finishes (EOS, its stop rule, its length), without waiting for the others.

Per-conversation KV reuse: a request with a `cache_key` takes its conversation's cached KV and
prefills only the tokens after the longest common prefix of the cached ids and its prompt; when
it finishes, its KV (prompt + reply) is kept for the next turn. Each request reserves the KV for
its prompt plus `max_new_tokens` when admitted, so admitted requests always finish and the
arena never holds more than the budget.

Other torch work on the model (scoring) runs on the same thread, between two steps (`call`), so
that one thread runs every torch op of it (`core.generation.threads` says why).

Errors: a failure in a forward pass or in sampling fails the requests of that step with the
classified `GenerationError` (errors.classify_error: OOM, device, internal); the engine keeps
serving the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import torch

from core.generation.base import GenerationError, GenerationErrorKind, ModelLimits, SamplingParams
from core.generation.device import free_cuda_cache
from core.generation.engine.forward import GPT2Forward, KVDtype, SeqChunk
from core.generation.engine.graphs import GraphMode
from core.generation.engine.kernels.loading import KernelMode
from core.generation.engine.kv import ConversationCache, KVArena, KVBlock, common_prefix
from core.generation.engine.sampling import LogitsHook, SamplerState, choose_tokens
from core.generation.errors import classify_error
from core.generation.policy import check_prompt

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineHandle",
    "EngineOutput",
    "EngineRequest",
    "EngineStats",
    "FinishKind",
    "StopCheck",
    "auto_max_batch",
]

logger = logging.getLogger(__name__)

MB = 1024 * 1024
T = TypeVar("T")
StopCheck = Callable[[Sequence[int]], bool]
"""Called with the new ids after each token; True ends the request (a stop string, say)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The scheduler's bounds (KOBOT_ENGINE_* settings)."""

    max_batch: int = 0
    """Most requests in one forward pass; more wait in the queue. 0: what the KV budget holds
    (`auto_max_batch`: one request per `REQUEST_TOKENS` tokens of arena, at most `MAX_BATCH`)."""
    kv_budget_mb: float = 1024
    """The KV arena, allocated once; running requests and cached conversations share it."""
    kv_idle_s: float = 600.0
    """A conversation's cached KV unused this long is dropped."""
    prefill_chunk: int = 512
    """Prompt tokens read per step (beside every decoding request's one token)."""
    idle_poll_s: float = 0.5
    """How often an idle (or busy) scheduler looks for idle conversations to drop."""
    decode_pool: str = "auto"
    """Where the C++ attention kernel does not run (`GPT2Forward.attention_kernel`: CUDA, or no
    compiler): `auto`/`on`: decoding sequences attend in one batched call per layer over a dense
    KV pool (`engine.slots`, `DECODE_POOL_SHARE` of the KV budget; the arena gets the rest);
    `off`: one attention call per sequence. With the kernel the arena gets the whole budget."""
    quant: str = "auto"
    """KOBOT_ENGINE_QUANT: `int8` runs the dense layers on int8 weights, `auto` where kobot's
    int8 kernel runs (`linear.resolve_quant`; the forward's option, read by whoever builds the
    `GPT2Forward`)."""
    kv_dtype: KVDtype = "auto"
    """KOBOT_ENGINE_KV_DTYPE: `int8` (`auto`: where the C++ attention runs) keeps the KV arena
    in int8 rows (about half the bytes: nearly twice the tokens in the budget); `model` in the
    model's dtype (the forward's option too)."""
    kernels: KernelMode = "auto"
    """KOBOT_ENGINE_KERNELS: `auto` builds (once) and runs the C++ attention and top-k on
    a CPU; `off` keeps torch's ops (the forward's option too)."""
    kernel_dir: Path | None = None
    """KOBOT_ENGINE_KERNEL_DIR: where the built kernels are kept (None: `~/.cache/kobot`)."""
    graphs: GraphMode = "auto"
    """KOBOT_ENGINE_GRAPHS: decode-only steps over the decode pool at static shapes, captured
    in CUDA graphs (`auto`, on CUDA) or run eagerly (`static`); `off`: the eager step
    (`engine.graphs`; the forward's option too)."""


DECODE_POOL_SHARE = 1 / 3
"""The decode pool's part of KOBOT_ENGINE_KV_BUDGET_MB (a step that would need more attends per
sequence instead), so the arena and the pool together stay within the budget."""
REQUEST_TOKENS = 256
"""A typical request's KV footprint (prompt + reply) for the default batch bound."""
MAX_BATCH = 256


def use_decode_pool(mode: str, forward: GPT2Forward) -> bool:
    """Unless `off`, wherever the attention kernel does not attend in the arena itself (CUDA, or a
    CPU where it could not be built)."""
    return mode != "off" and forward.attention_kernel is None


def auto_max_batch(capacity_tokens: int) -> int:
    """The batch bound the KV arena holds: one typical request per `REQUEST_TOKENS` slots."""
    return max(1, min(MAX_BATCH, capacity_tokens // REQUEST_TOKENS))


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One generation: the prompt ids, how to sample, and when to stop."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    cache_key: str | None = None
    eos_id: int | None = None
    min_new_tokens: int = 0
    stop: StopCheck | None = None
    deadline: float | None = None
    """`time.monotonic()` after which the request ends with `FinishKind.TIMEOUT`."""
    cancelled: Callable[[], bool] | None = None
    """Polled every step, queued or running: True ends the request with CANCELLED."""
    hook: LogitsHook | None = None


class FinishKind(StrEnum):
    EOS = "eos"
    STOP = "stop"
    LENGTH = "length"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class EngineOutput:
    ids: tuple[int, ...]
    """The new tokens (the EOS id included when the request ended on it)."""
    finish: FinishKind
    prompt_tokens: int
    reused_tokens: int
    """Prompt tokens whose KV came from the conversation's cache instead of a prefill."""
    first_token_s: float | None
    """Seconds from `submit` to the first new token."""
    total_s: float


class EngineHandle:
    """A submitted request: its future result, and a way to cancel it."""

    def __init__(self, request: EngineRequest) -> None:
        self.request = request
        self.future: Future[EngineOutput] = Future()
        self.submitted_at = time.monotonic()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop the request (at its next step; its KV is freed or kept)."""
        self._cancelled.set()

    def finish_kind(self) -> FinishKind | None:
        """CANCELLED or TIMEOUT when the request should stop now, else None."""
        cancelled = self.request.cancelled
        if self._cancelled.is_set() or self.future.cancelled() or (cancelled and cancelled()):
            return FinishKind.CANCELLED
        deadline = self.request.deadline
        if deadline is not None and time.monotonic() >= deadline:
            return FinishKind.TIMEOUT
        return None

    def resolve(self, output: EngineOutput) -> None:
        _settle(self.future, lambda f: f.set_result(output))

    def fail(self, error: BaseException) -> None:
        _settle(self.future, lambda f: f.set_exception(error))


def _settle(future: Future[EngineOutput], action: Callable[[Future[EngineOutput]], None]) -> None:
    if future.done():
        return
    with contextlib.suppress(InvalidStateError):  # cancelled from another thread meanwhile
        action(future)


@dataclass(eq=False)
class _Running:
    """A request admitted into the batch."""

    handle: EngineHandle
    block: KVBlock
    sampler: SamplerState
    computed: int
    """Positions of `ids` whose KV is in `block`."""
    reused: int
    first_token_at: float | None = None

    @property
    def ids(self) -> list[int]:
        return self.sampler.ids

    @property
    def pending(self) -> int:
        return len(self.ids) - self.computed


@dataclass
class EngineStats:
    steps: int = 0
    finished: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    max_batch_seen: int = 0
    busy_s: float = 0.0
    """Seconds spent in steps (forward passes and sampling)."""


class Engine:
    """Continuous batching over a `GPT2Forward`, on its own thread (see the module docstring)."""

    def __init__(
        self,
        forward: GPT2Forward,
        config: EngineConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.forward = forward
        self.config = config or EngineConfig()
        budget = int(self.config.kv_budget_mb * MB)
        pool_bytes = 0
        if use_decode_pool(self.config.decode_pool, forward):
            pool_bytes = int(budget * DECODE_POOL_SHARE)
            forward.decode_slots.max_bytes = pool_bytes
        storage = forward.kv_storage
        self.arena = KVArena(
            forward.dims, budget - pool_bytes, forward.device, storage.dtype, storage.row
        )
        self.cache = ConversationCache(self.arena, self.config.kv_idle_s, clock)
        self.max_batch = self.config.max_batch or auto_max_batch(self.arena.capacity)
        self.stats = EngineStats()
        self._queue: deque[EngineHandle] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._running: list[_Running] = []
        self._wake = threading.Condition()
        self._closed = False
        self._idle_checked_at = 0.0
        self._thread = threading.Thread(target=self._loop, name="kobot-engine", daemon=True)
        self._thread.start()

    # --- any thread ---------------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> EngineHandle:
        """Queue `request`; GenerationError when it can never run (closed, too long, too big)."""
        self._check(request)
        handle = EngineHandle(request)
        with self._wake:
            if self._closed:
                raise GenerationError(GenerationErrorKind.UNAVAILABLE, "the engine is closed")
            self._queue.append(handle)
            self._wake.notify()
        return handle

    async def generate(self, request: EngineRequest) -> EngineOutput:
        """Submit and wait without blocking the event loop; cancelling the caller cancels it."""
        handle = self.submit(request)
        try:
            return await asyncio.wrap_future(handle.future)
        except asyncio.CancelledError:
            handle.cancel()
            self.wake()
            raise

    def call(self, work: Callable[[], T]) -> Future[T]:
        """Run `work()` on the engine thread, between two steps (under `inference_mode`): other
        torch work on the model goes here, so that one thread runs all of it
        (`core.generation.threads`). GenerationError UNAVAILABLE once closed."""
        future: Future[T] = Future()
        with self._wake:
            if self._closed:
                raise GenerationError(GenerationErrorKind.UNAVAILABLE, "the engine is closed")
            self._calls.append((work, future))
            self._wake.notify()
        return future

    def wake(self) -> None:
        """Let the scheduler look at its queue and cache now (after a cancel, say)."""
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        """Stop the thread; queued and running requests fail with UNAVAILABLE. Blocks."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def running(self) -> int:
        return len(self._running)

    def _check(self, request: EngineRequest) -> None:
        dims = self.forward.dims
        max_new = request.params.max_new_tokens
        check_prompt(request.prompt_ids, max_new, ModelLimits(dims.n_positions, dims.vocab_size))
        needed = len(request.prompt_ids) + max_new
        if needed > self.arena.capacity:
            raise GenerationError(
                GenerationErrorKind.OUT_OF_MEMORY,
                f"a {needed}-token request does not fit the KV budget of {self.arena.capacity} "
                "tokens (KOBOT_ENGINE_KV_BUDGET_MB)",
            )

    # --- the scheduler thread -----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._wait_for_work():
                with torch.inference_mode():
                    self._run_calls()
                    self._guarded_step()
        finally:
            self._shut_down()

    def _wait_for_work(self) -> bool:
        """False once closed; otherwise wait (dropping idle conversations) until work exists."""
        with self._wake:
            while not (self._closed or self._queue or self._running or self._calls):
                self.cache.drop_idle()
                self._wake.wait(self.config.idle_poll_s)
            return not self._closed

    def _run_calls(self) -> None:
        with self._wake:
            calls, self._calls = list(self._calls), deque()
        for work, future in calls:
            if not future.set_running_or_notify_cancel():
                continue  # its caller stopped waiting
            try:
                future.set_result(work())
            except Exception as error:
                future.set_exception(error)

    def _guarded_step(self) -> None:
        """The error boundary: a failing step fails its requests, never the engine."""
        started = time.perf_counter()
        try:
            self._step()
        except Exception as error:
            mapped = classify_error(error)
            logger.error("engine step failed: %s", mapped, exc_info=error)
            if mapped.kind is GenerationErrorKind.OUT_OF_MEMORY:
                free_cuda_cache()
            self.forward.discard_decode()  # the running blocks are freed below
            for running in self._running:
                self.arena.free(running.block)
                running.handle.fail(mapped)
            self._running = []
        finally:
            self.stats.busy_s += time.perf_counter() - started

    def _step(self) -> None:
        self._drop_idle()
        self._finish_expired()
        self._admit()
        if not self._running:
            return
        plan = self._plan()
        hidden = self.forward.last_hidden(
            [SeqChunk(self.arena.view(r.block), r.computed, self._next_ids(r, n)) for r, n in plan],
            self.arena.buffer,
        )
        for running, n in plan:
            running.computed += n
        ready = [i for i, (running, _) in enumerate(plan) if running.pending == 0]
        self.stats.steps += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(plan))
        if ready:
            self._sample([plan[i][0] for i in ready], hidden[ready])

    def _drop_idle(self) -> None:
        """Drop idle conversations, at most every `idle_poll_s` while busy."""
        now = time.monotonic()
        if now - self._idle_checked_at >= self.config.idle_poll_s:
            self._idle_checked_at = now
            self.cache.drop_idle()

    def _plan(self) -> list[tuple[_Running, int]]:
        """Every decoding request feeds its last token; prompts share `prefill_chunk` tokens,
        oldest first."""
        plan = [(r, 1) for r in self._running if r.pending == 1]
        budget = self.config.prefill_chunk
        for running in self._running:
            if running.pending > 1 and budget > 0:
                take = min(running.pending, budget)
                plan.append((running, take))
                budget -= take
        return plan

    @staticmethod
    def _next_ids(running: _Running, n: int) -> list[int]:
        return running.ids[running.computed : running.computed + n]

    def _sample(self, batch: list[_Running], hidden: torch.Tensor) -> None:
        logits = self.forward.lm_head(hidden)
        states = [running.sampler for running in batch]
        tokens = choose_tokens(logits, states, self.forward.top_k, self.forward.fused_sample)
        now = time.monotonic()
        for running, token in zip(batch, tokens, strict=True):
            running.sampler.append(token)
            running.first_token_at = running.first_token_at or now
            self.stats.generated_tokens += 1
            self._after_token(running, token)

    def _after_token(self, running: _Running, token: int) -> None:
        try:
            kind = self._finish_kind(running, token)
        except Exception as error:  # a request's own stop rule failed: only it fails
            self._release(running, keep=False)
            running.handle.fail(classify_error(error))
            return
        if kind is not None:
            self._finish(running, kind)

    def _finish_kind(self, running: _Running, token: int) -> FinishKind | None:
        request = running.handle.request
        new_ids = running.ids[running.sampler.prompt_len :]
        if request.eos_id is not None and token == request.eos_id:
            return FinishKind.EOS
        if request.stop is not None and request.stop(new_ids):
            return FinishKind.STOP
        if len(new_ids) >= request.params.max_new_tokens:
            return FinishKind.LENGTH
        return None

    def _finish(self, running: _Running, kind: FinishKind) -> None:
        handle = running.handle
        prompt_len = running.sampler.prompt_len
        now = time.monotonic()
        first = running.first_token_at
        output = EngineOutput(
            ids=tuple(running.ids[prompt_len:]),
            finish=kind,
            prompt_tokens=prompt_len,
            reused_tokens=running.reused,
            first_token_s=None if first is None else first - handle.submitted_at,
            total_s=now - handle.submitted_at,
        )
        self._release(running, keep=True)
        self.stats.finished += 1
        handle.resolve(output)

    def _release(self, running: _Running, keep: bool) -> None:
        """Take `running` out of the batch; its KV goes to the conversation cache or is freed."""
        if running in self._running:
            self._running.remove(running)
        self.forward.retire(self.arena.view(running.block), self.arena.buffer)
        key = running.handle.request.cache_key
        if keep and key is not None and running.computed > 0:
            self.cache.put(key, running.ids[: running.computed], running.block)
        else:
            self.arena.free(running.block)

    def _finish_expired(self) -> None:
        for running in list(self._running):
            kind = running.handle.finish_kind()
            if kind is not None:
                self._finish(running, kind)
        with self._wake:
            waiting = list(self._queue)
        for handle in waiting:
            kind = handle.finish_kind()
            if kind is not None:
                self._drop_queued(handle)
                handle.resolve(_empty_output(handle, kind))

    def _drop_queued(self, handle: EngineHandle) -> None:
        with self._wake:
            if handle in self._queue:
                self._queue.remove(handle)

    # --- admission ----------------------------------------------------------------------------

    def _admit(self) -> None:
        while len(self._running) < self.max_batch:
            with self._wake:
                if not self._queue:
                    return
                handle = self._queue[0]
            try:
                running = self._start(handle)
            except Exception as error:  # this request cannot start: only it fails
                self._drop_queued(handle)
                handle.fail(classify_error(error))
                continue
            if running is None:
                return  # waits for memory; first come, first served
            self._drop_queued(handle)
            self._running.append(running)

    def _start(self, handle: EngineHandle) -> _Running | None:
        """The request with its KV block (reusing its conversation's cached prefix), or None
        when its KV does not fit until running requests finish."""
        request = handle.request
        prompt = list(request.prompt_ids)
        needed = len(prompt) + request.params.max_new_tokens
        block, reused = self._reserve(request.cache_key, prompt, needed)
        if block is None:
            return None
        try:
            sampler = SamplerState(
                params=request.params,
                ids=prompt,
                prompt_len=len(prompt),
                eos_id=request.eos_id,
                min_new_tokens=request.min_new_tokens,
                generator=_generator(request.seed),
                hook=request.hook,
            )
        except Exception:
            self.arena.free(block)
            raise
        self.stats.prompt_tokens += len(prompt)
        self.stats.reused_tokens += reused
        return _Running(handle, block, sampler, computed=reused, reused=reused)

    def _reserve(
        self, key: str | None, prompt: list[int], needed: int
    ) -> tuple[KVBlock | None, int]:
        """A block for `needed` tokens and how many prompt positions already hold their KV."""
        cached = self.cache.take(key) if key is not None else None
        if cached is None:
            return self.cache.allocate(needed), 0
        reused = min(common_prefix(cached.ids, prompt), len(prompt) - 1)
        if reused == 0:
            self.arena.free(cached.block)
            return self.cache.allocate(needed), 0
        if cached.block.tokens >= needed:
            return cached.block, reused
        block = self.cache.allocate(needed)
        if block is None and not self._running:
            self.arena.free(cached.block)  # nothing else will free memory: start afresh
            return self.cache.allocate(needed), 0
        if block is None:
            assert key is not None
            self.cache.put(key, cached.ids, cached.block)  # keep it for when memory frees up
            return None, 0
        self.arena.copy_prefix(cached.block, block, reused)
        self.arena.free(cached.block)
        return block, reused

    # --- shutdown -----------------------------------------------------------------------------

    def _shut_down(self) -> None:
        closed = GenerationError(GenerationErrorKind.UNAVAILABLE, "the engine is closed")
        self.forward.discard_decode()
        for running in list(self._running):
            self.arena.free(running.block)
            running.handle.fail(closed)
        self._running = []
        with self._wake:
            self._closed = True
            waiting, self._queue = list(self._queue), deque()
            calls, self._calls = list(self._calls), deque()
        for handle in waiting:
            handle.fail(closed)
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(closed)
        self.cache.clear()


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _empty_output(handle: EngineHandle, kind: FinishKind) -> EngineOutput:
    return EngineOutput(
        ids=(),
        finish=kind,
        prompt_tokens=len(handle.request.prompt_ids),
        reused_tokens=0,
        first_token_s=None,
        total_s=time.monotonic() - handle.submitted_at,
    )
