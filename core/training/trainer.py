"""`kobot train`: fine-tune KoGPT2 (or train a small GPT-2 from scratch) on your own dialogues.

    kobot train --data ChatbotData.csv --base skt/kogpt2-base-v2 --out ./my-model
    kobot train --data ChatbotData.csv --base ../shared/kogpt2-base-v2 --out ./small \\
        --from-scratch --layers 4 --dim 256 --max-minutes 15

The data becomes `User:`/`AI:` prompts exactly as the dialogue manager builds them
(`core.training.data`); the loss is taken on the AI replies only. A held-out split is evaluated
before training and after every epoch. `--out` receives a model folder that `KOBOT_MODEL` loads
(weights, config, tokenizer, and `training.json` with the losses) and, while training,
`--out/checkpoint` (model, optimizer and scheduler state, the position in the data): running the
same command again resumes from it. `--max-minutes` stops cleanly (checkpoint and model saved).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
)

from core.generation.device import available_device, n_positions_of
from core.generation.tokenizer import (
    MODEL_VARIABLE,
    KoGPT2Tokenizer,
    ModelLoadError,
    ModelSource,
    load_error,
    resolve_model_source,
    tokenizer_from_source,
)
from core.training.config import TrainConfig
from core.training.data import (
    IGNORE,
    Example,
    ExampleBuilder,
    build_examples,
    read_dialogues,
    sample,
    split_held_out,
)

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint"
TRAINER_STATE = "trainer.pt"
REPORT = "training.json"


@dataclass
class Position:
    """Where training is: resumes continue from here."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    seconds: float = 0.0


@dataclass
class Report:
    """What `training.json` records."""

    held_out_loss: list[dict[str, float]] = field(default_factory=list)
    train_examples: int = 0
    held_out_examples: int = 0
    parameters: int = 0
    finished: bool = False
    stop_reason: str = ""

    @property
    def first_loss(self) -> float:
        return self.held_out_loss[0]["loss"] if self.held_out_loss else math.nan

    @property
    def last_loss(self) -> float:
        return self.held_out_loss[-1]["loss"] if self.held_out_loss else math.nan


# --- model -------------------------------------------------------------------------------------


def load_model(
    config: TrainConfig, source: ModelSource, tokenizer: KoGPT2Tokenizer
) -> PreTrainedModel:
    """`--base`'s model, or a fresh smaller one with its tokenizer (`--from-scratch`)."""
    if config.from_scratch:
        return fresh_model(config, tokenizer, base_config(source))
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            source.name, local_files_only=source.local_files_only
        )
    except Exception as error:
        raise ModelLoadError(
            f"{load_error(source, error)} (to train a new small model with only this tokenizer, "
            "add --from-scratch --layers N --dim D)"
        ) from error
    return model


@contextmanager
def named_base() -> Iterator[None]:
    """Loading errors name `--base`, which is what the user set (not KOBOT_MODEL)."""
    try:
        yield
    except ModelLoadError as error:
        raise ModelLoadError(str(error).replace(MODEL_VARIABLE, "--base")) from error


def resumed_model(folder: Path) -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(folder)
    return model


def base_config(source: ModelSource) -> Any:
    """`--base`'s config.json, or None when it has none."""
    try:
        return AutoConfig.from_pretrained(source.name, local_files_only=source.local_files_only)
    except Exception:
        return None


def window_of(config: TrainConfig, source: ModelSource) -> int:
    """The context the trained model will have: `--context` from scratch, else the base's."""
    if config.from_scratch:
        return config.context
    base = base_config(source)
    return n_positions_of(base) if base is not None else config.context


def fresh_model(config: TrainConfig, tokenizer: KoGPT2Tokenizer, base: Any) -> PreTrainedModel:
    """A GPT-2 of `--layers`/`--dim` with random weights, sized for the base's vocabulary."""
    torch.manual_seed(config.seed)
    vocab_size = int(getattr(base, "vocab_size", 0) or 0)
    gpt2 = GPT2Config(
        vocab_size=max(vocab_size, tokenizer.vocab_size),
        n_positions=config.context,
        n_embd=config.dim,
        n_layer=config.layers,
        n_head=config.n_heads,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=tokenizer.eos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    return GPT2LMHeadModel(gpt2)


def adamw(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused where torch has it (about 10× faster steps over KoGPT2's big embedding)."""
    options: dict[str, Any] = {"lr": config.learning_rate, "weight_decay": config.weight_decay}
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **options)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), **options)


# --- batches and loss --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def collate(examples: Sequence[Example], pad_id: int, device: str) -> Batch:
    """Right-padded tensors (padding never takes loss)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return Batch(ids.to(device), mask.to(device), labels.to(device))


def summed_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over the labelled tokens, and how many there are.

    The output layer runs only where a label is (the replies), not over every position: with
    KoGPT2's 51,200-word vocabulary that is most of the cost of a step.
    """
    model_any: Any = model
    hidden = model_any.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state
    targets = batch.labels[:, 1:]
    where = targets != IGNORE
    logits = model_any.get_output_embeddings()(hidden[:, :-1][where])
    loss = F.cross_entropy(logits.float(), targets[where], reduction="sum")
    return loss, int(where.sum())


def batches(examples: Sequence[Example], size: int, seed: int) -> list[list[Example]]:
    """Shuffled batches of similar lengths (less padding): shuffle, sort in chunks, batch."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    chunk = size * 50
    for start in range(0, len(order), chunk):
        order[start : start + chunk] = sorted(order[start : start + chunk], key=_length)
    grouped = [order[i : i + size] for i in range(0, len(order), size)]
    random.Random(seed + 1).shuffle(grouped)
    return grouped


def _length(example: Example) -> int:
    return len(example.input_ids)


@torch.no_grad()
def held_out_loss(
    model: torch.nn.Module, examples: Sequence[Example], pad_id: int, device: str, size: int
) -> float:
    """Mean loss per reply token over the held-out examples."""
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(examples, key=_length)
    for start in range(0, len(ordered), size):
        loss, n = summed_loss(model, collate(ordered[start : start + size], pad_id, device))
        total, count = total + float(loss), count + n
    model.train()
    return total / max(count, 1)


# --- progress ----------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; a line every `every_s` seconds otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, every_s: float = 15.0) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.every_s = every_s
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.shown = 0.0
        self.done_at_start: int | None = None

    def update(self, step: int, text: str) -> None:
        now = time.monotonic()
        if self.done_at_start is None:
            self.done_at_start = step - 1
        if not self.tty and now - self.shown < self.every_s and step < self.total:
            return
        self.shown = now
        line = f"{self._bar(step)} {step}/{self.total} {text} {self._eta(step, now)}"
        self.stream.write(f"\r{line}\x1b[K" if self.tty else f"{line}\n")
        self.stream.flush()

    def _bar(self, step: int, width: int = 24) -> str:
        filled = round(width * min(step, self.total) / self.total)
        return "[" + "#" * filled + "-" * (width - filled) + "]"

    def _eta(self, step: int, now: float) -> str:
        done = step - (self.done_at_start or 0)
        if done <= 0:
            return ""
        rate = done / max(now - self.started, 1e-9)
        left = (self.total - step) / rate
        return f"{rate:.2f} step/s, ETA {int(left // 60)}:{int(left % 60):02d}"

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --- checkpoints -------------------------------------------------------------------------------


def save_model(model: torch.nn.Module, tokenizer: KoGPT2Tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model_any: Any = model
    model_any.save_pretrained(folder)
    tokenizer.hf.save_pretrained(folder)


def save_checkpoint(out: Path, trainer: Trainer) -> None:
    """Model + optimizer + scheduler + position, written aside and then swapped in."""
    final, partial = out / CHECKPOINT, out / f"{CHECKPOINT}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_model(trainer.model, trainer.tokenizer, partial)
    state = {
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "position": asdict(trainer.position),
        "report": asdict(trainer.report),
        "shape": trainer.shape(),
    }
    torch.save(state, partial / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)


def load_checkpoint(folder: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(folder / TRAINER_STATE, weights_only=True)
    return state


# --- the trainer -------------------------------------------------------------------------------


class TrainingStopped(Exception):
    """Raised inside the loop when a limit (time, steps) is reached."""


class Trainer:
    """One training run (possibly resumed): the data, the model, the optimizer, the position."""

    def __init__(self, config: TrainConfig, log_line: Callable[[str], None] = print) -> None:
        self.config = config
        self.say = log_line
        self.device = available_device(config.device)
        with named_base():
            source = resolve_model_source(config.base)
            self.tokenizer = tokenizer_from_source(source)
        self.train_set, self.held_out = self._examples(window_of(config, source))
        self.checkpoint: dict[str, Any] | None = self._resumable()
        with named_base():
            model = (
                load_model(config, source, self.tokenizer)
                if self.checkpoint is None
                else resumed_model(config.out / CHECKPOINT)
            )
        self.model: torch.nn.Module = model.to(self.device)  # type: ignore[arg-type]
        self.optimizer = adamw(self.model, config)
        self.steps_per_epoch = math.ceil(len(self.train_set) / config.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.position = Position()
        self.report = Report(
            train_examples=len(self.train_set),
            held_out_examples=len(self.held_out),
            parameters=sum(p.numel() for p in self.model.parameters()),
        )
        if self.checkpoint is not None:
            self._restore(self.checkpoint)

    def _examples(self, window: int) -> tuple[list[Example], list[Example]]:
        config = self.config
        dialogues = sample(read_dialogues(config.data), config.limit, config.seed)
        builder = ExampleBuilder(
            self.tokenizer, config.persona, self.tokenizer.eos_id, min(window, config.max_tokens)
        )
        examples = build_examples(builder, dialogues)
        return split_held_out(examples, config.eval_fraction, config.seed, config.max_held_out)

    def shape(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed."""
        config = self.config
        return {
            "data": str(config.data.resolve()),
            "train_examples": len(self.train_set),
            "batch_size": config.batch_size,
            "seed": config.seed,
        }

    def _resumable(self) -> dict[str, Any] | None:
        folder = self.config.out / CHECKPOINT
        if not self.config.resume or not (folder / TRAINER_STATE).is_file():
            return None
        state = load_checkpoint(folder)
        if state["shape"] != self.shape():
            raise ValueError(
                f"{folder} was made with other data or settings ({state['shape']}); "
                "pass --no-resume to start over (it will be replaced)"
            )
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.position = Position(**state["position"])
        self.report = Report(**state["report"])
        position = self.position
        self.say(
            f"이어서 학습해요 (resuming): epoch {position.epoch + 1}, batch {position.batch}, "
            f"step {position.step}"
        )

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth over all epochs."""
        total = max(self.config.epochs * self.steps_per_epoch, 1)
        warmup = min(self.config.warmup_steps, total // 10)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    # Running

    def run(self) -> Report:
        """Train until the epochs are done or a limit is hit; save the model folder either way."""
        config = self.config
        self._describe()
        if not self.report.held_out_loss:
            self._evaluate("before training")
        started = time.monotonic() - self.position.seconds
        deadline = started + config.max_minutes * 60 if config.max_minutes else math.inf
        progress = Progress(config.epochs * self.steps_per_epoch)
        try:
            self._epochs(progress, started, deadline)
            self.report.finished = True
            self.report.stop_reason = "all epochs done"
        except TrainingStopped as stop:
            self.report.stop_reason = str(stop)
        except KeyboardInterrupt:
            self.report.stop_reason = "interrupted"
            progress.close()
            self._save(started)
            raise
        progress.close()
        if not self.report.finished and self._evaluated_at() != self.position.step:
            self._evaluate(self.report.stop_reason)
        self._save(started)
        return self.report

    def _describe(self) -> None:
        config, report = self.config, self.report
        self.say(
            f"학습 데이터 (data): {report.train_examples} train / {report.held_out_examples} "
            f"held-out examples; model {report.parameters / 1e6:.1f}M parameters on {self.device}; "
            f"{config.epochs} epochs × {self.steps_per_epoch} steps of {config.batch_size}, "
            f"lr {config.learning_rate:g}"
        )

    def _epochs(self, progress: Progress, started: float, deadline: float) -> None:
        self.model.train()
        saved = time.monotonic()
        while self.position.epoch < self.config.epochs:
            epoch = self.position.epoch
            plan = batches(self.train_set, self.config.batch_size, self.config.seed + epoch)
            for index in range(self.position.batch, len(plan)):
                loss = self._step(plan[index])
                self.position.batch, self.position.step = index + 1, self.position.step + 1
                self.position.seconds = time.monotonic() - started
                progress.update(self.position.step, f"epoch {epoch + 1} loss {loss:.3f}")
                self._check_limits(deadline)
                if time.monotonic() - saved > self.config.save_every_minutes * 60:
                    save_checkpoint(self.config.out, self)
                    saved = time.monotonic()
            self.position.epoch, self.position.batch = epoch + 1, 0
            self._evaluate(f"epoch {epoch + 1}")

    def _step(self, examples: list[Example]) -> float:
        batch = collate(examples, self.tokenizer.pad_id, self.device)
        loss, count = summed_loss(self.model, batch)
        mean = loss / max(count, 1)
        self.optimizer.zero_grad(set_to_none=True)
        mean.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return float(mean.detach())

    def _check_limits(self, deadline: float) -> None:
        if self.config.max_steps is not None and self.position.step >= self.config.max_steps:
            raise TrainingStopped(f"--max-steps {self.config.max_steps} reached")
        if time.monotonic() >= deadline:
            raise TrainingStopped(f"--max-minutes {self.config.max_minutes:g} reached")

    def _evaluate(self, when: str) -> None:
        loss = held_out_loss(
            self.model, self.held_out, self.tokenizer.pad_id, self.device, self.config.batch_size
        )
        self.report.held_out_loss.append(
            {"step": self.position.step, "epoch": self.position.epoch, "loss": loss}
        )
        self.say(f"\nheld-out loss {when}: {loss:.4f} (step {self.position.step})")

    def _evaluated_at(self) -> int:
        return int(self.report.held_out_loss[-1]["step"]) if self.report.held_out_loss else -1

    def _save(self, started: float) -> None:
        self.position.seconds = time.monotonic() - started
        out = self.config.out
        save_checkpoint(out, self)
        save_model(self.model, self.tokenizer, out)
        report = {
            **asdict(self.report),
            "seconds": round(self.position.seconds, 1),
            "steps": self.position.step,
            "config": {k: str(v) for k, v in asdict(self.config).items()},
        }
        (out / REPORT).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
        self.say(
            f"저장했어요 (saved) {out} after {self.position.seconds / 60:.1f} min "
            f"({self.report.stop_reason}); held-out loss {self.report.first_loss:.4f} → "
            f"{self.report.last_loss:.4f}\nKOBOT_MODEL={out}"
        )


def train(config: TrainConfig, log_line: Callable[[str], None] = print) -> Report:
    """Run `kobot train` with `config`; the model folder is written to `config.out`."""
    return Trainer(config, log_line).run()
