"""What `kobot train` is asked to do; no torch here, so the CLI can build it cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.settings import DEFAULT_PERSONA

FROM_SCRATCH_LR = 1e-3
FINE_TUNE_LR = 5e-5


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything `kobot train` takes, with its defaults (`core.training.cli` has the flags)."""

    data: Path
    base: str
    out: Path
    from_scratch: bool = False
    layers: int = 4
    dim: int = 256
    heads: int | None = None
    context: int = 1024
    dropout: float = 0.0
    epochs: int = 3
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_minutes: float | None = None
    max_steps: int | None = None
    eval_fraction: float = 0.05
    max_held_out: int = 1000
    limit: int | None = None
    seed: int = 0
    persona: str = DEFAULT_PERSONA
    max_tokens: int = 512
    device: str = "auto"
    resume: bool = True
    save_every_minutes: float = 10.0

    @property
    def learning_rate(self) -> float:
        """`FROM_SCRATCH_LR` for a fresh small model, `FINE_TUNE_LR` for a pretrained one (unless
        given)."""
        if self.lr is not None:
            return self.lr
        return FROM_SCRATCH_LR if self.from_scratch else FINE_TUNE_LR

    @property
    def n_heads(self) -> int:
        return self.heads or max(1, self.dim // 64)
