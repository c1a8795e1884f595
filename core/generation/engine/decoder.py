"""The engine as a `Decoder`: each attempt's candidates are engine requests, awaited as futures.

Concurrent requests decode in the same forward passes, and each conversation's KV (by
`Attempt.cache_key`, first candidate only) is reused on its next turn. Nothing here blocks a
thread per request: the engine thread resolves each request's future and the event loop awaits
it (`Engine.generate`); cancelling the caller cancels the engine request.

Test seam: `logits_hook`, called once per candidate of each attempt, returns the hook the
engine applies to that candidate's scores at every step (after the penalties), to script what
the model says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Literal

from core.generation.base import (
    Attempt,
    BackendInfo,
    Candidate,
    FinishReason,
    ModelLimits,
    candidate_rows,
)
from core.generation.device import LoadedModel, free_cuda_cache
from core.generation.engine.forward import GPT2Forward
from core.generation.engine.kernels.top_k import torch_top_k
from core.generation.engine.sampling import LogitsHook
from core.generation.engine.scheduler import (
    Engine,
    EngineConfig,
    EngineOutput,
    EngineRequest,
    FinishKind,
)
from core.generation.errors import ModelLoadError, describe, timeout_error
from core.generation.reply_text import candidate_from_ids
from core.generation.scoring import scoring_job
from core.generation.stopping import StopRule
from core.generation.tokenizer import KoGPT2Tokenizer

__all__ = ["AttemptHook", "CompileMode", "EngineDecoder", "start_engine"]

CompileMode = Literal["off", "compile"]
AttemptHook = Callable[[Attempt, int], LogitsHook | None]
"""Given an attempt and a candidate row, that row's logits hook (None: the model speaks
freely). Row 0 is asked first, once per attempt."""
ROW_SEED_STRIDE = 1_000_003
"""Candidate r of a seeded attempt samples with `seed + r * ROW_SEED_STRIDE`."""
_ENDED = {FinishKind.EOS: FinishReason.EOS, FinishKind.STOP: FinishReason.STOP}


def start_engine(loaded: LoadedModel, config: EngineConfig, compile_mode: CompileMode) -> Engine:
    """The engine over `loaded`; UnsupportedModelError when it is not a plain GPT-2,
    ModelLoadError when the KV budget cannot be reserved."""
    forward = GPT2Forward(
        loaded.model, compile_mode, config.quant, config.kernels, config.kernel_dir, config.graphs,
        config.kv_dtype,
    )  # fmt: skip
    try:
        return Engine(forward, config)
    except (RuntimeError, ValueError) as error:
        raise ModelLoadError(
            f"KOBOT_ENGINE_KV_BUDGET_MB: could not reserve {config.kv_budget_mb:g} MB of KV "
            f"memory on {loaded.device} ({describe(error)})"
        ) from error


class EngineDecoder:
    """The local model on the continuous-batching engine (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, engine: Engine) -> None:
        self.loaded = loaded
        self.tokenizer: KoGPT2Tokenizer = loaded.tokenizer
        self.engine = engine
        self.logits_hook: AttemptHook | None = None

    def limits(self) -> ModelLimits:
        return self.loaded.limits()

    def info(self) -> BackendInfo:
        return self.loaded.info()

    async def decode(self, attempt: Attempt) -> list[Candidate]:
        """Every candidate of `attempt`, each an engine request decoded beside all others."""
        rules = [self._stop_rule(attempt, row) for row in range(candidate_rows(attempt.params))]
        requests = [self._request(attempt, row, rule) for row, rule in enumerate(rules)]
        outputs = await asyncio.gather(*(self.engine.generate(r) for r in requests))
        if any(timed_out(o, r) for o, r in zip(outputs, rules, strict=True)):
            raise timeout_error(attempt.control.timeout_s)
        return [self._candidate(output) for output in outputs]

    def _stop_rule(self, attempt: Attempt, row: int) -> StopRule:
        listener = attempt.on_ids if row == 0 else None
        return StopRule(self.tokenizer.decode, attempt.stop_strings, attempt.control, listener)

    def _request(self, attempt: Attempt, row: int, rule: StopRule) -> EngineRequest:
        seed = attempt.seed
        return EngineRequest(
            attempt.prompt_ids,
            attempt.params,
            seed=None if seed is None else seed + row * ROW_SEED_STRIDE,
            cache_key=attempt.cache_key if row == 0 else None,
            eos_id=self.tokenizer.eos_id,
            stop=rule,
            deadline=attempt.control.deadline,
            cancelled=attempt.control.expired,
            hook=self.logits_hook(attempt, row) if self.logits_hook is not None else None,
        )

    def _candidate(self, output: EngineOutput) -> Candidate:
        ended = _ENDED.get(output.finish, FinishReason.LENGTH)
        return candidate_from_ids(self.tokenizer, output.ids, ended)

    async def score(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[float]:
        job = scoring_job(self.loaded, prompts, continuations)
        return await asyncio.wrap_future(self.engine.call(job))

    def stats(self) -> dict[str, float]:
        """The engine's counters, its KV arena's use, whether the C++ attention and top-k
        run (1) or torch's (0), and the static-shape decode steps (CUDA graphs)."""
        stats, arena = self.engine.stats, self.engine.arena
        graphs = self.engine.forward.decode_graphs
        figures = {
            "engine_steps_total": stats.steps,
            "engine_finished_total": stats.finished,
            "engine_prompt_tokens_total": stats.prompt_tokens,
            "engine_reused_tokens_total": stats.reused_tokens,
            "engine_generated_tokens_total": stats.generated_tokens,
            "batch_size_max": stats.max_batch_seen,
            "kv_cache_used_bytes": arena.used_bytes,
            "kv_cache_capacity_bytes": arena.budget_bytes,
            "kv_decode_pool_bytes": self.engine.forward.decode_slots.pool_bytes,
            "attention_kernel": self.engine.forward.attention_kernel is not None,
            "top_k_kernel": self.engine.forward.top_k is not torch_top_k,
            "decode_graphs_captured": graphs.captured if graphs is not None else 0,
            "decode_graph_steps_total": graphs.steps if graphs is not None else 0,
        }
        return {name: float(value) for name, value in figures.items()}

    async def close(self) -> None:
        """Stop the engine (queued and running requests fail UNAVAILABLE) and free memory."""
        await asyncio.to_thread(self.engine.close)
        free_cuda_cache()


def timed_out(output: EngineOutput, rule: StopRule) -> bool:
    return output.finish in (FinishKind.TIMEOUT, FinishKind.CANCELLED) or rule.reason == "timeout"
