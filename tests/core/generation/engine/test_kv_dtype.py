"""KOBOT_ENGINE_KV_DTYPE=int8: the KV arena in int8 rows (per row of head_dim values, with its
float32 scale), read by the C++ attention, against the model's dtype on a small trained model.

Tolerance: logits within 0.15 of the model dtype's KV on logits of order 10, the top-1 token the
same at ≥ 95% of positions (observed: fp32 0.005 and 100%, bf16 0.063 and 100%).
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2LMHeadModel

from core.generation.base import SamplingParams
from core.generation.engine.forward import GPT2Forward
from core.generation.engine.scheduler import Engine, EngineConfig, EngineRequest
from tests.support.logits import agreement, in_dtype

INT8_KV_LOGIT_ATOL = 0.15
TOP1_AGREEMENT = 0.95
GREEDY = SamplingParams(
    max_new_tokens=8, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0
)


def int8_kv_forward(model: GPT2LMHeadModel) -> GPT2Forward:
    forward = GPT2Forward(model, kv_dtype="int8")
    if forward.attention_kernel is None:
        pytest.skip("int8 KV rows need the C++ attention (a C++ compiler)")
    return forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kv_logits_agree_with_the_models_dtype(
    trained_model: GPT2LMHeadModel, held_out_prompts: list[list[int]], dtype: torch.dtype
) -> None:
    model = in_dtype(trained_model, dtype)
    int8 = int8_kv_forward(model)
    assert (int8.kv_storage.dtype, int8.kv_storage.row) == (torch.uint8, int8.dims.head_dim + 4)
    compared = agreement(int8, GPT2Forward(model), held_out_prompts)
    assert 0 < compared.max_error <= INT8_KV_LOGIT_ATOL  # quantized: close, not the same pass
    assert compared.top1 >= TOP1_AGREEMENT


def test_the_arena_holds_nearly_twice_the_tokens_in_int8_rows(
    trained_model: GPT2LMHeadModel,
) -> None:
    bf16 = in_dtype(trained_model, torch.bfloat16)
    config = EngineConfig(kv_budget_mb=4)
    plain = Engine(GPT2Forward(bf16), config)
    int8 = Engine(int8_kv_forward(bf16), config)
    try:
        head_dim = plain.forward.dims.head_dim
        expected = 2 * head_dim / (head_dim + 4)  # bf16 rows of 2-byte values, int8 rows
        assert int8.arena.capacity / plain.arena.capacity == pytest.approx(expected, rel=0.02)
        assert int8.arena.buffer.dtype == torch.uint8
    finally:
        plain.close()
        int8.close()


async def test_the_engine_decodes_and_reuses_a_conversation_in_int8_rows(
    trained_model: GPT2LMHeadModel, held_out_prompts: list[list[int]]
) -> None:
    """Greedy replies as with the model's dtype, and the next turn reads the cached prefix."""
    engines = [
        Engine(forward, EngineConfig(kv_budget_mb=8))
        for forward in (int8_kv_forward(trained_model), GPT2Forward(trained_model))
    ]
    try:
        replies = []
        for engine in engines:
            ids = tuple(held_out_prompts[0])
            first = await engine.generate(EngineRequest(ids, GREEDY, cache_key="kv"))
            again = await engine.generate(EngineRequest(ids + first.ids, GREEDY, cache_key="kv"))
            assert again.reused_tokens == len(ids) + len(first.ids) - 1
            replies.append((first.ids, again.ids))
    finally:
        for engine in engines:
            engine.close()
    (int8_first, int8_again), (plain_first, plain_again) = replies
    assert int8_first[:4] == plain_first[:4] and int8_again[:4] == plain_again[:4]


def test_int8_kv_without_the_kernel_stays_in_the_models_dtype(
    trained_model: GPT2LMHeadModel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        forward = GPT2Forward(trained_model, kernels="off", kv_dtype="int8")
    assert (forward.kv_storage.dtype, forward.kv_storage.row) == (
        torch.float32,
        forward.dims.head_dim,
    )
    assert "KOBOT_ENGINE_KV_DTYPE=int8 needs the C++ attention" in caplog.text


def test_an_unknown_kv_dtype_is_refused(trained_model: GPT2LMHeadModel) -> None:
    with pytest.raises(ValueError, match="KOBOT_ENGINE_KV_DTYPE: must be auto, model or int8"):
        GPT2Forward(trained_model, kv_dtype="fp8")  # type: ignore[arg-type]
