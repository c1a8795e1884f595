"""The dense kernels' AMX path (`kobot::dense_isa`): on a CPU with AMX both ops give what their
AVX-512 path gives (int8 exactly, bf16 within float32 summation order) for every row-block
shape, K that does not fill a tile falls back, and the choice is refused where AMX is absent."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from core.generation.engine.kernels.dense import (
    Dense,
    DenseInt8,
    dense_isa,
    int8_panels_of,
    load_dense,
    load_dense_int8,
    panels_of,
)
from tests.support.kernels import built_or_skip, dense_case

ROWS = [1, 5, 16, 17, 32, 33, 50, 64, 100]
"""One tile's rows or fewer, two tiles, and row blocks of 32 with every kind of tail."""


@pytest.fixture(scope="module")
def dense() -> Dense:
    return built_or_skip(load_dense("auto"), "AVX-512 BF16 and VNNI")


@pytest.fixture(scope="module")
def dense_int8() -> DenseInt8:
    return built_or_skip(load_dense_int8("auto"), "AVX-512 BF16 and VNNI")


@pytest.fixture
def amx(dense: Dense) -> Iterator[None]:
    """AMX chosen for the test where the CPU has it (else skip); the default restored after."""
    default = dense_isa()
    if default != "amx":
        pytest.skip("this CPU has no AMX")
    yield
    dense_isa(default)


def on_each_isa(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`run`'s result on AMX and on AVX-512 (AMX chosen again after)."""
    dense_isa("amx")
    on_amx = run()
    dense_isa("avx512")
    on_avx512 = run()
    dense_isa("amx")
    return on_amx, on_avx512


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("gelu", [False, True])
def test_bf16_on_amx_matches_avx512(dense: Dense, amx: None, m: int, gelu: bool) -> None:
    x, weight, bias, residual = dense_case(m, 768, 256, seed=m)
    panels = panels_of(weight)
    on_amx, on_avx512 = on_each_isa(lambda: dense(x, panels, bias, residual, gelu, True))
    torch.testing.assert_close(on_amx, on_avx512, atol=1e-5, rtol=1e-5)
    rounded_amx, rounded_avx512 = on_each_isa(lambda: dense(x, panels, bias, None, gelu, False))
    assert rounded_amx.dtype == torch.bfloat16
    torch.testing.assert_close(rounded_amx, rounded_avx512, atol=2**-6, rtol=2**-7)


@pytest.mark.parametrize("m", ROWS)
def test_int8_on_amx_matches_avx512_exactly(dense_int8: DenseInt8, amx: None, m: int) -> None:
    x, weight, bias, residual = dense_case(m, 3072, 128, seed=m)
    packed = int8_panels_of(weight.float())

    def run() -> torch.Tensor:
        return dense_int8(x, *packed, bias, residual, True, True)

    on_amx, on_avx512 = on_each_isa(run)
    assert torch.equal(on_amx, on_avx512)


@pytest.mark.parametrize(("k", "int8"), [(48, False), (96, True), (200, True)])
def test_k_short_of_a_tile_falls_back(
    dense: Dense, dense_int8: DenseInt8, amx: None, k: int, int8: bool
) -> None:
    x, weight, bias, _ = dense_case(40, k, 64, seed=k)
    exact = (x.double() @ weight.double() + bias.double()).float()
    if int8:
        got = dense_int8(x, *int8_panels_of(weight.float()), bias, None, False, True)
        torch.testing.assert_close(got, exact, atol=0.06, rtol=0.0)
    else:
        got = dense(x, panels_of(weight), bias, None, False, True)
        torch.testing.assert_close(got, exact, atol=2e-5, rtol=2e-5)


def test_an_unknown_isa_is_refused(dense: Dense) -> None:
    with pytest.raises(ValueError, match="dense_isa: must be one of amx, avx512"):
        dense_isa("sse2")
    assert dense_isa() in {"amx", "avx512"}


def test_amx_is_refused_where_absent(dense: Dense) -> None:
    if dense_isa() == "amx":
        pytest.skip("this CPU has AMX")
    with pytest.raises(RuntimeError, match="on a CPU with AMX"):
        dense_isa("amx")
    assert dense_isa() == "avx512"
    assert dense_isa("avx512") == "avx512"
