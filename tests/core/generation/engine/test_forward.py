"""The engine's own GPT-2 forward pass against `GPT2LMHeadModel` (same weights, shared).

Tolerance: float32 logits within 1e-4 absolute of Hugging Face's (observed ≤ 5e-7 on these
models, whose logits are of order 1); bf16 within 0.1 (bf16 keeps 8 bits of mantissa).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.generation.engine.forward import GPT2Forward, SeqChunk, UnsupportedModelError

FP32_ATOL = 1e-4
BF16_ATOL = 1e-1


def model(dtype: torch.dtype = torch.float32, **overrides: Any) -> GPT2LMHeadModel:
    values: dict[str, Any] = {"n_layer": 3, "n_embd": 96, "n_head": 4, "vocab_size": 51200}
    values.update(overrides)
    torch.manual_seed(0)
    built = GPT2LMHeadModel(GPT2Config(**values))
    torch.nn.Module.to(built, dtype=dtype)
    with torch.no_grad():  # larger weights than the init's, so the layers matter
        for parameter in built.transformer.h.parameters():
            parameter.mul_(3)
    return built.eval()


def block(forward: GPT2Forward, capacity: int = 128) -> torch.Tensor:
    d = forward.dims
    return torch.zeros(d.n_layer, 2, d.n_head, capacity, d.head_dim, dtype=forward.dtype)


def reference(hf: GPT2LMHeadModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def hf() -> GPT2LMHeadModel:
    return model()


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return torch.randint(5, 51200, (90,), generator=torch.Generator().manual_seed(1)).tolist()


def test_prefill_logits_match(hf: GPT2LMHeadModel, ids: list[int]) -> None:
    forward = GPT2Forward(hf)
    logits = forward.logits([SeqChunk(block(forward), 0, ids)])
    torch.testing.assert_close(logits[0], reference(hf, ids)[-1], atol=FP32_ATOL, rtol=0)


def test_chunked_prefill_and_decode_match(hf: GPT2LMHeadModel, ids: list[int]) -> None:
    """A prompt read in two chunks, then token by token, gives the full pass's logits."""
    forward = GPT2Forward(hf)
    full = reference(hf, ids)
    kv = block(forward)
    forward.logits([SeqChunk(kv, 0, ids[:40])])
    chunk = forward.logits([SeqChunk(kv, 40, ids[40:70])])
    torch.testing.assert_close(chunk[0], full[69], atol=FP32_ATOL, rtol=0)
    for position in range(70, 90):
        step = forward.logits([SeqChunk(kv, position, ids[position : position + 1])])
        torch.testing.assert_close(step[0], full[position], atol=FP32_ATOL, rtol=0)


def test_ragged_batch_matches_each_sequence_alone(hf: GPT2LMHeadModel, ids: list[int]) -> None:
    """Packed in one pass: a decode step, a fresh prompt and a chunk after a cached prefix."""
    forward = GPT2Forward(hf)
    a, b, c = block(forward), block(forward), block(forward)
    forward.logits([SeqChunk(a, 0, ids[:50]), SeqChunk(c, 0, ids[5:25])])
    out = forward.logits(
        [
            SeqChunk(a, 50, ids[50:51]),
            SeqChunk(b, 0, ids[:7]),
            SeqChunk(c, 20, ids[25:60]),
        ]
    )
    torch.testing.assert_close(out[0], reference(hf, ids[:51])[-1], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out[1], reference(hf, ids[:7])[-1], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out[2], reference(hf, ids[5:60])[-1], atol=FP32_ATOL, rtol=0)


def test_blocks_in_one_buffer_are_written_with_one_copy_per_layer(
    hf: GPT2LMHeadModel, ids: list[int]
) -> None:
    """The engine's layout: blocks of different capacities, views of one flat arena."""
    forward = GPT2Forward(hf)
    d = forward.dims
    per_token = d.kv_elements_per_token
    buffer = torch.zeros(400 * per_token)
    spans = [(16, 64), (96, 128), (240, 96)]  # (first token slot, capacity)
    a, b, c = (
        buffer[start * per_token : (start + cap) * per_token].view(
            d.n_layer, 2, d.n_head, cap, d.head_dim
        )
        for start, cap in spans
    )
    forward.logits([SeqChunk(a, 0, ids[:50]), SeqChunk(c, 0, ids[5:25])], buffer)
    out = forward.logits(
        [SeqChunk(a, 50, ids[50:51]), SeqChunk(b, 0, ids[:7]), SeqChunk(c, 20, ids[25:60])],
        buffer,
    )
    torch.testing.assert_close(out[0], reference(hf, ids[:51])[-1], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out[1], reference(hf, ids[:7])[-1], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out[2], reference(hf, ids[5:60])[-1], atol=FP32_ATOL, rtol=0)
    assert torch.count_nonzero(buffer[: 16 * per_token]) == 0  # nothing outside the blocks


def test_a_decoding_token_after_a_prompt_chunk_in_one_buffer_matches(
    hf: GPT2LMHeadModel, ids: list[int]
) -> None:
    """One-token chunks before and after a prompt chunk (after a cached prefix) in one step:
    every token's K/V in place before any reads, then the next step reads them."""
    forward = GPT2Forward(hf)
    d = forward.dims
    per_token = d.kv_elements_per_token
    buffer = torch.zeros(300 * per_token)
    a, b, c = (
        buffer[start * per_token : (start + 96) * per_token].view(
            d.n_layer, 2, d.n_head, 96, d.head_dim
        )
        for start in (0, 100, 200)
    )
    forward.logits([SeqChunk(a, 0, ids[:30]), SeqChunk(b, 0, ids[:12]), SeqChunk(c, 0, ids[:5])],
                   buffer)  # fmt: skip
    out = forward.logits(
        [SeqChunk(c, 5, ids[5:6]), SeqChunk(b, 12, ids[12:40]), SeqChunk(a, 30, ids[30:31])],
        buffer,
    )
    torch.testing.assert_close(out[0], reference(hf, ids[:6])[-1], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out[1], reference(hf, ids[:40])[-1], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out[2], reference(hf, ids[:31])[-1], atol=FP32_ATOL, rtol=0)
    after = forward.logits([SeqChunk(a, 31, ids[31:32])], buffer)
    torch.testing.assert_close(after[0], reference(hf, ids[:32])[-1], atol=FP32_ATOL, rtol=0)


def test_bf16_logits_match_within_bf16_rounding(ids: list[int]) -> None:
    hf = model(torch.bfloat16)
    forward = GPT2Forward(hf)
    assert forward.dtype == torch.bfloat16
    logits = forward.logits([SeqChunk(block(forward), 0, ids[:40])])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], reference(hf, ids[:40])[-1], atol=BF16_ATOL, rtol=0)


def test_the_weights_are_shared_not_copied(hf: GPT2LMHeadModel) -> None:
    forward = GPT2Forward(hf)
    assert forward.wte.data_ptr() == hf.transformer.wte.weight.data_ptr()
    first_block: Any = hf.transformer.h[0]
    assert forward.layers[0].fc_w.data_ptr() == first_block.mlp.c_fc.weight.data_ptr()


@pytest.mark.parametrize(
    "overrides", [{"scale_attn_by_inverse_layer_idx": True}, {"reorder_and_upcast_attn": True}]
)
def test_gpt2_variants_it_does_not_reproduce_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedModelError):
        GPT2Forward(model(n_layer=1, n_embd=32, n_head=2, **overrides))


def test_compile_mode_compiles_the_dense_parts(
    hf: GPT2LMHeadModel, ids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile itself is exercised by hand (it takes tens of seconds); here: it is applied
    to both dense functions and the pass still gives Hugging Face's logits."""
    compiled: list[str] = []

    def fake_compile(function: Any, **options: Any) -> Any:
        compiled.append(function.__name__)
        assert options == {"dynamic": True}
        return function

    monkeypatch.setattr(torch, "compile", fake_compile)
    forward = GPT2Forward(hf, "compile")
    assert compiled == ["_pre_attention", "_post_attention"]
    logits = forward.logits([SeqChunk(block(forward), 0, ids[:20])])
    torch.testing.assert_close(logits[0], reference(hf, ids[:20])[-1], atol=FP32_ATOL, rtol=0)
