"""`kobot train` flags become a TrainConfig: what was given, TrainConfig's defaults for the rest."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from core.settings import Settings
from core.training.cli import add_train_command, config_from_args
from core.training.config import TrainConfig

SETTINGS = Settings(_env_file=None, persona="봇이다", device="cpu")  # type: ignore[call-arg]
REQUIRED = ["train", "--data", "d.csv", "--base", "b", "--out", "o"]


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers(dest="command"))
    return parser.parse_args([*REQUIRED, *flags])


def test_flags_not_given_take_train_config_defaults() -> None:
    settings = SETTINGS
    config = config_from_args(parse("--epochs", "5", "--lr", "0.01"), settings)
    defaults = TrainConfig(data=Path("d.csv"), base="b", out=Path("o"))
    assert (config.epochs, config.lr) == (5, 0.01)
    assert (config.layers, config.dim, config.batch_size) == (
        defaults.layers,
        defaults.dim,
        defaults.batch_size,
    )
    assert (config.data, config.out, config.from_scratch) == (Path("d.csv"), Path("o"), False)
    assert (config.persona, config.device, config.resume) == ("봇이다", "cpu", True)


def test_persona_device_and_resume_flags_win_over_settings() -> None:
    flags = parse("--persona", "P", "--device", "cuda", "--no-resume", "--from-scratch")
    config = config_from_args(flags, SETTINGS)
    assert (config.persona, config.device, config.resume, config.from_scratch) == (
        "P",
        "cuda",
        False,
        True,
    )


def test_a_bad_value_is_refused_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        parse("--epochs", "many")
