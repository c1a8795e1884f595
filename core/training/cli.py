"""`kobot train` flags; the training itself (torch) is imported only when it runs."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from core.settings import Settings
from core.training.config import FINE_TUNE_LR, FROM_SCRATCH_LR, TrainConfig

_FIELDS = frozenset(field.name for field in fields(TrainConfig))
_DEFAULTS = {field.name: field.default for field in fields(TrainConfig)}


def add_train_command(sub: Any) -> None:
    """Register `kobot train` on the `kobot` sub-command parser."""
    train = sub.add_parser(
        "train",
        argument_default=argparse.SUPPRESS,
        help="fine-tune a model on Q/A CSV or dialogue JSONL (see README: Fine-tuning)",
        description="Q/A CSV (Q,A columns) or JSONL dialogues become User:/AI: prompts exactly "
        "as the bot builds them; loss on the AI replies only. Run the same command again to "
        "resume from OUT/checkpoint.",
    )
    train.add_argument("--data", required=True, type=Path, help="a .csv (Q,A) or .jsonl file")
    train.add_argument("--base", required=True, help="Hugging Face id or folder to start from")
    train.add_argument("--out", required=True, type=Path, help="folder for the trained model")
    _scratch_flags(train)
    _loop_flags(train)


def _scratch_flags(train: argparse.ArgumentParser) -> None:
    scratch = train.add_argument_group("from scratch (a small fresh model with --base's tokenizer)")
    scratch.add_argument("--from-scratch", action="store_true")
    scratch.add_argument("--layers", type=int, help=_default("layers"))
    scratch.add_argument("--dim", type=int, help=_default("dim"))
    scratch.add_argument("--heads", type=int, help="attention heads (default: dim / 64)")
    scratch.add_argument("--context", type=int, help=f"window in tokens ({_default('context')})")


def _loop_flags(train: argparse.ArgumentParser) -> None:
    loop = train.add_argument_group("training")
    loop.add_argument("--epochs", type=int, help=_default("epochs"))
    loop.add_argument("--batch-size", type=int, help=_default("batch_size"))
    loop.add_argument(
        "--lr",
        type=float,
        help=f"default {FROM_SCRATCH_LR:g} from scratch, {FINE_TUNE_LR:g} fine-tuning",
    )
    loop.add_argument("--warmup-steps", type=int, help=_default("warmup_steps"))
    loop.add_argument("--max-minutes", type=float, help="stop (and save) after this long")
    loop.add_argument("--max-steps", type=int, help="stop (and save) after this many steps")
    loop.add_argument("--eval-fraction", type=float, help=f"held out ({_default('eval_fraction')})")
    loop.add_argument("--limit", type=int, help="use a random subset of this many dialogues")
    loop.add_argument("--seed", type=int, help=_default("seed"))
    loop.add_argument("--persona", help="the prompt's first line (default: KOBOT_PERSONA)")
    loop.add_argument("--device", help="auto, cpu, cuda… (default: KOBOT_DEVICE)")
    loop.add_argument("--no-resume", action="store_true", help="ignore OUT/checkpoint")


def run_train(settings: Settings, args: argparse.Namespace) -> int:
    from core.training.data import DataError
    from core.training.trainer import train

    config = config_from_args(args, settings)
    try:
        train(config)
    except (DataError, ValueError) as error:
        print(f"kobot train: {error}", file=sys.stderr)
        return 2
    return 0


def config_from_args(args: argparse.Namespace, settings: Settings) -> TrainConfig:
    """The flags given, TrainConfig's defaults for the rest; persona and device from settings."""
    given = {name: value for name, value in vars(args).items() if name in _FIELDS}
    given["persona"] = getattr(args, "persona", None) or settings.persona
    given["device"] = getattr(args, "device", None) or settings.device
    given["resume"] = not getattr(args, "no_resume", False)
    return TrainConfig(**given)


def _default(name: str) -> str:
    return f"default {_DEFAULTS[name]}"
