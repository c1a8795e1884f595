"""The C++ bf16 dense layers (`kobot::dense`): the panel layout, each epilogue against float64
and against oneDNN's packed kernel, argument checks, and where the forward uses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from core.generation.cpu_features import cpu_flags
from core.generation.engine.forward import GPT2Forward
from core.generation.engine.kernels.dense import Dense, fits_panels, load_dense, panels_of
from core.generation.engine.linear import (
    TANH_GELU,
    bf16_panels,
    prepare_head,
    prepare_linear,
    prepare_residual,
)
from tests.support.kernels import built_or_skip, dense_case

BF16_ULP = 2**-7
"""One unit in the last place of a bf16 value in [1, 2): outputs are compared relative to it."""


@pytest.fixture(scope="module")
def dense() -> Dense:
    return built_or_skip(load_dense("auto"), "AVX-512 BF16 and VNNI")


def assert_bf16_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Within one bf16 rounding of the float64 result (plus float32 summation error)."""
    scale = expected.abs().clamp(min=1.0)
    assert float(((got.double() - expected) / scale).abs().max()) <= BF16_ULP


def test_panels_hold_pairs_of_k_for_32_columns() -> None:
    weight = torch.arange(6 * 64, dtype=torch.float32).reshape(6, 64)
    panels = panels_of(weight)
    assert panels.shape == (2, 3, 32, 2) and panels.dtype == torch.bfloat16
    for p, kp, c, j in [(0, 0, 0, 0), (1, 2, 31, 1), (1, 0, 5, 1), (0, 1, 17, 0)]:
        assert float(panels[p, kp, c, j]) == float(weight[2 * kp + j, 32 * p + c].bfloat16())
    assert fits_panels(weight) and not fits_panels(weight[:5]) and not fits_panels(weight[:, :48])
    assert not fits_panels(weight, k_multiple=4) and fits_panels(weight[:4], k_multiple=4)


@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(1, 768, 2304), (5, 64, 96), (13, 768, 768), (32, 768, 3072), (37, 3072, 768),
     (300, 128, 64)],
)  # fmt: skip
@pytest.mark.parametrize("gelu", [False, True])
def test_every_epilogue_matches_float64(dense: Dense, m: int, k: int, n: int, gelu: bool) -> None:
    x, weight, bias, residual = dense_case(m, k, n, seed=m + k + n)
    panels = panels_of(weight)
    product = x.double() @ weight.double() + bias.double()
    activated = F.gelu(product, approximate="tanh") if gelu else product
    torch.testing.assert_close(
        dense(x, panels, bias, None, gelu, True), activated.float(), atol=2e-5, rtol=2e-5
    )
    assert_bf16_close(dense(x, panels, bias, None, gelu, False), activated)
    assert_bf16_close(dense(x, panels, bias, residual, gelu, False), activated + residual.double())
    no_bias = dense(x, panels, None, None, False, True)
    torch.testing.assert_close(
        no_bias, (x.double() @ weight.double()).float(), atol=2e-5, rtol=2e-5
    )


def test_it_agrees_with_onednn_packed_layers(dense: Dense) -> None:
    x, weight, bias, residual = dense_case(32, 768, 3072, seed=5)
    bias = bias.bfloat16()  # a bf16 model's bias, as oneDNN takes it
    gelu = tanh_gelu
    pairs = [
        (prepare_linear("panels", weight, bias, gelu, TANH_GELU, bf16_panels(dense)),
         prepare_linear("packed", weight, bias, gelu, TANH_GELU)),
        (prepare_linear("panels", weight, bias, panels=bf16_panels(dense)),
         prepare_linear("packed", weight, bias)),
    ]  # fmt: skip
    for ours, onednn in pairs:
        torch.testing.assert_close(ours(x).float(), onednn(x).float(), atol=0.04, rtol=0.01)
    ours_residual = prepare_residual("panels", weight, bias, bf16_panels(dense))(x, residual)
    onednn_residual = prepare_residual("packed", weight, bias)(x, residual)
    torch.testing.assert_close(ours_residual.float(), onednn_residual.float(), atol=0.04, rtol=0.01)
    head = weight.t().contiguous()  # [vocab, n_embd], as the tied embedding
    logits = prepare_head("panels", head, bf16_panels(dense))(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(
        logits, prepare_head("packed", head)(x).float(), atol=0.04, rtol=0.01
    )


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def test_strided_rows_and_empty_batches_are_taken(dense: Dense) -> None:
    x, weight, bias, _ = dense_case(8, 64, 64, seed=2)
    panels = panels_of(weight)
    wide = torch.cat([x, x], dim=1)[:, :64]  # rows not contiguous
    torch.testing.assert_close(dense(wide, panels, bias, None, False, True),
                               dense(x, panels, bias, None, False, True))  # fmt: skip
    assert dense(x[:0], panels, bias, None, False, False).shape == (0, 64)


def test_a_weight_that_does_not_pack_into_panels_stays_on_onednn(dense: Dense) -> None:
    x, weight, bias, _ = dense_case(4, 64, 50, seed=3)  # 50 columns: not a multiple of 32
    linear = prepare_linear("panels", weight, bias, panels=bf16_panels(dense))
    expected = (x.double() @ weight.double() + bias.double()).float()
    torch.testing.assert_close(linear(x).float(), expected, atol=0.05, rtol=0.01)


@pytest.mark.parametrize(
    ("change", "message"),
    [("panels", "panels must be"), ("columns", "columns, the panels"),
     ("bias", "bias must be"), ("residual", "residual must be"), ("dtype", "bfloat16 matrix")],
)  # fmt: skip
def test_bad_arguments_are_refused(dense: Dense, change: str, message: str) -> None:
    x, weight, bias, residual = dense_case(4, 64, 64, seed=4)
    panels = panels_of(weight)
    args: list[object] = [x, panels, bias, residual, False, False]
    if change == "panels":
        args[1] = panels.reshape(2, 32, 32, 2).transpose(1, 2)
    elif change == "columns":
        args[0] = x[:, :32]
    elif change == "bias":
        args[2] = bias.bfloat16()
    elif change == "residual":
        args[3] = residual[:, :32]
    else:
        args[0] = x.float()
    with pytest.raises(RuntimeError, match=message):
        dense(*args)  # type: ignore[arg-type]


def test_the_forward_runs_bf16_layers_on_panels_where_the_cpu_has_avx512_bf16() -> None:
    config = GPT2Config(n_layer=1, n_head=2, n_embd=64, vocab_size=96, n_positions=32)
    model = GPT2LMHeadModel(config).eval()
    bf16 = GPT2LMHeadModel(config).bfloat16().eval()
    panels = "avx512_bf16" in cpu_flags()
    assert (GPT2Forward(bf16).linear_kind == "panels") is panels
    assert GPT2Forward(bf16, kernels="off").linear_kind != "panels"
    assert GPT2Forward(model).linear_kind != "panels"  # float32 layers stay on oneDNN / addmm
