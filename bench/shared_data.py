"""Where the shared read-only data lives: `$SHARED_DIR`, `../shared` beside the repository, or
`/work/shared` (a clean clone for CI may sit elsewhere than the working checkout)."""

from __future__ import annotations

import os
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    candidates = [os.environ.get("SHARED_DIR"), REPOSITORY.parent / "shared", "/work/shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "kogpt2-base-v2" / "tokenizer.json").is_file():
            return Path(candidate)
    return REPOSITORY.parent / "shared"
