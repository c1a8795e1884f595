"""The engine's batched common paths: tie-safe top-k candidates, batched draws, fresh KV slots,
and the batch bound the KV budget gives."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.generation.base import SamplingParams
from core.generation.engine import MAX_BATCH, REQUEST_TOKENS, Engine, EngineConfig, auto_max_batch
from core.generation.engine_kv import KVArena
from core.generation.engine_sampling import (
    SamplerState,
    choose_tokens,
    draw_rows,
    full_distribution,
    tied_candidates,
    top_candidates,
)
from core.generation.gpt2_forward import GPT2Forward, dims_of

VOCAB = 1000


def bf16_like_logits(rows: int, seed: int) -> torch.Tensor:
    """Scores rounded to bf16, as the engine's bf16 LM head gives them: many exact ties."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, VOCAB, generator=generator) * 3).bfloat16().float()


def test_ties_at_the_kth_score_are_widened_not_dropped() -> None:
    logits = bf16_like_logits(6, seed=1)
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.95)] * 6
    _, _, ties = top_candidates(logits, params, width=51)
    assert ties  # bf16 rounding ties the 50th score with the 51st in some rows
    probs, ids = tied_candidates(logits[ties], [params[i] for i in ties])
    for position, row in enumerate(ties):
        ours = torch.zeros(VOCAB).index_add_(0, ids[position], probs[position])
        expected = full_distribution(logits[row], params[row])
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
        assert int((ours > 0).sum()) > 50 or params[row].top_p < 1.0


def test_batched_draws_follow_the_distribution_and_skip_zero_columns() -> None:
    probs = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.25, 0.25, 0.5, 0.0]])
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    counts = torch.zeros(2, 4)
    for _ in range(2000):
        for row, column in enumerate(draw_rows(probs, generators)):
            counts[row, column] += 1
    assert counts[0, 2:].sum() == 0 and counts[1, 3] == 0
    torch.testing.assert_close(counts / 2000, probs, atol=0.05, rtol=0)


def test_seeded_rows_draw_the_same_alone_or_batched_with_ties() -> None:
    logits = bf16_like_logits(3, seed=2)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95)

    def state(seed: int) -> SamplerState:
        return SamplerState(params, [7, 8], 2, generator=torch.Generator().manual_seed(seed))

    alone = [choose_tokens(logits[i : i + 1].clone(), [state(10 + i)])[0] for i in range(3)]
    batched = choose_tokens(logits.clone(), [state(10 + i) for i in range(3)])
    assert batched == alone


def test_slots_are_zeroed_the_first_time_they_are_handed_out() -> None:
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)
    arena = KVArena(dims_of(config), 64 * 1024, "cpu", torch.float32)
    arena.buffer.fill_(float("nan"))  # whatever fresh memory held
    first = arena.allocate(20)
    assert first is not None and torch.count_nonzero(arena.view(first)) == 0
    arena.view(first).fill_(2.0)
    arena.free(first)
    again = arena.allocate(20)  # used before: its values are finite, not zeroed again
    assert again is not None and torch.all(arena.view(again) == 2.0)


def test_the_default_batch_bound_is_what_the_kv_budget_holds() -> None:
    assert auto_max_batch(REQUEST_TOKENS * 40 + 5) == 40
    assert auto_max_batch(3) == 1
    assert auto_max_batch(10**9) == MAX_BATCH
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100)
    engine = Engine(GPT2Forward(GPT2LMHeadModel(config).eval()), EngineConfig(kv_budget_mb=16))
    try:
        assert engine.max_batch == auto_max_batch(engine.arena.capacity) > 1
    finally:
        engine.close()
    explicit = Engine(
        GPT2Forward(GPT2LMHeadModel(config).eval()), EngineConfig(max_batch=3, kv_budget_mb=16)
    )
    try:
        assert explicit.max_batch == 3
    finally:
        explicit.close()
