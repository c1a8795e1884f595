"""The C++ int8 dense layers (`kobot::dense_int8`, KOBOT_ENGINE_QUANT=int8 on a bf16 model): the
int8 panel layout, the kernel against a float64 replay of the same quantization (so a wrong
layout, offset or scale cannot hide inside the quantization error), its distance to the exact
product, the layer norm it can apply first, argument checks, and where the forward uses it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from core.generation.cpu_features import cpu_flags
from core.generation.engine.forward import GPT2Forward
from core.generation.engine.kernels.dense import (
    DenseInt8,
    Int8Panels,
    int8_panels_of,
    load_dense_int8,
)
from core.generation.engine.linear import Norm, int8_panels, prepare_head, prepare_linear
from tests.support.kernels import built_or_skip, dense_case

REPLAY_RTOL = 1e-5
"""The kernel's float32 epilogue against the float64 replay of its integer products."""
QUANTIZED_ATOL = 0.06
"""Products of order 1 (K up to 3072, unit-variance x, weights ~ 1/sqrt(K)): int8 x and W."""


@pytest.fixture(scope="module")
def dense_int8() -> DenseInt8:
    return built_or_skip(load_dense_int8("auto"), "AVX-512 BF16 and VNNI")


def unpacked(packed: Int8Panels) -> torch.Tensor:
    """The int8 weight `[K, N]` back out of its panels."""
    count, quads, width, four = packed.panels.shape
    return packed.panels.permute(1, 3, 0, 2).reshape(quads * four, count * width)


def replay(x: torch.Tensor, packed: Int8Panels, bias: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes before its activation, in float64: x quantized per row as the
    kernel does it (float32 scale, rounding half to even), exact integer products."""
    rows = x.float()
    amax = rows.abs().amax(dim=1)
    x_scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    steps = torch.full_like(amax, 127)  # `127 / amax` would be 127 * (1 / amax): another rounding
    inverse = torch.where(amax > 0, steps / amax, torch.zeros_like(amax))
    q = torch.round(rows * inverse[:, None]).double()
    product = (q @ unpacked(packed).double()) * (packed.scale[None, :] * x_scale[:, None]).double()
    return product if bias is None else product + bias.double()


def test_int8_panels_hold_quads_of_k_for_32_columns() -> None:
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    packed = int8_panels_of(weight)
    assert packed.panels.shape == (2, 2, 32, 4) and packed.panels.dtype == torch.int8
    q = torch.round(weight / packed.scale).to(torch.int8)
    for p, kq, c, j in [(0, 0, 0, 0), (1, 1, 31, 3), (1, 0, 5, 2), (0, 1, 17, 1)]:
        assert int(packed.panels[p, kq, c, j]) == int(q[4 * kq + j, 32 * p + c])
    torch.testing.assert_close(packed.scale, weight.abs().amax(dim=0) / 127)
    assert packed.offsets.dtype == torch.int32
    assert torch.equal(packed.offsets, 128 * q.int().sum(dim=0))
    assert int(q.abs().max()) == 127  # each column's largest weight takes the full range
    assert (q.float() * packed.scale - weight).abs().max() <= packed.scale.max() / 2 + 1e-7


@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(1, 768, 2304), (5, 64, 96), (13, 72, 64), (32, 768, 3072), (37, 3072, 768), (3, 4, 32),
     (300, 128, 64)],
)  # fmt: skip
@pytest.mark.parametrize("gelu", [False, True])
def test_the_kernel_computes_its_quantized_product_exactly(
    dense_int8: DenseInt8, m: int, k: int, n: int, gelu: bool
) -> None:
    x, weight, bias, residual = dense_case(m, k, n, seed=m + k + n)
    packed = int8_panels_of(weight)
    product = replay(x, packed, bias)
    activated = F.gelu(product, approximate="tanh") if gelu else product
    got = dense_int8(x, *packed, bias, None, gelu, True)
    torch.testing.assert_close(got.double(), activated, atol=1e-5, rtol=REPLAY_RTOL)
    with_residual = dense_int8(x, *packed, bias, residual, gelu, False)
    assert with_residual.dtype == torch.bfloat16
    expected = activated + residual.double()
    scale = expected.abs().clamp(min=1.0)
    assert float(((with_residual.double() - expected) / scale).abs().max()) <= 2**-7
    no_bias = dense_int8(x, *packed, None, None, False, True)
    torch.testing.assert_close(no_bias.double(), replay(x, packed, None), atol=1e-5, rtol=1e-5)


def test_the_quantized_product_is_near_the_exact_one(dense_int8: DenseInt8) -> None:
    for m, k, n in [(32, 768, 3072), (8, 3072, 768)]:
        x, weight, bias, _ = dense_case(m, k, n, seed=7)
        exact = x.double() @ weight.double() + bias.double()
        got = dense_int8(x, *int8_panels_of(weight), bias, None, False, True)
        error = float((got.double() - exact).abs().max())
        assert 0 < error <= QUANTIZED_ATOL  # quantized: close, yet not the exact product


def test_a_zero_row_gives_the_bias_and_strided_or_empty_rows_are_taken(
    dense_int8: DenseInt8,
) -> None:
    x, weight, bias, _ = dense_case(6, 64, 64, seed=2)
    packed = int8_panels_of(weight)
    x[3] = 0
    out = dense_int8(x, *packed, bias, None, False, True)
    torch.testing.assert_close(out[3], bias)
    wide = torch.cat([x, x], dim=1)[:, :64]  # rows not contiguous
    torch.testing.assert_close(dense_int8(wide, *packed, bias, None, False, True), out)
    assert dense_int8(x[:0], *packed, bias, None, False, False).shape == (0, 64)


@pytest.mark.parametrize("k", [64, 68])  # whole vectors, and a tail of 4
def test_a_layer_norm_in_front_runs_inside_the_call(dense_int8: DenseInt8, k: int) -> None:
    x, weight, bias, _ = dense_case(5, k, 64, seed=k)
    generator = torch.Generator().manual_seed(k)
    x = (x.float() * 3 + 1.5).bfloat16()  # off-centre, larger than unit variance
    norm_weight = torch.rand(k, generator=generator) + 0.5
    norm_bias = torch.randn(k, generator=generator) * 0.1
    packed = int8_panels_of(weight)
    fused = dense_int8(x, *packed, bias, None, False, True, norm_weight, norm_bias, 1e-5)
    normed = F.layer_norm(x.float(), (k,), norm_weight, norm_bias, 1e-5)  # float32, unrounded
    torch.testing.assert_close(fused.double(), replay(normed, packed, bias), atol=5e-3, rtol=1e-3)
    exact = normed.double() @ weight.double() + bias.double()
    assert float((fused.double() - exact).abs().max()) <= QUANTIZED_ATOL
    kernel = int8_panels(dense_int8)
    norm = Norm(norm_weight.bfloat16(), norm_bias.bfloat16(), 1e-5)
    linear = prepare_linear("panels", weight, bias, panels=kernel, norm=norm)
    composed = prepare_linear("panels", weight, bias, panels=kernel)(norm(x))
    assert float((linear(x).double() - composed.double()).abs().max()) <= QUANTIZED_ATOL
    with pytest.raises(RuntimeError, match="come together"):
        dense_int8(x, *packed, bias, None, False, True, norm_weight, None, 1e-5)
    with pytest.raises(RuntimeError, match="norm_bias must be"):
        dense_int8(x, *packed, bias, None, False, True, norm_weight, norm_bias[:-4], 1e-5)


@pytest.mark.parametrize(
    ("position", "spoil", "message"),
    [(1, lambda t: t.reshape(2, 16, 32, 4).transpose(1, 2), "panels must be"),
     (0, lambda t: t[:, :32], "columns, the panels"),
     (2, lambda t: t.double(), "scale must be"),
     (3, lambda t: t.long(), "offsets must be"),
     (0, lambda t: t.float(), "bfloat16 matrix")],
)  # fmt: skip
def test_bad_arguments_are_refused(
    dense_int8: DenseInt8,
    position: int,
    spoil: Callable[[torch.Tensor], torch.Tensor],
    message: str,
) -> None:
    x, weight, bias, _ = dense_case(4, 64, 64, seed=4)
    args: list[object] = [x, *int8_panels_of(weight), bias, None, False, False]
    args[position] = spoil(args[position])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=message):
        dense_int8(*args)


def test_linears_run_on_int8_panels_and_odd_weights_on_torchs_int8(dense_int8: DenseInt8) -> None:
    x, weight, bias, _ = dense_case(4, 64, 96, seed=3)
    kernel = int8_panels(dense_int8)
    packed = prepare_linear("panels", weight, bias, panels=kernel)
    torch.testing.assert_close(
        packed(x).double(), replay(x, int8_panels_of(weight), bias), atol=0.02, rtol=0.01
    )
    odd = weight[:, :50]  # 50 columns: not a multiple of 32
    fallback = prepare_linear("panels", odd, bias[:50], panels=kernel)(x)
    assert fallback.dtype == torch.bfloat16  # bf16 in, bf16 out, as the panels give
    exact = x.double() @ odd.double() + bias[:50].double()
    assert float((fallback.double() - exact).abs().max()) <= QUANTIZED_ATOL
    head = weight.t().contiguous()
    logits = prepare_head("panels", head, kernel)(x)
    assert logits.dtype == torch.float32
    assert float((logits.double() - x.double() @ weight.double()).abs().max()) <= QUANTIZED_ATOL


def test_the_forward_runs_int8_on_panels_for_a_bf16_model_where_the_cpu_has_vnni() -> None:
    config = GPT2Config(n_layer=1, n_head=2, n_embd=64, vocab_size=96, n_positions=32)
    bf16 = GPT2LMHeadModel(config).bfloat16().eval()
    vnni = {"avx512_bf16", "avx512_vnni"} <= cpu_flags()
    on_panels = GPT2Forward(bf16, quant="int8")
    assert (on_panels.panel_kernel == "int8") is vnni
    assert on_panels.activation_dtype == (torch.bfloat16 if vnni else torch.float32)
    assert GPT2Forward(bf16, quant="int8", kernels="off").linear_kind == "int8"
    fp32 = GPT2Forward(GPT2LMHeadModel(config).eval(), quant="int8")
    assert (fp32.linear_kind, fp32.panel_kernel) == ("int8", None)
