"""`KOBOT_BACKEND=local` on the engine: LocalBackend's behaviour, many conversations at once.

`EngineBackend` is a `LocalBackend` in everything a caller sees (loading, prompt checks, stop
strings, reply cleaning, retries, fallback, candidates, streaming, error kinds, timeouts): only
its one call into the model, `_model_sequences`, runs on the shared `Engine` instead of
`model.generate`. Requests run on a pool of worker threads that mostly wait for the engine, so
concurrent requests decode in the same forward passes, and each conversation's KV (by
`GenerationRequest.cache_key`) is reused on its next turn.

Test seams, as LocalBackend's: `_logits_processors` scripts what the model says (run by the
engine on each step's scores), `_generate_ids` replaces the model call.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from transformers import LogitsProcessorList

from core.generation.base import (
    GenerationError,
    GenerationErrorKind,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from core.generation.engine import (
    Engine,
    EngineConfig,
    EngineHandle,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishKind,
    StopCheck,
)
from core.generation.engine_sampling import LogitsHook
from core.generation.gpt2_forward import GPT2Forward, UnsupportedModelError
from core.generation.local import (
    LocalBackend,
    ReplyStoppingCriteria,
    RunControl,
    describe,
    is_greedy,
    timeout_detail,
)
from core.generation.tokenizer import DEFAULT_MODEL, ModelLoadError

__all__ = ["CompileMode", "EngineBackend"]

logger = logging.getLogger(__name__)

CompileMode = Literal["off", "compile"]
ROW_SEED_STRIDE = 1_000_003
"""Candidate r of a seeded attempt samples with `seed + r * ROW_SEED_STRIDE`."""
MAX_WORKERS = 256


class QuietControl(RunControl):
    """A request's deadline and cancel flag, without its stream listener (for candidates > 0)."""

    def __init__(self, inner: RunControl) -> None:
        super().__init__(inner.timeout_s)
        self.deadline = inner.deadline
        self._inner = inner

    def cancel(self) -> None:
        self._inner.cancel()

    def expired(self) -> bool:
        return self._inner.expired()


class EngineBackend(LocalBackend):
    """The local model served by the continuous-batching engine (see the module docstring).

    Construction loads the model and starts the engine thread (seconds; call it via
    `asyncio.to_thread`); ModelLoadError when the model is not a plain GPT-2 or the KV budget
    cannot be reserved on the device.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        generation_timeout_s: float = 120.0,
        engine: EngineConfig | None = None,
        compile_mode: CompileMode = "off",
    ) -> None:
        super().__init__(
            model, device=device, dtype=dtype, generation_timeout_s=generation_timeout_s
        )
        config = engine or EngineConfig()
        self._engine = self._start_engine(config, compile_mode)
        self._executor.shutdown(wait=False)
        workers = min(MAX_WORKERS, max(4, 2 * self._engine.max_batch))
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="kobot-request")
        self._cache_keys: weakref.WeakKeyDictionary[RunControl, str | None] = (
            weakref.WeakKeyDictionary()
        )

    def _start_engine(self, config: EngineConfig, compile_mode: CompileMode) -> Engine:
        try:
            forward = GPT2Forward(self._require_model(), compile_mode, config.quant)
        except UnsupportedModelError as error:
            raise ModelLoadError(
                f"KOBOT_MODEL: the local engine runs plain GPT-2 models ({error})"
            ) from error
        try:
            return Engine(forward, config)
        except (RuntimeError, ValueError) as error:
            raise ModelLoadError(
                f"KOBOT_ENGINE_KV_BUDGET_MB: could not reserve {config.kv_budget_mb:g} MB of KV "
                f"memory on {self._device} ({describe(error)})"
            ) from error

    @property
    def engine(self) -> Engine:
        return self._engine

    def engine_stats(self) -> EngineStats:
        return self._engine.stats

    async def close(self) -> None:
        """Stop running requests and the worker threads, then the engine; free the model."""
        await super().close()
        await asyncio.to_thread(self._engine.close)

    # --- on a worker thread ---

    def _guarded_run(self, request: GenerationRequest, control: RunControl) -> GenerationResult:
        self._cache_keys[control] = request.cache_key
        return super()._guarded_run(request, control)

    def _model_sequences(
        self,
        prompt: list[int],
        params: SamplingParams,
        seed: int | None,
        stop_strings: Sequence[str],
        control: RunControl,
    ) -> list[list[int]]:
        """Each candidate's new ids, decoded by the engine with whatever else is running."""
        rows = 1 if is_greedy(params) else max(1, params.num_return_sequences)
        hook = self._logits_hook()
        criteria = [
            ReplyStoppingCriteria(
                self._tokenizer.decode,
                0,
                stop_strings,
                control if row == 0 else QuietControl(control),
            )
            for row in range(rows)
        ]
        key = self._cache_keys.get(control)
        handles = [
            self._engine.submit(
                EngineRequest(
                    tuple(prompt),
                    params,
                    seed=None if seed is None else seed + row * ROW_SEED_STRIDE,
                    cache_key=key if row == 0 else None,
                    eos_id=self._tokenizer.eos_id,
                    stop=stop_rule(criterion),
                    deadline=control.deadline,
                    cancelled=control.expired,
                    hook=hook,
                )
            )
            for row, criterion in enumerate(criteria)
        ]
        outputs = [wait(handle) for handle in handles]
        if any(timed_out(o, c) for o, c in zip(outputs, criteria, strict=True)):
            control.check()
            raise GenerationError(GenerationErrorKind.TIMEOUT, timeout_detail(self._timeout_s))
        return [list(output.ids) for output in outputs]

    def _logits_hook(self) -> LogitsHook | None:
        """LocalBackend's `_logits_processors` seam (once per attempt) as the engine's hook."""
        processors = self._logits_processors()
        return None if processors is None else processors_hook(processors)


def stop_rule(criterion: ReplyStoppingCriteria) -> StopCheck:
    """LocalBackend's stopping criterion (stop strings, stray `AI:`, the deadline, stream
    reports) applied to a request's new ids."""

    def stop(new_ids: Sequence[int]) -> bool:
        input_ids = torch.tensor([list(new_ids)], dtype=torch.long)
        flags = criterion(input_ids, None)  # type: ignore[arg-type]
        return bool(flags[0])

    return stop


def processors_hook(processors: LogitsProcessorList) -> LogitsHook:
    def hook(ids: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=scores.device)
        return processors(input_ids, scores.unsqueeze(0))[0]  # type: ignore[arg-type]

    return hook


def wait(handle: EngineHandle) -> EngineOutput:
    return handle.future.result()


def timed_out(output: EngineOutput, criterion: ReplyStoppingCriteria) -> bool:
    return output.finish in (FinishKind.TIMEOUT, FinishKind.CANCELLED) or (
        criterion.reason == "timeout"
    )
