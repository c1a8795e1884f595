"""Hugging Face `generate` as a `Decoder`: the fallback for models the engine refuses (not a
plain GPT-2), and the benchmarks' naive baseline.

Requests run one at a time on one worker thread (awaited as futures, so the event loop stays
free); each row of a multi-candidate attempt stops on its own through the shared `StopRule`.
Test seam: `logits_hook`, as on the engine decoder.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from core.generation.base import (
    Attempt,
    BackendInfo,
    Candidate,
    ModelLimits,
    SamplingParams,
    candidate_rows,
    is_greedy,
)
from core.generation.device import LoadedModel, free_cuda_cache
from core.generation.engine.decoder import AttemptHook
from core.generation.engine.sampling import LogitsHook
from core.generation.scoring import scoring_job
from core.generation.stopping import StopRule, stop_rules, stopped_candidates
from core.generation.tokenizer import KoGPT2Tokenizer

__all__ = ["HFGenerateDecoder", "RuleCriterion", "generation_config", "seeded"]


def generation_config(params: SamplingParams, eos_id: int, pad_id: int) -> GenerationConfig:
    """HF generation settings; temperature 0 (or do_sample False) means greedy."""
    options: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "repetition_penalty": params.repetition_penalty,
        "no_repeat_ngram_size": params.no_repeat_ngram_size,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "do_sample": not is_greedy(params),
    }
    if not is_greedy(params):
        options.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        options.update(num_return_sequences=candidate_rows(params))
    return GenerationConfig(**options)


@contextmanager
def seeded(seed: int | None, device: str) -> Iterator[None]:
    """Reproducible sampling for `seed`, without disturbing the process's global RNG state."""
    if seed is None:
        yield
        return
    place = torch.device(device)
    devices = [place.index or 0] if place.type in {"cuda", "mps"} else []
    with torch.random.fork_rng(devices=devices, device_type=place.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


class RuleCriterion(StoppingCriteria):
    """A `StopRule` for row `row` of a `generate` batch, over the ids after `prompt_len`."""

    def __init__(self, rule: StopRule, prompt_len: int, row: int) -> None:
        self.rule = rule
        self._prompt_len = prompt_len
        self._row = row

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = self.rule(input_ids[self._row, self._prompt_len :].tolist())
        flags = torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)
        flags[self._row] = done
        return flags  # type: ignore[return-value]


class HookProcessor(LogitsProcessor):
    """Engine-style logits hooks, one per row of `generate`'s scores (None: left alone)."""

    def __init__(self, hooks: Sequence[LogitsHook | None]) -> None:
        self.hooks = hooks

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, hook in enumerate(self.hooks):
            if hook is not None:
                scores[row] = hook(input_ids[row].tolist(), scores[row])
        return scores


class HFGenerateDecoder:
    """`model.generate` on one worker thread (see the module docstring)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.tokenizer: KoGPT2Tokenizer = loaded.tokenizer
        self.logits_hook: AttemptHook | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kobot-generate")

    def limits(self) -> ModelLimits:
        return self.loaded.limits()

    def info(self) -> BackendInfo:
        return self.loaded.info()

    async def decode(self, attempt: Attempt) -> list[Candidate]:
        return await asyncio.wrap_future(self._executor.submit(self.decode_now, attempt))

    def decode_now(self, attempt: Attempt) -> list[Candidate]:
        """The candidates of `attempt`, on the calling thread (the bench calls it directly)."""
        rows = candidate_rows(attempt.params)
        hooks = [
            self.logits_hook(attempt, row) if self.logits_hook else None for row in range(rows)
        ]
        rules = stop_rules(self.tokenizer.decode, attempt, rows)
        sequences = self._generate(attempt, rules, hooks)
        return stopped_candidates(self.tokenizer, sequences, rules, attempt.control)

    def _generate(
        self, attempt: Attempt, rules: Sequence[StopRule], hooks: Sequence[LogitsHook | None]
    ) -> list[list[int]]:
        prompt = list(attempt.prompt_ids)
        tokenizer, device = self.tokenizer, self.loaded.device
        config = generation_config(attempt.params, tokenizer.eos_id, tokenizer.pad_id)
        criteria = [RuleCriterion(rule, len(prompt), row) for row, rule in enumerate(rules)]
        input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
        scripted = any(hook is not None for hook in hooks)
        processors = LogitsProcessorList([HookProcessor(hooks)] if scripted else [])
        with torch.inference_mode(), seeded(attempt.seed, device):
            output = self.loaded.model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList(criteria),
                logits_processor=processors,
            )
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        return [[int(i) for i in row[len(prompt) :].tolist()] for row in sequences]

    async def score(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[float]:
        job = scoring_job(self.loaded, prompts, continuations)
        return await asyncio.wrap_future(self._executor.submit(job))

    def stats(self) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        """Stop the worker thread (the running request stops at its next token)."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        free_cuda_cache()
