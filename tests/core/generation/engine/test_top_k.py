"""The C++ top-k (`kobot::top_k`): the sampler's candidates, against a sort of the whole row,
and the sampler's draws with it against torch's own top-k; the C++ sampler (`kobot::sample`):
the same choice as the Python sampler's, token for token."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.generation.base import SamplingParams
from core.generation.engine.forward import GPT2Forward
from core.generation.engine.kernels.top_k import (
    FusedSample,
    TopK,
    load_fused_sample,
    load_top_k,
    torch_top_k,
)
from core.generation.engine.sampling import SamplerState, choose_tokens, top_candidates
from tests.support.kernels import built_or_skip, needs_compiler


@pytest.fixture(scope="module")
def kernel() -> TopK:
    return built_or_skip(load_top_k("auto"))


def reference(row: list[float], k: int) -> list[int]:
    """The k best ids: larger first, NaN above all, equal values by the lower id."""
    return sorted(range(len(row)), key=lambda i: (not math.isnan(row[i]), -row[i], i))[:k]


def assert_selects_like_a_sort(kernel: TopK, scores: torch.Tensor, k: int) -> None:
    values, ids = kernel(scores, k)
    assert values.shape == ids.shape == (scores.shape[0], k) and ids.dtype == torch.long
    for row, (row_values, row_ids) in enumerate(zip(values, ids, strict=True)):
        expected = reference(scores[row].tolist(), k)
        assert row_ids.tolist() == expected
        torch.testing.assert_close(row_values, scores[row, expected], equal_nan=True)


@pytest.mark.parametrize("vocab", [51200, 300])  # KoGPT2's (vector chunks) and a small one
@pytest.mark.parametrize("k", [1, 101, 300])
def test_the_k_best_scores_come_in_descending_order(kernel: TopK, vocab: int, k: int) -> None:
    scores = torch.randn(3, vocab, generator=torch.Generator().manual_seed(k)) * 4
    assert_selects_like_a_sort(kernel, scores, k)


def test_ties_go_to_the_lower_id_and_nan_ranks_above_infinity(kernel: TopK) -> None:
    generator = torch.Generator().manual_seed(3)
    tied = torch.randint(0, 5, (2, 51200), generator=generator).float()  # thousands of ties
    assert_selects_like_a_sort(kernel, tied, 101)
    banned = torch.full((1, 51200), float("-inf"))
    banned[0, [40_000, 7, 51_199]] = torch.tensor([1.0, float("inf"), float("nan")])
    assert_selects_like_a_sort(kernel, banned, 10)  # NaN, inf, 1.0, then -inf by lowest id
    signed_zero = torch.tensor([[0.0, -0.0, -1.0, 2.0]])
    assert kernel(signed_zero, 4)[1].tolist() == [[3, 0, 1, 2]]


@pytest.mark.parametrize(
    ("scores", "k", "message"),
    [(torch.zeros(2, 8, dtype=torch.bfloat16), 1, "float32"), (torch.zeros(8), 1,
     r"\[rows, vocab\]"), (torch.zeros(2, 8), 9, "k must be"), (torch.zeros(2, 8), 0,
     "k must be")],
)  # fmt: skip
def test_bad_arguments_are_refused(
    kernel: TopK, scores: torch.Tensor, k: int, message: str
) -> None:
    with pytest.raises(RuntimeError, match=message):
        kernel(scores, k)


def test_rows_of_any_layout_are_read_as_torch_reads_them(kernel: TopK) -> None:
    columns = torch.randn(51200, 4, generator=torch.Generator().manual_seed(9))
    assert_selects_like_a_sort(kernel, columns.t(), 50)  # each row strided by 4


SAMPLED = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.2)


def test_the_sampler_draws_the_same_tokens_with_the_kernel_as_with_torch(kernel: TopK) -> None:
    logits = torch.randn(6, 51200, generator=torch.Generator().manual_seed(5)) * 3

    def draws(top_k: TopK) -> list[int]:
        states = [
            SamplerState(SAMPLED, [1, 2, 3], 3, generator=torch.Generator().manual_seed(i))
            for i in range(6)
        ]
        return choose_tokens(logits.clone(), states, top_k)

    assert draws(kernel) == draws(torch_top_k)
    probs, ids, ties = top_candidates(logits, [SAMPLED] * 6, 101, kernel)
    torch_probs, torch_ids, torch_ties = top_candidates(logits, [SAMPLED] * 6, 101)
    assert torch.equal(ids, torch_ids) and ties == torch_ties == []
    torch.testing.assert_close(probs, torch_probs, atol=0, rtol=0)


@needs_compiler
def test_the_forward_on_a_cpu_selects_with_the_kernel_unless_told_not_to() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64)).eval()
    assert GPT2Forward(model).top_k is not torch_top_k
    assert GPT2Forward(model).fused_sample is not None
    off = GPT2Forward(model, kernels="off")
    assert off.top_k is torch_top_k and off.fused_sample is None


@pytest.fixture(scope="module")
def fused() -> FusedSample:
    return built_or_skip(load_fused_sample("auto"))


MIXED = [
    SAMPLED,
    SamplingParams(temperature=1.3, top_k=5, top_p=1.0, repetition_penalty=1.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.3, no_repeat_ngram_size=2),
    SamplingParams(temperature=0.7, top_k=0, top_p=0.9),  # the whole vocabulary: Python draws
    SamplingParams(temperature=1.0, top_k=120, top_p=0.5, repetition_penalty=2.0),
    SamplingParams(temperature=0.9, top_k=60_000, top_p=0.8, no_repeat_ngram_size=1),
]


def mixed_states(rows: int, seed: int) -> list[SamplerState]:
    ids = torch.randint(0, 300, (rows, 40), generator=torch.Generator().manual_seed(seed))
    return [
        SamplerState(
            MIXED[row % len(MIXED)],
            ids[row].tolist(),
            prompt_len=35,
            eos_id=1,
            min_new_tokens=8 if row % 3 == 0 else 0,
            generator=torch.Generator().manual_seed(100 * seed + row),
        )
        for row in range(rows)
    ]


@pytest.mark.parametrize("tied", [False, True])
def test_the_fused_sampler_chooses_what_the_python_sampler_chooses(
    kernel: TopK, fused: FusedSample, tied: bool
) -> None:
    rows = 2 * len(MIXED)
    python, native = mixed_states(rows, seed=3), mixed_states(rows, seed=3)
    generator = torch.Generator().manual_seed(int(tied))
    for _ in range(6):  # the penalties and n-gram bans grow with each token
        if tied:  # integer scores: ties at every row's k-th score
            logits = torch.randint(0, 200, (rows, 51200), generator=generator).float()
        else:
            logits = torch.randn(rows, 51200, generator=generator) * 3
        python_logits, native_logits = logits.clone(), logits.clone()
        expected = choose_tokens(python_logits, python, kernel)
        assert choose_tokens(native_logits, native, kernel, fused) == expected
        assert torch.equal(native_logits, python_logits)  # penalized and banned alike
        for python_state, native_state, token in zip(python, native, expected, strict=True):
            python_state.append(token)
            native_state.append(token)
    assert len({token for state in python for token in state.ids[40:]}) > rows  # it samples


def test_a_logits_hook_in_the_batch_takes_the_python_sampler(fused: FusedSample) -> None:
    forced = SamplerState(SAMPLED, [1, 2, 3], 3, hook=lambda ids, row: row.fill_(0).index_fill_(
        0, torch.tensor([7]), 50.0))  # fmt: skip
    assert choose_tokens(torch.randn(1, 64), [forced], torch_top_k, fused) == [7]


def sample_call(fused: FusedSample, **changed: object) -> list[int]:
    arguments: dict[str, object] = {
        "logits": torch.stack([torch.arange(8.0), torch.arange(8.0).flip(0)]),
        "seen": torch.tensor([1, 2, 3]),
        "seen_offsets": [0, 1, 3],
        "penalty": [1.2, 1.2],
        "banned": [0],
        "banned_offsets": [0, 0, 1],
        "top_k": [2, 0],
        "temperature": [1.0, 1.0],
        "top_p": [1.0, 1.0],
        "uniform": [0.5, 0.0],
    }
    arguments.update(changed)
    return fused(*arguments.values())


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"logits": torch.zeros(2, 8, dtype=torch.bfloat16)}, "float32"),
        ({"seen": torch.tensor([1, 2, 8])}, "seen ids must be in the vocab"),
        ({"seen_offsets": [0, 2, 2]}, "seen offsets must be rows"),
        ({"banned_offsets": [0, 2, 1]}, "banned offsets must not decrease"),
        ({"banned": [-1]}, "banned ids must be in the vocab"),
        ({"top_p": [1.0]}, "one value a row"),
    ],
)
def test_bad_sampler_arguments_are_refused(
    fused: FusedSample, changed: dict[str, object], message: str
) -> None:
    assert sample_call(fused) == [7, 1]  # row 0 among 7 and 6, row 1's argmax past its ban
    with pytest.raises(RuntimeError, match=message):
        sample_call(fused, **changed)
