"""The C++ decode attention (`kobot::decode_attention`): its results against softmax attention,
its argument checks, and how it is built, reused and done without."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.generation.engine.forward import GPT2Forward
from core.generation.engine.kernels.build import (
    KernelBuildError,
    default_kernel_dir,
    isa_level,
    library_path,
    load_library,
)
from core.generation.engine.kernels.decode_attention import (
    DecodeAttention,
    load_decode_attention,
)

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)


@pytest.fixture(scope="module")
def kernel() -> DecodeAttention:
    loaded = load_decode_attention("auto")
    if loaded is None:
        pytest.skip("the kernel cannot be built here (no C++ compiler)")
    return loaded


def reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: list[int],
    lengths: list[int],
    scale: float,
) -> torch.Tensor:
    """Row b: softmax attention over the first lengths[b] keys of pool row slots[b], in float64."""
    rows = []
    for b, (slot, n) in enumerate(zip(slots, lengths, strict=True)):
        k, v = keys[slot, :, :n].double(), values[slot, :, :n].double()
        scores = torch.einsum("hd,hld->hl", query[b].double(), k) * scale
        rows.append(torch.einsum("hl,hld->hd", scores.softmax(-1), v))
    return torch.stack(rows)


def random_case(
    dtype: torch.dtype, head_dim: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(2, 7, 4, 48, head_dim, generator=generator).mul(2).to(dtype)
    slots = [5, 0, 3, 6]  # not in order, and pool rows 1, 2, 4 idle
    lengths = [1, 48, 17, 33]
    query = torch.randn(4, 4, head_dim, generator=generator).to(dtype)
    return query, pool[0], pool[1], slots, lengths


@pytest.mark.parametrize("head_dim", [64, 40])  # GPT-2's (hand-vectorized) and any other
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_each_row_attends_over_its_own_slot_and_length_only(
    kernel: DecodeAttention, head_dim: int, dtype: torch.dtype, tolerance: float
) -> None:
    query, keys, values, slots, lengths = random_case(dtype, head_dim, seed=head_dim)
    got = kernel(query, keys, values, torch.tensor(slots), torch.tensor(lengths), 0.125)
    expected = reference(query, keys, values, slots, lengths, 0.125)
    assert got.dtype == dtype and got.shape == query.shape
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance)
    keys[slots[2], :, lengths[2] :] = 1e4  # keys past a row's length are never read
    again = kernel(query, keys, values, torch.tensor(slots), torch.tensor(lengths), 0.125)
    torch.testing.assert_close(again, got, atol=0, rtol=0)


def test_strided_views_of_the_pool_are_read_in_place(kernel: DecodeAttention) -> None:
    query, keys, values, slots, lengths = random_case(torch.float32, 64, seed=3)
    wide_keys = torch.zeros(7, 4, 64, 64).index_copy_(2, torch.arange(48), keys)[:, :, :48]
    wide_values = torch.zeros(7, 4, 64, 64).index_copy_(2, torch.arange(48), values)[:, :, :48]
    assert not wide_keys.is_contiguous()
    args = (torch.tensor(slots), torch.tensor(lengths), 0.125)
    torch.testing.assert_close(
        kernel(query, wide_keys, wide_values, *args), kernel(query, keys, values, *args)
    )


@pytest.mark.parametrize(
    ("slots", "lengths", "message"),
    [([0, 1], [0, 5], "length out of range"), ([0, 1], [5, 49], "length out of range"),
     ([0, 7], [5, 5], "slot out of range"), ([0], [5], "one slot and one length")],
)  # fmt: skip
def test_bad_arguments_are_refused_before_anything_is_read(
    kernel: DecodeAttention, slots: list[int], lengths: list[int], message: str
) -> None:
    query, keys, values, _, _ = random_case(torch.float32, 64, seed=4)
    with pytest.raises(RuntimeError, match=message):
        kernel(query[:2], keys, values, torch.tensor(slots), torch.tensor(lengths), 0.125)


@needs_compiler
def test_the_forward_on_a_cpu_decodes_with_the_kernel_unless_told_not_to() -> None:
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    model = GPT2LMHeadModel(config).eval()
    assert GPT2Forward(model).decode_slots.kernel is not None
    assert GPT2Forward(model, kernels="off").decode_slots.kernel is None


@needs_compiler
def test_a_built_kernel_is_loaded_again_without_a_compiler(kernel: DecodeAttention) -> None:
    built = library_path("decode_attention", default_kernel_dir(), isa_level())
    assert built.is_file()
    modified = built.stat().st_mtime_ns
    assert load_library("decode_attention", compiler="no-such-c++") == built
    assert built.stat().st_mtime_ns == modified


def test_the_library_name_follows_the_instruction_set(tmp_path: Path) -> None:
    levels = ("x86-64-v4", "generic")
    assert len({library_path("decode_attention", tmp_path, isa).name for isa in levels}) == 2
    assert isa_level(frozenset({"avx2", "fma", "bmi2", "f16c", "movbe"}), "x86_64") == "x86-64-v3"
    assert isa_level(frozenset({"avx512f"}), "aarch64") == "generic"


def test_without_a_compiler_the_engine_keeps_torch_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(KernelBuildError, match="no C\\+\\+ compiler 'no-such-c\\+\\+'"):
        load_library("decode_attention", tmp_path, compiler="no-such-c++")
    monkeypatch.setenv("CXX", "no-such-c++")
    with caplog.at_level(logging.WARNING):
        assert load_decode_attention("auto", tmp_path / "empty") is None
    assert "decode attention kernel unavailable" in caplog.text and "CXX" in caplog.text
    assert list(tmp_path.iterdir()) == []  # nothing half-built left behind
    with pytest.raises(ValueError, match="KOBOT_ENGINE_KERNELS"):
        load_decode_attention("fast", tmp_path)  # type: ignore[arg-type]
