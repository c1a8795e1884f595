"""bench/serve.py end to end on the tiny model (a smoke test of the benchmark, not a timing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import serve
from tests.conftest import CHATBOT_CSV


async def test_the_benchmark_runs_both_arms_and_ends_with_the_ratio(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await serve.main(
        [
            "--users=3",
            "--turns=2",
            "--history=0-2",
            "--max-new-tokens=4",
            f"--model-config={tiny_model_dir}",
            f"--data={CHATBOT_CSV}",
            "--kv-budget-mb=8",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith(" naive: 6 replies, 24 new tokens") for line in lines)
    assert any(line.startswith("engine: 6 replies, 24 new tokens") for line in lines)
    assert lines[-1].startswith("throughput ratio at 3 users: ") and lines[-1].endswith("×")
