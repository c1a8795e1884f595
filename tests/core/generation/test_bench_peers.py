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
