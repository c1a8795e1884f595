"""A tiny GPT-2 trained briefly on Korean chat data, for tests of numeric agreement.

Random weights give near-uniform logits whose top-1 flips at any rounding; a model trained for
a few hundred steps has the peaked distributions a real model has, so agreement between dtypes
or quantized weights means something. Its vocabulary is the tokens the training text uses (ids
remapped densely, every other id to one `unknown` row), which keeps the LM head small enough to
train in seconds on a CPU; trained once per session.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.generation.tokenizer import KoGPT2Tokenizer

STEPS = 150
CONTEXT = 48
BATCH = 8
ROWS = 1500


def chat_ids(tokenizer: KoGPT2Tokenizer, csv_path: Path, limit: int = ROWS) -> list[int]:
    """Question/answer pairs as one token stream, `User:`/`AI:` turns as kobot prompts them."""
    ids: list[int] = []
    with csv_path.open(encoding="utf-8") as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            if index >= limit:
                break
            ids += tokenizer.encode_text(f"User: {row['Q']}\nAI: {row['A']}\n")
            ids.append(tokenizer.eos_id)
    return ids


class Vocabulary:
    """The training text's token ids, renumbered 1…n; 0 stands for every other id."""

    def __init__(self, ids: list[int]) -> None:
        self.index = {token: i + 1 for i, token in enumerate(sorted(set(ids)))}

    def __len__(self) -> int:
        return len(self.index) + 1

    def encode(self, ids: list[int]) -> list[int]:
        return [self.index.get(token, 0) for token in ids]


def train_tiny(
    tokenizer: KoGPT2Tokenizer, csv_path: Path, seed: int = 0
) -> tuple[GPT2LMHeadModel, Vocabulary]:
    torch.manual_seed(seed)
    raw = chat_ids(tokenizer, csv_path)
    vocabulary = Vocabulary(raw)
    config = GPT2Config(vocab_size=len(vocabulary), n_positions=256, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)
    stream = torch.tensor(vocabulary.encode(raw))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(STEPS):
        starts = torch.randint(0, len(stream) - CONTEXT - 1, (BATCH,), generator=generator)
        batch = torch.stack([stream[s : s + CONTEXT] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), vocabulary


def held_out(
    tokenizer: KoGPT2Tokenizer, csv_path: Path, vocabulary: Vocabulary, n: int = 8
) -> list[list[int]]:
    """Prompts from the end of the data set (not trained on), each ending with `AI:`."""
    with csv_path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[-n:]
    return [vocabulary.encode(tokenizer.encode_text(f"User: {row['Q']}\nAI:")) for row in rows]
