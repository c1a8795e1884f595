"""Comparing forward passes of the engine (another dtype, int8) with the fp32 one, position by
position over the same prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GPT2LMHeadModel

from core.generation.engine.forward import GPT2Forward, SeqChunk
from core.generation.engine.kv import KVArena


def in_dtype(model: GPT2LMHeadModel, dtype: torch.dtype) -> GPT2LMHeadModel:
    copy = GPT2LMHeadModel(model.config)
    copy.load_state_dict(model.state_dict())
    torch.nn.Module.to(copy, dtype=dtype)
    return copy.eval()


def every_position(forward: GPT2Forward, ids: list[int]) -> torch.Tensor:
    """Float32 logits after each prefix of `ids` (one token at a time, through the KV in an
    arena of the forward's `kv_storage`, as the engine keeps it)."""
    storage = forward.kv_storage
    arena = KVArena(forward.dims, 1 << 24, "cpu", storage.dtype, storage.row)
    block = arena.allocate(len(ids))
    assert block is not None
    kv = arena.view(block)
    steps = [SeqChunk(kv, i, ids[i : i + 1]) for i in range(len(ids))]
    return torch.cat([forward.logits([step], arena.buffer) for step in steps])


@dataclass(frozen=True)
class Agreement:
    max_error: float  # the largest logit difference anywhere
    top1: float  # the share of positions whose most likely next token is the same


def agreement(ours: GPT2Forward, reference: GPT2Forward, prompts: Sequence[list[int]]) -> Agreement:
    errors, agree, total = [], 0, 0
    for ids in prompts:
        mine, theirs = every_position(ours, ids), every_position(reference, ids)
        errors.append(float((mine - theirs).abs().max()))
        agree += int((mine.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(ids)
    return Agreement(max(errors), agree / total)
