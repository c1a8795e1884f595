"""Device and dtype choice, validated in one place, and loading a model onto them.

Parsing (`parse_device`) is plain Python, for the settings and for decoders that do not run
torch (ONNX); `available_device`, `torch_dtype` and `load_model` import torch when called.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from core.generation.base import BackendInfo, ModelLimits
from core.generation.errors import ModelLoadError, describe

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from core.generation.tokenizer import KoGPT2Tokenizer, ModelSource

__all__ = [
    "DTYPES",
    "DeviceSpec",
    "LoadedModel",
    "available_device",
    "load_local_model",
    "load_model",
    "model_window",
    "n_positions_of",
    "parse_device",
    "resolve_device",
    "resolve_dtype",
    "torch_dtype",
]

DeviceKind = Literal["auto", "cpu", "mps", "cuda"]
DTYPES = ("fp32", "fp16", "bf16")
_DEVICE = re.compile(r"(auto|cpu|mps)|cuda(?::(\d+))?")


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A KOBOT_DEVICE value: `auto`, `cpu`, `mps` or `cuda` with a GPU index."""

    kind: DeviceKind
    index: int = 0


def parse_device(text: str) -> DeviceSpec:
    """`auto`, `cpu`, `mps`, `cuda`, `cuda:N` (any case, spaces around); ValueError otherwise."""
    match = _DEVICE.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"must be auto, cpu, mps, cuda or cuda:N (got {text!r})")
    if match.group(1):
        return DeviceSpec(match.group(1))  # type: ignore[arg-type]
    return DeviceSpec("cuda", int(match.group(2) or 0))


def resolve_device(requested: str, *, cuda_count: int, mps_available: bool) -> str:
    """`auto` → cuda:0, else mps, else cpu; an explicit device must exist (ModelLoadError)."""
    try:
        spec = parse_device(requested)
    except ValueError as error:
        raise ModelLoadError(f"KOBOT_DEVICE: {error}") from None
    if spec.kind == "auto":
        return "cuda:0" if cuda_count > 0 else "mps" if mps_available else "cpu"
    if spec.kind == "mps" and not mps_available:
        raise ModelLoadError("KOBOT_DEVICE: mps is not available here; use auto or cpu")
    if spec.kind == "cuda":
        return _cuda_device(spec.index, cuda_count)
    return spec.kind


def _cuda_device(index: int, cuda_count: int) -> str:
    if cuda_count == 0:
        raise ModelLoadError(
            "KOBOT_DEVICE: cuda was asked for but no CUDA GPU is available "
            "(torch.cuda.is_available() is False: no GPU, no driver, or a CPU-only torch build); "
            "use auto or cpu"
        )
    if index >= cuda_count:
        raise ModelLoadError(
            f"KOBOT_DEVICE: cuda:{index} does not exist ({cuda_count} CUDA GPU(s))"
        )
    return f"cuda:{index}"


def available_device(requested: str) -> str:
    """`resolve_device` against this machine's torch."""
    import torch

    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return resolve_device(
        requested, cuda_count=cuda_count, mps_available=torch.backends.mps.is_available()
    )


def resolve_dtype(requested: str, device: str) -> str:
    """`auto` → the fastest exact-enough dtype on `device` (`cpu_features.auto_dtype_name`:
    bf16 on a CPU with AMX or AVX-512 BF16, else fp32; bf16 or fp16 on a GPU); fp32/fp16/bf16
    are taken as given."""
    requested = requested.strip().lower()
    if requested == "auto":
        from core.generation.cpu_features import auto_dtype_name

        return auto_dtype_name(device)
    if requested not in DTYPES:
        raise ModelLoadError(f"KOBOT_DTYPE: must be auto, fp32, fp16 or bf16 (got {requested!r})")
    return requested


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of `fp32`, `fp16` or `bf16`."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def load_model(source: ModelSource, device: str, dtype: str) -> PreTrainedModel:
    """The causal LM from a hub id (downloaded with a progress bar) or a folder, ready to run."""
    from transformers import AutoModelForCausalLM

    from core.generation.tokenizer import load_error

    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            source.name, dtype=torch_dtype(dtype), local_files_only=source.local_files_only
        )
    except Exception as error:
        raise load_error(source, error) from error
    try:
        loaded.to(device)
    except Exception as error:
        raise ModelLoadError(
            f"KOBOT_DEVICE/KOBOT_DTYPE: could not place the model on {device} as {dtype} "
            f"({describe(error)})"
        ) from error
    loaded.eval()
    return loaded


def free_cuda_cache() -> None:
    """Return cached CUDA memory to the driver."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A Hugging Face causal LM on its device, with KoGPT2's tokenizer and its limits."""

    name: str
    """KOBOT_MODEL as given (a hub id or a folder)."""
    model: PreTrainedModel
    tokenizer: KoGPT2Tokenizer
    device: str
    dtype: str
    n_positions: int
    vocab_size: int

    def limits(self) -> ModelLimits:
        return ModelLimits(self.n_positions, self.vocab_size)

    def info(self) -> BackendInfo:
        return BackendInfo("local", self.name, self.device, self.dtype, self.n_positions)


def n_positions_of(config: Any) -> int:
    """The context window of a Hugging Face config (`n_positions` or `max_position_embeddings`)."""
    return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def load_local_model(name: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Resolve the device and dtype, load the tokenizer and the model; ModelLoadError (with the
    KOBOT_* setting to fix) when any of it is impossible. Takes seconds: call it off the loop."""
    from core.generation.tokenizer import resolve_model_source, tokenizer_from_source

    place = available_device(device)
    precision = resolve_dtype(dtype, place)
    source = resolve_model_source(name)
    tokenizer = tokenizer_from_source(source)
    model = load_model(source, place, precision)
    vocab_size = int(model.config.vocab_size)
    if tokenizer.vocab_size > vocab_size:
        raise ModelLoadError(
            f"KOBOT_MODEL: the tokenizer has {tokenizer.vocab_size} tokens but the model "
            f"only {vocab_size}; {name!r} is not a KoGPT2-format folder"
        )
    window = n_positions_of(model.config)
    return LoadedModel(name, model, tokenizer, place, precision, window, vocab_size)


DEFAULT_N_POSITIONS = 1024
"""KoGPT2's window, when nothing else says."""


def config_path(model: str) -> Path | None:
    """config.json of a model folder, or of a hub id already in the Hugging Face cache."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder / "config.json" if (folder / "config.json").is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:
        return None
    return Path(cached) if isinstance(cached, str) else None


def model_window(model: str, configured: int | None) -> int:
    """The context window without loading the model: `configured` when set, else the model's
    config.json, else 1,024 (KoGPT2's)."""
    if configured:
        return configured
    path = config_path(model)
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path else {}
        return int(config.get("n_positions") or config["max_position_embeddings"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return DEFAULT_N_POSITIONS
