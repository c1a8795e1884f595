"""Exporting a GPT-2 (KoGPT2) with its KV cache to ONNX, for the ONNX Runtime backend.

The exported graph is one forward step over new tokens that continues from a KV cache:

    inputs   input_ids [batch, seq] int64
             past_key_{i}, past_value_{i} [batch, heads, past, head_dim] (float32), i < n_layer
    outputs  logits [batch, vocab]: the last position only (what decoding needs)
             present_key_{i}, present_value_{i} [batch, heads, past + seq, head_dim]

The same graph prefills a prompt (a past of length 0) and decodes one token at a time. It is traced
from `KvStep`, a small GPT-2 forward over the Hugging Face model's own modules and weights, so the
graph does not depend on transformers' cache classes or attention-mask code, and the last-position
logits skip the vocabulary projection of every other position (a 900-token prefill would otherwise
spend more time in the 51,200-wide output layer than in the transformer).

An export folder holds `model.onnx`, `kobot-onnx.json` (shapes and provenance), the model's
`config.json` and the tokenizer files, so `KOBOT_ONNX_DIR` is all the ONNX backend needs.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from core.generation.onnx.metadata import (
    METADATA_FILE,
    MODEL_FILE,
    OnnxMetadata,
    cache_names,
    input_names,
    output_names,
)
from core.generation.tokenizer import (
    KoGPT2Tokenizer,
    ModelLoadError,
    resolve_model_source,
    tokenizer_from_source,
)

__all__ = ["ExportReport", "KvStep", "export_model", "export_onnx"]

VERIFY_TOLERANCE = 1e-3


@dataclass(frozen=True, slots=True)
class ExportReport:
    folder: Path
    seconds: float
    max_abs_diff: float | None
    """Largest |logit difference| between ONNX Runtime and torch on a check sequence."""


# --- the traced forward ----------------------------------------------------------------------


class KvStep(nn.Module):
    """GPT-2's forward over new tokens after a KV cache, using the wrapped model's modules.

    Matches `GPT2LMHeadModel` (eval mode) for the last position's logits; `forward` takes the
    cache flat (key, value per layer) and returns the logits and the extended cache flat.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        config = model.config
        check_supported(config)
        self.model = model
        self.n_layer = int(config.n_layer)
        self.n_head = int(config.n_head)
        self.head_dim = int(config.n_embd) // self.n_head
        self.scales = [attention_scale(config, self.head_dim, i) for i in range(self.n_layer)]

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        transformer: Any = self.model.transformer
        past_len = past[0].shape[2]
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device) + past_len
        hidden = transformer.wte(input_ids) + transformer.wpe(positions).unsqueeze(0)
        bias = causal_bias(seq_len, past_len, hidden.dtype, input_ids.device)
        present: list[torch.Tensor] = []
        for i, block in enumerate(transformer.h):
            hidden, key, value = self._block(block, i, hidden, past[2 * i], past[2 * i + 1], bias)
            present += [key, value]
        last = transformer.ln_f(hidden)[:, -1, :]
        return (output_logits(last, self.model.lm_head.weight), *present)

    def _block(
        self,
        block: Any,
        index: int,
        hidden: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attended, key, value = self._attention(
            block.attn, block.ln_1(hidden), past_key, past_value, bias, self.scales[index]
        )
        hidden = hidden + attended
        return hidden + block.mlp(block.ln_2(hidden)), key, value

    def _attention(
        self,
        attn: Any,
        x: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        bias: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        query, key, value = attn.c_attn(x).split(self.n_head * self.head_dim, dim=2)
        key = torch.cat([past_key, self._heads(key)], dim=2)
        value = torch.cat([past_value, self._heads(value)], dim=2)
        scores = torch.matmul(self._heads(query) * scale, key.transpose(-1, -2)) + bias
        mixed = torch.matmul(torch.softmax(scores, dim=-1), value)
        batch, _, seq, _ = mixed.shape
        merged = mixed.transpose(1, 2).reshape(batch, seq, self.n_head * self.head_dim)
        return attn.c_proj(merged), key, value

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, heads × dim] → [batch, heads, seq, dim]."""
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.n_head, self.head_dim).transpose(1, 2)


def output_logits(last: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`last @ weight.T`, written as `(weight @ last.T).T` so the exporter keeps using the
    (tied) embedding matrix instead of folding a transposed 157 MB copy of it into the file."""
    return torch.matmul(weight, last.t()).t()


def causal_bias(seq_len: Any, past_len: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """`causal_mask` as an additive bias: 0 where allowed, the dtype's minimum elsewhere."""
    allowed = causal_mask(seq_len, past_len, device)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def causal_mask(seq_len: Any, past_len: Any, device: torch.device) -> torch.Tensor:
    """[seq, past + seq] booleans: new token i sees the cache and new tokens up to itself."""
    keys = torch.arange(past_len + seq_len, device=device).unsqueeze(0)
    queries = torch.arange(seq_len, device=device).unsqueeze(1) + past_len
    return keys <= queries


def attention_scale(config: Any, head_dim: int, layer: int) -> float:
    scale = head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer + 1)
    return scale


def check_supported(config: Any) -> None:
    """Only decoder-only GPT-2 models (KoGPT2's architecture) can be exported."""
    if getattr(config, "model_type", None) != "gpt2" or getattr(config, "add_cross_attention", 0):
        raise ModelLoadError(
            f"KOBOT_MODEL: ONNX export supports GPT-2 models such as KoGPT2, not "
            f"{getattr(config, 'model_type', '?')!r}"
        )


# --- exporting -------------------------------------------------------------------------------


def metadata_of(model: PreTrainedModel, source_model: str) -> OnnxMetadata:
    config: Any = model.config
    return OnnxMetadata(
        source_model=source_model,
        n_layer=int(config.n_layer),
        n_head=int(config.n_head),
        head_dim=int(config.n_embd) // int(config.n_head),
        n_positions=int(config.n_positions),
        vocab_size=int(config.vocab_size),
        torch_version=torch.__version__,
    )


def dummy_inputs(meta: OnnxMetadata, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
    """Example inputs for tracing: every dynamic size distinct and above 1, so none is baked in."""
    ids = torch.randint(0, meta.vocab_size, (batch, seq))
    cache = [torch.randn(batch, meta.n_head, past, meta.head_dim) for _ in range(2 * meta.n_layer)]
    return (ids, *cache)


def dynamic_axes(meta: OnnxMetadata) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    for name in cache_names("past", meta.n_layer):
        axes[name] = {0: "batch", 2: "past"}
    for name in cache_names("present", meta.n_layer):
        axes[name] = {0: "batch", 2: "total"}
    return axes


def export_model(
    model: PreTrainedModel,
    out_dir: str | Path,
    *,
    tokenizer: KoGPT2Tokenizer | None = None,
    source_model: str = "",
    verify: bool = True,
) -> ExportReport:
    """Write `model` (a GPT-2, exported in float32 on the CPU) and its tokenizer to `out_dir`."""
    require_onnx()
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", torch.float32).eval()  # type: ignore[arg-type]
    step = KvStep(model).eval()
    meta = metadata_of(model, source_model)
    _trace_to_onnx(step, meta, out / MODEL_FILE)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(out)
    (out / METADATA_FILE).write_text(json.dumps(asdict(meta), indent=2), encoding="utf-8")
    diff = verify_export(step, out) if verify else None
    return ExportReport(out, time.perf_counter() - started, diff)


def require_onnx() -> None:
    """The exporter writes through the `onnx` package; ModelLoadError saying what to install."""
    try:
        import onnx  # noqa: F401
    except ImportError as error:
        raise ModelLoadError(
            "kobot export-onnx needs the onnx package: pip install onnx onnxruntime"
        ) from error


def _trace_to_onnx(step: KvStep, meta: OnnxMetadata, path: Path) -> None:
    """The TorchScript-based exporter: it needs only `onnx` (the dynamo one needs onnxscript)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notices, not errors
        torch.onnx.export(
            step,
            dummy_inputs(meta),
            str(path),
            dynamo=False,
            input_names=input_names(meta.n_layer),
            output_names=output_names(meta.n_layer),
            dynamic_axes=dynamic_axes(meta),
            opset_version=meta.opset,
            do_constant_folding=True,
        )


def verify_export(step: KvStep, folder: Path, length: int = 12) -> float:
    """Max |logit difference| of ONNX Runtime against torch over a prefill and 3 decode steps."""
    from core.generation.onnx.decoder import OnnxSession

    decoder = OnnxSession(folder, providers=["CPUExecutionProvider"])
    ids = torch.randint(0, decoder.meta.vocab_size, (1, length)).tolist()[0]
    worst = 0.0
    ort_past = decoder.empty_past()
    torch_past = [torch.from_numpy(p) for p in ort_past]
    for chunk in (ids[:-3], *([i] for i in ids[-3:])):
        ort_logits, ort_past = decoder.step(chunk, ort_past)
        with torch.inference_mode():
            torch_logits, *torch_past = step(torch.tensor([chunk]), *torch_past)
        worst = max(worst, float((torch.from_numpy(ort_logits) - torch_logits[0]).abs().max()))
    return worst


def export_onnx(model: str, out_dir: str | Path, *, verify: bool = True) -> ExportReport:
    """Load `model` (a hub id or folder, as KOBOT_MODEL) and export it with its tokenizer."""
    from core.generation.device import load_model

    source = resolve_model_source(model)
    tokenizer = tokenizer_from_source(source)
    loaded = load_model(source, "cpu", "fp32")
    check_supported(loaded.config)
    report = export_model(loaded, out_dir, tokenizer=tokenizer, source_model=model, verify=verify)
    if report.max_abs_diff is not None and report.max_abs_diff > VERIFY_TOLERANCE:
        raise ModelLoadError(
            f"ONNX export of {model!r} does not match torch (max |logit diff| "
            f"{report.max_abs_diff:.2e} > {VERIFY_TOLERANCE:g}); the folder {str(out_dir)!r} "
            "should not be used"
        )
    return report
