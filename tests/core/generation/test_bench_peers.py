"""bench/serve.py's peer arms and burst mode on the tiny model (a smoke test, not a timing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import serve
from tests.conftest import CHATBOT_CSV


def run_args(tiny_model_dir: Path, arms: str, *extra: str) -> list[str]:
    return [
        "--burst",
        "--users=3",
        "--max-new-tokens=4",
        f"--arms={arms}",
        f"--model-config={tiny_model_dir}",
        f"--data={CHATBOT_CSV}",
        "--kv-budget-mb=8",
        *extra,
    ]


async def test_burst_runs_hf_batch_and_the_engine_and_prints_the_ratio(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await serve.main(run_args(tiny_model_dir, "hf-batch,engine"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert "3 users × 1 turns, prior history 0 exchanges" in lines[0]  # one turn, no history
    assert any(line.startswith("hf-batch: 3 replies, 12 new tokens") for line in lines)
    assert any(line.startswith("engine: 3 replies, 12 new tokens") for line in lines)
    assert lines[-1].startswith("engine vs best peer (hf-batch, ")


async def test_rounds_alternate_the_arms_and_end_with_the_medians(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await serve.main(run_args(tiny_model_dir, "hf-batch,engine", "--rounds=3"))
    lines = capsys.readouterr().out.strip().splitlines()
    runs = [line.split(":")[0].strip() for line in lines if " 3 replies, 12 new tokens" in line]
    assert runs == ["hf-batch", "engine", "engine", "hf-batch", "hf-batch", "engine"]
    assert sum(line.startswith("engine vs best peer (hf-batch, ") for line in lines) == 3
    assert lines[-1].startswith("medians over 3 rounds: hf-batch ")
    assert " tok/s | engine vs hf-batch " in lines[-1] and lines[-1].endswith("×")


async def test_the_ct2_arm_converts_once_into_the_cache_folder(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ctranslate2")  # the optional `bench` dependency group
    for _ in range(2):
        await serve.main(run_args(tiny_model_dir, "ct2", f"--cache-dir={tmp_path}"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("   ct2: 3 replies, 12 new tokens") for line in lines) == 2
    assert len(converted(tmp_path)) == 1


def converted(cache: Path) -> list[Path]:
    return list(cache.glob("ct2-int8-*/model.bin"))
