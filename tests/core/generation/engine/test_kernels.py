"""The C++ attention (`kobot::attention`): its writes of the decoding rows' new K/V, its
results against softmax attention (decoding rows, and a prompt chunk's rows causally over K/V
already written), its argument checks, and how it is built, reused and done without."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.generation.base import SamplingParams
from core.generation.engine.forward import GPT2Forward
from core.generation.engine.kernels.attention import (
    AttentionKernel,
    load_attention,
)
from core.generation.engine.kernels.build import (
    KernelBuildError,
    default_kernel_dir,
    isa_level,
    library_path,
    load_library,
)
from core.generation.engine.scheduler import Engine, EngineConfig, EngineRequest
from tests.support.kernels import built_or_skip, needs_compiler


@pytest.fixture(scope="module")
def kernel() -> AttentionKernel:
    return built_or_skip(load_attention("auto"))


def reference(
    query: torch.Tensor, blocks: list[torch.Tensor], lengths: list[int], scale: float
) -> torch.Tensor:
    """Row b: softmax attention over the first lengths[b] keys of block b (`[2, H, cap, D]`),
    in float64."""
    rows = []
    for b, (block, n) in enumerate(zip(blocks, lengths, strict=True)):
        k, v = block[0, :, :n].double(), block[1, :, :n].double()
        scores = torch.einsum("hd,hld->hl", query[b].double(), k) * scale
        rows.append(torch.einsum("hl,hld->hd", scores.softmax(-1), v))
    return torch.stack(rows)


Layout = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""The kernel's key_offsets, value_offsets, head_strides and lengths."""
Case = tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], Layout, list[int]]


def random_case(dtype: torch.dtype, head_dim: int, seed: int) -> Case:
    """Four blocks of different capacities in one buffer, out of order, with gaps between, and
    each row's query, key and value `[4, 3, heads, head_dim]`, strided as the engine's are (a
    slice of a wider packed batch)."""
    generator = torch.Generator().manual_seed(seed)
    heads, capacities, lengths = 4, [16, 48, 32, 40], [1, 48, 17, 33]
    starts = [x * head_dim for x in (670, 2, 400, 810)]
    buffer = torch.randn(1150 * head_dim, generator=generator).mul(2).to(dtype)
    blocks = []
    for start, capacity in zip(starts, capacities, strict=True):
        size = 2 * heads * capacity * head_dim
        blocks.append(buffer[start : start + size].view(2, heads, capacity, head_dim))
    packed = torch.randn(6, 3, heads, head_dim, generator=generator).to(dtype)
    qkv = packed[1:5]
    value_offsets = [s + heads * c * head_dim for s, c in zip(starts, capacities, strict=True)]
    args = (
        torch.tensor(starts),
        torch.tensor(value_offsets),
        torch.tensor([c * head_dim for c in capacities]),
        torch.tensor(lengths),
    )
    return qkv, buffer, blocks, args, lengths


@pytest.mark.parametrize("head_dim", [64, 40])  # GPT-2's (hand-vectorized) and any other
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_each_row_writes_its_new_kv_and_attends_over_its_own_block_and_length_only(
    kernel: AttentionKernel, head_dim: int, dtype: torch.dtype, tolerance: float
) -> None:
    qkv, buffer, blocks, args, lengths = random_case(dtype, head_dim, seed=head_dim)
    before = buffer.clone()
    got = kernel(qkv, buffer, *args, 0.125)
    assert got.dtype == dtype and got.shape == (4, qkv.shape[2], head_dim)
    undone = buffer.clone()
    for block, row, n in zip(blocks, qkv, lengths, strict=True):
        assert torch.equal(block[:, :, n - 1], row[1:])  # the new key and value, in place
        same_in = [t.as_strided(block.shape, block.stride(), block.storage_offset())
                   for t in (undone, before)]  # fmt: skip
        same_in[0][:, :, n - 1] = same_in[1][:, :, n - 1]
    assert torch.equal(undone, before)  # nothing else was written
    expected = reference(qkv[:, 0], blocks, lengths, 0.125)
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance)
    blocks[2][:, :, lengths[2] :] = 1e4  # a block's positions past its length are never read
    buffer[: 2 * head_dim] = float("nan")  # nor anything outside the blocks
    torch.testing.assert_close(kernel(qkv, buffer, *args, 0.125), got, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("which", "row", "value", "message"),
    [(3, 0, 0, "length out of range"), (3, 1, 49, "length out of range"),
     (0, 3, 1140 * 64, "outside the KV buffer"), (1, 2, -1, "outside the KV buffer"),
     (0, 0, None, "one entry of key_offsets per query row")],
)  # fmt: skip
def test_bad_arguments_are_refused_before_anything_is_read(
    kernel: AttentionKernel, which: int, row: int, value: int | None, message: str
) -> None:
    qkv, buffer, _, layout, _ = random_case(torch.float32, 64, seed=4)
    args = list(layout)
    if value is None:
        args[which] = args[which][:2]
    else:
        args[which][row] = value
    before = buffer.clone()
    with pytest.raises(RuntimeError, match=message):
        kernel(qkv, buffer, args[0], args[1], args[2], args[3], 0.125)
    assert torch.equal(buffer, before)  # nothing written either


def test_a_prompt_chunks_rows_write_first_then_each_attends_up_to_its_own_position(
    kernel: AttentionKernel,
) -> None:
    """A decoding row, then a 5-token prompt chunk of another sequence after 3 cached
    positions: every row's K/V is in place before any row reads, each attends causally."""
    generator = torch.Generator().manual_seed(7)
    heads, dim, capacity = 2, 64, 12
    size = 2 * heads * capacity * dim
    buffer = torch.randn(2 * size, generator=generator)
    blocks = [buffer[i * size : (i + 1) * size].view(2, heads, capacity, dim) for i in range(2)]
    qkv = torch.randn(6, 3, heads, dim, generator=generator)
    lengths, rows_block = [9, 4, 5, 6, 7, 8], [0, 1, 1, 1, 1, 1]
    offsets = torch.tensor([b * size for b in rows_block])
    got = kernel(
        qkv, buffer, offsets, offsets + heads * capacity * dim,
        torch.full((6,), capacity * dim), torch.tensor(lengths), 0.125,
    )  # fmt: skip
    for row in range(6):
        block = blocks[rows_block[row]]
        assert torch.equal(block[:, :, lengths[row] - 1], qkv[row, 1:])
        expected = reference(qkv[row : row + 1, 0], [block], [lengths[row]], 0.125)
        torch.testing.assert_close(got[row : row + 1].double(), expected, atol=1e-5, rtol=1e-5)


def int8_rows(values: torch.Tensor) -> torch.Tensor:
    """`[..., D]` float as the arena's int8 rows `[..., D + 4]` bytes (int8, float32 scale)."""
    peak = values.float().abs().amax(dim=-1, keepdim=True)
    scale, inverse = peak / 127, torch.where(peak > 0, 127 / peak, 0)
    q = (values.float() * inverse).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([q.view(torch.uint8), scale.float().contiguous().view(torch.uint8)], -1)


def dequantized(rows: torch.Tensor) -> torch.Tensor:
    dim = rows.shape[-1] - 4
    scale = rows[..., dim:].contiguous().view(torch.float32)
    return rows[..., :dim].view(torch.int8).double() * scale.double()


@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_are_written_quantized_and_read_with_their_scales(
    kernel: AttentionKernel, head_dim: int, dtype: torch.dtype
) -> None:
    """A uint8 arena of int8 rows: each new key and value is stored as int8 per row with its
    scale, and attention is exact over what is stored (and close to the float one)."""
    generator = torch.Generator().manual_seed(head_dim)
    heads, capacity, width = 3, 20, head_dim + 4
    lengths = [1, 20, 7]
    keys = torch.randn(3, heads, capacity, head_dim, generator=generator) * 2
    values = torch.randn(3, heads, capacity, head_dim, generator=generator)
    blocks = torch.stack([int8_rows(keys), int8_rows(values)], dim=1)  # [3, 2, H, cap, width]
    buffer = torch.cat([torch.zeros(width * 8, dtype=torch.uint8), blocks.flatten()])
    qkv = (torch.randn(3, 3, heads, head_dim, generator=generator)).to(dtype)
    size = 2 * heads * capacity * width
    starts = torch.tensor([8 * width + b * size for b in range(3)])
    got = kernel(
        qkv, buffer, starts, starts + heads * capacity * width,
        torch.full((3,), capacity * width), torch.tensor(lengths), 0.125,
    )  # fmt: skip
    assert got.dtype == dtype and got.shape == (3, heads, head_dim)
    stored = buffer[8 * width :].view(3, 2, heads, capacity, width)
    for b, n in enumerate(lengths):
        new = int8_rows(qkv[b, 1:].float())  # [2, H, width]
        written = stored[b, :, :, n - 1]
        assert torch.equal(written[..., head_dim:], new[..., head_dim:])  # the same scales
        steps = written[..., :head_dim].view(torch.int8).int() - new[..., :head_dim].view(
            torch.int8
        )
        assert int(steps.abs().max()) <= 1 and int(steps.count_nonzero()) <= 2  # exact ties
    exact = reference(qkv[:, 0], [dequantized(block) for block in stored], lengths, 0.125)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), exact, atol=tolerance, rtol=tolerance)
    plain = [torch.stack([keys[b], values[b]]) for b in range(3)]
    for b, n in enumerate(lengths):
        plain[b][:, :, n - 1] = qkv[b, 1:].float()
    close = reference(qkv[:, 0].float(), plain, lengths, 0.125)
    torch.testing.assert_close(got.double(), close, atol=0.05, rtol=0.05)


def test_an_arena_of_another_dtype_is_refused(kernel: AttentionKernel) -> None:
    qkv, buffer, _, layout, _ = random_case(torch.float32, 64, seed=4)
    with pytest.raises(RuntimeError, match="qkv's dtype, or uint8"):
        kernel(qkv, buffer.to(torch.float16), *layout, 0.125)


@needs_compiler
def test_the_forward_on_a_cpu_decodes_with_the_kernel_unless_told_not_to() -> None:
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    model = GPT2LMHeadModel(config).eval()
    assert GPT2Forward(model).attention_kernel is not None
    assert GPT2Forward(model, kernels="off").attention_kernel is None


@needs_compiler
def test_a_built_kernel_is_loaded_again_without_a_compiler(kernel: AttentionKernel) -> None:
    built = library_path("attention", default_kernel_dir(), isa_level())
    assert built.is_file()
    modified = built.stat().st_mtime_ns
    assert load_library("attention", compiler="no-such-c++") == built
    assert built.stat().st_mtime_ns == modified


def test_the_library_name_follows_the_instruction_set(tmp_path: Path) -> None:
    levels = ("x86-64-v4", "generic")
    assert len({library_path("attention", tmp_path, isa).name for isa in levels}) == 2
    assert isa_level(frozenset({"avx2", "fma", "bmi2", "f16c", "movbe"}), "x86_64") == "x86-64-v3"
    assert isa_level(frozenset({"avx512f"}), "aarch64") == "generic"


def test_without_a_compiler_the_engine_keeps_torch_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(KernelBuildError, match="no C\\+\\+ compiler 'no-such-c\\+\\+'"):
        load_library("attention", tmp_path, compiler="no-such-c++")
    monkeypatch.setenv("CXX", "no-such-c++")
    with caplog.at_level(logging.WARNING):
        assert load_attention("auto", tmp_path / "empty") is None
    assert "attention kernel unavailable" in caplog.text and "CXX" in caplog.text
    assert list(tmp_path.iterdir()) == []  # nothing half-built left behind
    with pytest.raises(ValueError, match="KOBOT_ENGINE_KERNELS"):
        load_attention("fast", tmp_path)  # type: ignore[arg-type]


@needs_compiler
async def test_the_engine_decodes_in_the_arena_with_the_whole_kv_budget() -> None:
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300)).eval()
    engine = Engine(GPT2Forward(hf), EngineConfig(kv_budget_mb=4))
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 40, 17)]
    params = SamplingParams(
        max_new_tokens=12, do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0
    )
    try:
        assert engine.forward.attention_kernel is not None
        assert engine.arena.budget_bytes == 4 * 1024 * 1024  # no decode pool taken from it
        requests = [EngineRequest(tuple(p), params) for p in prompts]
        outputs = await asyncio.gather(*(engine.generate(r) for r in requests))
        assert engine.forward.decode_slots.pool is None
    finally:
        engine.close()
    for prompt, output in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            expected = hf.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
        assert list(output.ids) == expected
