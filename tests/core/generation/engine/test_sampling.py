"""The engine's batched token choice against Hugging Face's logits processors, on fixed logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from core.generation.base import SamplingParams
from core.generation.engine.sampling import (
    NgramBans,
    SamplerState,
    apply_bans,
    apply_repetition_penalty,
    choose_tokens,
    full_distribution,
    top_candidates,
)

VOCAB = 400
EOS = 1


def fixed_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def sequences(rows: int, length: int = 30) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    # a small alphabet, so n-grams repeat and penalties bite
    return [torch.randint(2, 40, (length + row,), generator=gen).tolist() for row in range(rows)]


def hf_penalties(
    ids: list[int], scores: torch.Tensor, params: SamplingParams, prompt_len: int, min_new: int
) -> torch.Tensor:
    input_ids = torch.tensor([ids])
    row = scores.unsqueeze(0).clone()
    if params.repetition_penalty != 1.0:
        row = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, row)
    if params.no_repeat_ngram_size > 0:
        row = NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size)(input_ids, row)
    if min_new:
        row = MinNewTokensLengthLogitsProcessor(prompt_len, min_new, EOS)(input_ids, row)
    return row[0]


def hf_warped(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    row = scores.unsqueeze(0)
    dummy = torch.zeros(1, 1, dtype=torch.long)
    if params.temperature != 1.0:
        row = TemperatureLogitsWarper(params.temperature)(dummy, row)
    if params.top_k:
        row = TopKLogitsWarper(params.top_k)(dummy, row)
    if params.top_p < 1.0:
        row = TopPLogitsWarper(params.top_p)(dummy, row)
    return row[0].softmax(-1)


PENALTY_PARAMS = [
    SamplingParams(repetition_penalty=1.2, no_repeat_ngram_size=3),
    SamplingParams(repetition_penalty=1.0, no_repeat_ngram_size=2),
    SamplingParams(repetition_penalty=2.5, no_repeat_ngram_size=0),
    SamplingParams(repetition_penalty=1.3, no_repeat_ngram_size=1),
]


def test_penalties_and_bans_match_hugging_face_per_row() -> None:
    ids = sequences(len(PENALTY_PARAMS))
    logits = fixed_logits(len(PENALTY_PARAMS))
    min_new = [0, 5, 0, 0]
    states = [
        SamplerState(p, list(seq), prompt_len=len(seq) - 2, eos_id=EOS, min_new_tokens=m)
        for p, seq, m in zip(PENALTY_PARAMS, ids, min_new, strict=True)
    ]
    ours = logits.clone()
    apply_repetition_penalty(ours, states)
    apply_bans(ours, states)
    for row, state in enumerate(states):
        expected = hf_penalties(ids[row], logits[row], state.params, state.prompt_len, min_new[row])
        torch.testing.assert_close(ours[row], expected, atol=0, rtol=0)


def test_incremental_ngram_bans_match_hugging_face() -> None:
    seq = sequences(1, 60)[0]
    bans = NgramBans(3, seq[:10])
    grown = list(seq[:10])
    for token in seq[10:]:
        grown.append(token)
        bans.added(grown)
        hf = NoRepeatNGramLogitsProcessor(3)(torch.tensor([grown]), torch.zeros(1, VOCAB))
        assert bans.banned(grown) == set(torch.nonzero(hf[0].isinf()).flatten().tolist())


WARP_PARAMS = [
    SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
    SamplingParams(temperature=1.0, top_k=5, top_p=1.0),
    SamplingParams(temperature=1.7, top_k=120, top_p=0.5),
    SamplingParams(temperature=0.3, top_k=1, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=VOCAB * 2, top_p=0.8),
]


def test_top_candidates_match_hugging_face_warpers() -> None:
    logits = fixed_logits(len(WARP_PARAMS), seed=3)
    probs, ids, ties = top_candidates(logits, WARP_PARAMS)
    assert ties == []
    for row, params in enumerate(WARP_PARAMS):
        ours = torch.zeros(VOCAB).index_add_(0, ids[row], probs[row])
        torch.testing.assert_close(ours, hf_warped(logits[row], params), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=0, top_p=0.9),
        SamplingParams(temperature=1.3, top_k=0, top_p=1.0),
        SamplingParams(temperature=1.0, top_k=3, top_p=0.6),
    ],
)
def test_full_distribution_matches_hugging_face(params: SamplingParams) -> None:
    logits = fixed_logits(1, seed=4)[0]
    torch.testing.assert_close(
        full_distribution(logits, params), hf_warped(logits, params), atol=1e-6, rtol=1e-5
    )


def test_a_tie_at_the_kth_score_is_reported_and_kept_like_hugging_face() -> None:
    logits = fixed_logits(1, seed=6)
    top = logits[0].topk(4).values
    logits[0, logits[0] == top[3]] = top[2]  # the 3rd and 4th best now tie
    params = [SamplingParams(temperature=1.0, top_k=3, top_p=1.0)]
    assert top_candidates(logits, params)[2] == [0]
    kept = full_distribution(logits[0], params[0]) > 0
    assert int(kept.sum()) == 4  # Hugging Face keeps every tied token


def state(params: SamplingParams, seed: int, ids: list[int] | None = None) -> SamplerState:
    prompt = ids or [7, 8, 9]
    generator = torch.Generator().manual_seed(seed)
    return SamplerState(params, list(prompt), len(prompt), generator=generator)


def test_greedy_rows_take_the_argmax_after_penalties() -> None:
    logits = fixed_logits(1, seed=8).repeat(2, 1)
    first, second = logits[0].topk(2).indices.tolist()
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)
    banned = SamplingParams(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=1)
    tokens = choose_tokens(logits, [state(greedy, 0), state(banned, 0, [first])])
    assert tokens == [first, second]


def test_seeded_rows_are_reproducible_whatever_the_batch() -> None:
    sampled = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    logits = fixed_logits(3, seed=9)
    alone = choose_tokens(logits[1:2].clone(), [state(sampled, 42)])
    other = dataclasses.replace(sampled, top_k=0, temperature=0.5)
    batched = choose_tokens(
        logits.clone(),
        [state(other, 1), state(sampled, 42), state(SamplingParams(temperature=0), 0)],
    )
    assert batched[1] == alone[0]
    draws = {tuple(choose_tokens(logits[1:2].clone(), [state(sampled, s)])) for s in range(30)}
    assert len(draws) > 1  # it does sample


def test_the_global_rng_is_left_alone() -> None:
    before = torch.get_rng_state()
    choose_tokens(fixed_logits(2), [state(SamplingParams(), 1), state(SamplingParams(top_k=0), 2)])
    assert torch.equal(torch.get_rng_state(), before)
