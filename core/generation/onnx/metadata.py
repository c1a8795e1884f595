"""An ONNX export folder's format, torch-free: its file names, the graph's input and output
names, and `kobot-onnx.json` (the shapes and provenance the ONNX backend reads).

`core.generation.onnx.export` writes this format and `core.generation.onnx.decoder` reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.generation.errors import ModelLoadError

__all__ = [
    "METADATA_FILE",
    "MODEL_FILE",
    "OnnxMetadata",
    "cache_names",
    "input_names",
    "output_names",
    "read_metadata",
]

MODEL_FILE = "model.onnx"
METADATA_FILE = "kobot-onnx.json"
FORMAT_VERSION = 1
OPSET = 17


@dataclass(frozen=True, slots=True)
class OnnxMetadata:
    """What the backend needs to know about an exported graph (saved as `kobot-onnx.json`)."""

    source_model: str
    n_layer: int
    n_head: int
    head_dim: int
    n_positions: int
    vocab_size: int
    opset: int = OPSET
    format: int = FORMAT_VERSION
    torch_version: str = ""
    """The exporter's torch, for provenance."""


def input_names(n_layer: int) -> list[str]:
    return ["input_ids", *cache_names("past", n_layer)]


def output_names(n_layer: int) -> list[str]:
    return ["logits", *cache_names("present", n_layer)]


def cache_names(prefix: str, n_layer: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


def read_metadata(folder: str | Path) -> OnnxMetadata:
    """The export's `kobot-onnx.json`; ModelLoadError naming KOBOT_ONNX_DIR when missing."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file() or not (Path(folder) / MODEL_FILE).is_file():
        raise ModelLoadError(
            f"KOBOT_ONNX_DIR: {str(folder)!r} holds no ONNX export ({MODEL_FILE} and "
            f"{METADATA_FILE}); create it with `kobot export-onnx --out {folder}`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        meta = OnnxMetadata(**data)
    except (ValueError, TypeError) as error:
        raise ModelLoadError(f"KOBOT_ONNX_DIR: {str(path)!r} is unreadable ({error})") from error
    if meta.format != FORMAT_VERSION:
        raise ModelLoadError(
            f"KOBOT_ONNX_DIR: {str(folder)!r} has export format {meta.format}, this kobot reads "
            f"{FORMAT_VERSION}; export again with `kobot export-onnx --out {folder}`"
        )
    return meta
