"""The engine's dense layers, with their weights prepared once for the kernel that runs them.

- `addmm`: the model's own weights, shared, as Hugging Face runs them (`torch.addmm` on the
  Conv1D `[in, out]` weight); the reference path, and the one on CUDA.
- `packed`: bf16 weights reordered once into oneDNN's blocked layout (`mkldnn._linear_pointwise`
  on a `_reorder_linear_weight` result), so no call reorders them again; used on a CPU with
  AMX/AVX-512 BF16, where it is the fastest bf16 path. The MLP's tanh-GELU and the residual
  adds run inside the same oneDNN call (post-ops, on the float32 accumulator before rounding to
  bf16: one op fewer each, and nearer the float32 result than a separate bf16 op).
- `panels`: bf16 weights in panels of 32 output columns for kobot's own kernel
  (`kernels/dense.cpp`), on a CPU with AVX-512 BF16 where it builds: the same float32
  accumulation and post-ops as `packed`, with each panel of weights prefetched while the one
  before is multiplied (decode steps stream every weight from memory once a step). Measured on
  a 2-core AVX-512 BF16 CPU, 768 × 3072 streamed from memory: 0.42 against oneDNN's 0.55 ms at
  32 rows, 0.15 against 0.29 at one row, 6.3 against 6.8 at 512. With `KOBOT_ENGINE_QUANT=int8`
  on a bf16 model and a CPU with AVX-512 VNNI, the same kernel on int8 weights per output
  column (activations quantized per row in the call): a decode step's twelve layers and LM head
  streamed from memory in 14.2-15.0 ms against 22.9-24.3 for the bf16 panels at 32 rows,
  4.4-4.9 against 7.8-8.5 at one row. Weights that do not pack into panels
  (`PanelKernel.fits`) take the kernel's `fallback`.
- `int8` (`KOBOT_ENGINE_QUANT=int8` without the int8 panel kernel): weights quantized per output
  channel to int8 once, activations per call (torch's dynamic quantized linear, fbgemm/oneDNN
  VNNI), fp32 in and out (the engine keeps its hidden states fp32 around them); the LM head too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from core.generation.cpu_features import cpu_flags
from core.generation.engine.kernels.dense import Dense as DenseKernel
from core.generation.engine.kernels.dense import (
    DenseInt8,
    fits_panels,
    int8_panels_of,
    load_dense,
    load_dense_int8,
    panels_of,
)
from core.generation.engine.kernels.loading import KernelMode

__all__ = [
    "LinearKind",
    "Norm",
    "PanelKernel",
    "QuantMode",
    "Residual",
    "bf16_panels",
    "choose_kind",
    "int8_panels",
    "load_panel_kernel",
    "normed",
    "prepare_head",
    "prepare_linear",
    "prepare_residual",
    "resolve_quant",
]

QuantMode = Literal["auto", "off", "int8"]
LinearKind = Literal["addmm", "packed", "panels", "rows", "int8"]
Linear = Callable[[torch.Tensor], torch.Tensor]
Dense = Callable[..., torch.Tensor]
Residual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`(x, residual) -> residual + linear(x)`."""
TANH_GELU = "gelu_tanh"
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
PACKED_MIN_ROWS = 4
"""`rows` kernels: calls with at least this many rows run packed (measured on a 2-core AVX2
CPU: `addmm` is faster at 1 row, equal at 2, packed faster from 4 on)."""


PanelMatmul = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool, bool], torch.Tensor
]
"""`(x, bias float32 | None, residual | None, gelu, fp32_out)` on one packed weight."""


@dataclass(frozen=True, slots=True)
class Norm:
    """The layer norm in front of a linear (GPT-2's pre-norm: ln_1 before qkv, ln_2 before fc,
    ln_f before the LM head); `weight` and `bias` in the hidden states' dtype."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def normed(norm: Norm | None, linear: Linear) -> Linear:
    """`linear(norm(x))`, or `linear` without a norm."""
    if norm is None:
        return linear
    return lambda x: linear(norm(x))


@dataclass(frozen=True, slots=True)
class PanelKernel:
    """One of kobot's panel kernels: how it packs a `[K, N]` weight (with the layer norm in
    front of it, where there is one), which weights it takes, and the kind that runs the
    others."""

    pack: Callable[[torch.Tensor, Norm | None], PanelMatmul]
    k_multiple: int
    fallback: LinearKind
    name: str

    def fits(self, weight_in_out: torch.Tensor) -> bool:
        return fits_panels(weight_in_out, self.k_multiple)


def bf16_panels(dense: DenseKernel) -> PanelKernel:
    def pack(weight_in_out: torch.Tensor, norm: Norm | None) -> PanelMatmul:
        panels = panels_of(weight_in_out)

        def run(
            x: torch.Tensor,
            bias: torch.Tensor | None,
            residual: torch.Tensor | None,
            gelu: bool,
            fp32: bool,
        ) -> torch.Tensor:
            return dense(x if norm is None else norm(x), panels, bias, residual, gelu, fp32)

        return run

    return PanelKernel(pack, k_multiple=2, fallback="packed", name="bf16")


def int8_panels(dense_int8: DenseInt8) -> PanelKernel:
    """int8 panels; a layer norm in front runs inside the kernel, on each row before it is
    quantized (its bf16 output is never stored)."""

    def pack(weight_in_out: torch.Tensor, norm: Norm | None) -> PanelMatmul:
        packed = int8_panels_of(weight_in_out)
        if norm is None:
            return lambda x, bias, residual, gelu, fp32: dense_int8(
                x, *packed, bias, residual, gelu, fp32
            )
        weight, shift = (t.detach().float().contiguous() for t in (norm.weight, norm.bias))
        return lambda x, bias, residual, gelu, fp32: dense_int8(
            x, *packed, bias, residual, gelu, fp32, weight, shift, norm.eps
        )

    return PanelKernel(pack, k_multiple=4, fallback="int8", name="int8")


def load_panel_kernel(
    kind: LinearKind, dtype: torch.dtype, mode: KernelMode, directory: Path | None = None
) -> PanelKernel | None:
    """The panel kernel that runs `kind`'s layers faster here, or None: bf16 panels for
    `packed`, int8 panels for `int8` on a bf16 model."""
    if kind == "packed":
        dense = load_dense(mode, directory)
        return None if dense is None else bf16_panels(dense)
    if kind == "int8" and dtype == torch.bfloat16:
        dense_int8 = load_dense_int8(mode, directory)
        return None if dense_int8 is None else int8_panels(dense_int8)
    return None


QUANTS: tuple[QuantMode, ...] = ("auto", "off", "int8")


def resolve_quant(
    device: torch.device,
    dtype: torch.dtype,
    quant: str,
    mode: KernelMode,
    directory: Path | None = None,
) -> str:
    """KOBOT_ENGINE_QUANT: `auto` is `int8` where kobot's int8 panel kernel runs (a bf16 model
    on a CPU with AVX-512 VNNI: about twice the bf16 layers' speed, the same top token at 99% of
    positions on a small trained model), else `off`; `off` and `int8` as given."""
    if quant not in QUANTS:
        raise ValueError(f"KOBOT_ENGINE_QUANT: must be auto, off or int8 (got {quant!r})")
    if quant != "auto":
        return quant
    runs = device.type == "cpu" and dtype == torch.bfloat16
    return "int8" if runs and load_dense_int8(mode, directory) is not None else "off"


def choose_kind(device: torch.device, dtype: torch.dtype, quant: str) -> LinearKind:
    """int8 when asked (CPU only); on a CPU where oneDNN has it, packed bf16 or `rows` fp32;
    else addmm."""
    if quant == "int8":
        if device.type != "cpu":
            raise ValueError("KOBOT_ENGINE_QUANT=int8 runs on the CPU only")
        return "int8"
    if quant != "off":
        raise ValueError(f"KOBOT_ENGINE_QUANT: must be off or int8 (got {quant!r})")
    if device.type != "cpu" or not _packed_available():
        return "addmm"
    if dtype == torch.float32:
        return "rows"
    return "packed" if dtype == torch.bfloat16 and _packed_bf16_available() else "addmm"


def _packed_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


def _packed_bf16_available() -> bool:
    """oneDNN packs bf16 weights only on a CPU with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return supported is None or bool(supported())


def prepare_linear(
    kind: LinearKind,
    weight_in_out: torch.Tensor,
    bias: torch.Tensor,
    activation: Linear | None = None,
    activation_name: str = "",
    panels: PanelKernel | None = None,
    norm: Norm | None = None,
) -> Linear:
    """`activation(norm(x) @ weight_in_out + bias)` (a Conv1D's weight layout) as `kind` runs
    it; `activation_name` `gelu_tanh` lets the packed and panel kernels apply it themselves
    (`panels`: the panel kernel, for kind `panels`, which applies the norm too)."""
    kind = _panels_or_fallback(kind, weight_in_out, panels)
    if kind == "panels":
        assert panels is not None
        gelu = activation_name == TANH_GELU
        panel_linear = _panel_linear(panels, weight_in_out, bias, gelu, norm)
        if activation is None or gelu:
            return panel_linear
        return lambda x: activation(panel_linear(x))
    return normed(norm, _unnormed_linear(kind, weight_in_out, bias, activation, activation_name))


def _unnormed_linear(
    kind: LinearKind,
    weight_in_out: torch.Tensor,
    bias: torch.Tensor,
    activation: Linear | None,
    activation_name: str,
) -> Linear:
    if kind == "rows":
        args = (weight_in_out, bias, activation, activation_name)
        return by_rows(prepare_linear("addmm", *args), prepare_linear("packed", *args))
    if kind == "packed" and activation_name == TANH_GELU:
        packed = _pack(weight_in_out.t())
        linear = torch.ops.mkldnn._linear_pointwise
        return lambda x: linear(x, packed, bias, "gelu", [], "tanh")
    if kind == "addmm":
        plain: Linear = lambda x: torch.addmm(bias, x, weight_in_out)  # noqa: E731
    else:
        plain = _prepared(kind, weight_in_out.t(), bias)
    if activation is None:
        return plain
    return lambda x: activation(plain(x))


def prepare_residual(
    kind: LinearKind,
    weight_in_out: torch.Tensor,
    bias: torch.Tensor,
    panels: PanelKernel | None = None,
) -> Residual:
    """`residual + x @ weight_in_out + bias`; the packed and panel kernels add the residual
    themselves."""
    kind = _panels_or_fallback(kind, weight_in_out, panels)
    if kind == "panels":
        assert panels is not None
        matmul, bias32 = panels.pack(weight_in_out, None), _float_bias(bias)
        return lambda x, residual: matmul(x, bias32, residual, False, False)
    if kind == "rows":
        small = prepare_residual("addmm", weight_in_out, bias)
        return by_rows(small, prepare_residual("packed", weight_in_out, bias))
    if kind == "packed":
        packed = _pack(weight_in_out.t())
        binary = torch.ops.mkldnn._linear_pointwise.binary
        return lambda x, residual: binary(x, residual, packed, bias, "add")
    plain = prepare_linear(kind, weight_in_out, bias)
    return lambda x, residual: residual + plain(x)


def prepare_head(
    kind: LinearKind,
    weight_out_in: torch.Tensor,
    panels: PanelKernel | None = None,
    norm: Norm | None = None,
) -> Linear:
    """`norm(x) @ weight_out_in.T` (the tied LM head: the embedding, `[vocab, n_embd]`);
    float32 out from the panel kernels."""
    kind = _panels_or_fallback(kind, weight_out_in.t(), panels)
    if kind == "panels":
        assert panels is not None
        matmul = panels.pack(weight_out_in.t(), norm)
        return lambda x: matmul(x, None, None, False, True)
    return normed(norm, _unnormed_head(kind, weight_out_in))


def _unnormed_head(kind: LinearKind, weight_out_in: torch.Tensor) -> Linear:
    if kind == "rows":
        return by_rows(prepare_head("addmm", weight_out_in), prepare_head("packed", weight_out_in))
    if kind == "addmm":
        return lambda x: F.linear(x, weight_out_in)
    return _prepared(kind, weight_out_in, None)


def _panels_or_fallback(
    kind: LinearKind, weight_in_out: torch.Tensor, panels: PanelKernel | None
) -> LinearKind:
    """`panels` runs where a kernel is given and the weight packs into its panels, else the
    kernel's fallback (`packed` without one)."""
    if kind != "panels":
        return kind
    if panels is None:
        return "packed"
    return kind if panels.fits(weight_in_out) else panels.fallback


def _panel_linear(
    panels: PanelKernel,
    weight_in_out: torch.Tensor,
    bias: torch.Tensor,
    gelu: bool,
    norm: Norm | None,
) -> Linear:
    matmul, bias32 = panels.pack(weight_in_out, norm), _float_bias(bias)
    return lambda x: matmul(x, bias32, None, gelu, False)


def _float_bias(bias: torch.Tensor) -> torch.Tensor:
    return bias.detach().float().contiguous()


def by_rows(small: Dense, large: Dense) -> Dense:
    """`small` for calls of fewer than `PACKED_MIN_ROWS` rows, else `large`."""

    def run(x: torch.Tensor, *residual: torch.Tensor) -> torch.Tensor:
        return (large if x.shape[0] >= PACKED_MIN_ROWS else small)(x, *residual)

    return run


def _prepared(kind: LinearKind, weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    if kind == "packed":
        return _packed(weight_out_in, bias)
    return _int8(weight_out_in, bias)


def _pack(weight_out_in: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight_out_in.contiguous(), None)


def _packed(weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    packed = _pack(weight_out_in)
    linear = torch.ops.mkldnn._linear_pointwise

    def run(x: torch.Tensor) -> torch.Tensor:
        return linear(x, packed, bias, "none", [], "")

    return run


def _int8(weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    """Per-output-channel symmetric int8 weights; dynamic per-tensor activations."""
    weight = weight_out_in.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    zero = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated (torchao's turn)
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_channel(weight, scales.double(), zero, 0, torch.qint8)
    float_bias = None if bias is None else bias.detach().float()
    params = torch.ops.quantized.linear_prepack(quantized, float_bias)
    dynamic = torch.ops.quantized.linear_dynamic
    reduce_range = not (cpu_flags() & VNNI_FLAGS)  # 7-bit activations only without VNNI

    def run(x: torch.Tensor) -> torch.Tensor:
        return dynamic(x.float(), params, reduce_range).to(x.dtype)

    return run
