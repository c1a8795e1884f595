"""The C++ top-k (`kobot::top_k`): the sampler's candidates, against a sort of the whole row,
and the sampler's draws with it against torch's own top-k."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.generation.base import SamplingParams
from core.generation.engine.forward import GPT2Forward
from core.generation.engine.kernels.top_k import TopK, load_top_k, torch_top_k
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
    assert GPT2Forward(model, kernels="off").top_k is torch_top_k
