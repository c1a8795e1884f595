"""`kobot chat`: scripted through a pipe (a real subprocess) and driven in-process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from bots.console.adapter import ConsoleAdapter
from tests.support.dialogue import managed

SCRIPT = "안녕하세요\n오늘 날씨 어때?\n/reset\n오늘 날씨 어때?\n"


def run_chat(
    tiny_model_dir: Path, workdir: Path, stdin: str, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KOBOT_")},
        "KOBOT_MODEL": str(tiny_model_dir),
        "KOBOT_MAX_NEW_TOKENS": "8",
        "KOBOT_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "bots.cli", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=workdir,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[3])},
        timeout=120,
        check=False,
    )


def test_piped_chat_prints_one_line_per_input_and_keeps_history(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = run_chat(tiny_model_dir, tmp_path, SCRIPT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(lines)
    assert "초기화" in lines[2]
    assert (tmp_path / "kobot.db").is_file()  # the embedded SQLite default, in the working dir
    again = run_chat(tiny_model_dir, tmp_path, "/export\n")
    assert again.returncode == 0, again.stderr
    exported = json.loads((tmp_path / "kobot-history-console-console.json").read_text("utf-8"))
    turns = next(iter(exported["conversations"].values()))
    assert [t["text"] for t in turns if t["role"] == "user"] == [
        "안녕하세요",
        "오늘 날씨 어때?",
        "오늘 날씨 어때?",
    ]


def test_multi_line_replies_stay_on_one_line_and_user_is_chosen(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = run_chat(tiny_model_dir, tmp_path, "/help\n\n", "--user", "alice")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and "/reset" in lines[0] and "/export" in lines[0]
    assert "비어" in lines[1]


def test_a_bad_setting_stops_start_up_with_one_clear_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("KOBOT_TEMPERATURE=hot\n", encoding="utf-8")
    result = run_chat(tiny_model_dir, tmp_path, "안녕\n")
    assert result.returncode == 2
    assert "KOBOT_TEMPERATURE: Input should be a valid number" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_model_explains_how_to_set_kobot_model(tmp_path: Path) -> None:
    result = run_chat(tmp_path / "missing-model", tmp_path, "안녕\n")
    assert result.returncode == 1
    assert "KOBOT_MODEL" in result.stderr and "Traceback" not in result.stderr


async def lines_of(text: str) -> AsyncIterator[str]:
    for line in text.splitlines():
        yield line


async def test_prompts_hold_the_first_turn_until_reset(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = io.StringIO()
    async with managed(tiny_model_dir, tmp_path) as (manager, backend):
        await ConsoleAdapter(manager, "bob", out).run_lines(lines_of(SCRIPT))
    tokenizer = backend.inner.tokenizer
    prompts = [
        tokenizer.decode(list(r.prompt_ids)).replace("\n ", "\n")  # type: ignore[attr-defined]
        for r in backend.requests
    ]
    assert len(prompts) == 3 and len(out.getvalue().splitlines()) == 4
    assert "User: 안녕하세요\nAI:" in prompts[1]
    assert "안녕하세요" not in prompts[2]
