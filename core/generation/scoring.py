"""Log-likelihoods of continuations: the measure behind zero-shot classification by scoring.

All (prompt, continuation) pairs go through the model in one batched forward pass, right-padded
(so every real token keeps its position) with an attention mask. The output layer runs only at
the positions that predict a continuation token: with KoGPT2's 51,200-word vocabulary, full
logits for a batch would cost hundreds of megabytes for a handful of useful rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from core.generation.device import LoadedModel


def continuation_log_probs(
    model: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, device: str
) -> list[float]:
    """For each pair, log P(continuation | prompt) summed over the continuation's tokens."""
    width = max(len(prompt) + len(continuation) for prompt, continuation in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    rows: list[int] = []
    positions: list[int] = []
    for row, (prompt, continuation) in enumerate(pairs):
        tokens = [*prompt, *continuation]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        for index in range(len(prompt), len(tokens)):
            rows.append(row)
            positions.append(index)
    ids, mask = ids.to(device), mask.to(device)
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    where_rows = torch.tensor(rows, device=ids.device)
    where_positions = torch.tensor(positions, device=ids.device)
    logits = model.get_output_embeddings()(hidden[where_rows, where_positions - 1]).float()
    picked = torch.log_softmax(logits, dim=-1).gather(1, ids[where_rows, where_positions, None])
    totals = torch.zeros(len(pairs), dtype=torch.float64, device=ids.device)
    totals.index_add_(0, where_rows, picked[:, 0].double())
    return [float(total) for total in totals.tolist()]


def scoring_job(
    loaded: LoadedModel, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
) -> Callable[[], list[float]]:
    """`continuation_log_probs` of the pairs on `loaded`, as work for the thread that serves the
    model (the engine's, or the Hugging Face decoder's worker: `core.generation.threads`)."""
    pairs = [(list(p), list(c)) for p, c in zip(prompts, continuations, strict=True)]

    def run() -> list[float]:
        with torch.inference_mode():
            return continuation_log_probs(
                loaded.model, pairs, loaded.tokenizer.pad_id, loaded.device
            )

    return run
