"""`kobot train`: data → examples exactly like inference prompts, the loop, resuming, the CLI,
and the demo: a small model trained from scratch on part of ChatbotData for a bounded time
lowers its held-out loss clearly below the untrained model's, and the bot can use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bots.app import build_dialogue_manager
from bots.cli import main as cli_main
from core.dialogue.prompt import PromptBuilder
from core.generation.tokenizer import KoGPT2Tokenizer, load_tokenizer
from core.messages import ReplyKind, Role, Turn
from core.training.config import TrainConfig
from core.training.data import (
    IGNORE,
    DataError,
    ExampleBuilder,
    read_dialogues,
    split_held_out,
    usable,
)
from core.training.trainer import CHECKPOINT, TRAINER_STATE, Trainer, train
from tests.conftest import CHATBOT_CSV
from tests.support.backends import engine_backend
from tests.support.dialogue import make_settings, message

PERSONA = "다음은 친절한 AI 챗봇과 사용자의 대화입니다."


@pytest.fixture(scope="module")
def tokenizer(kogpt2_dir: Path) -> KoGPT2Tokenizer:
    return load_tokenizer(str(kogpt2_dir))


def dialogue(*texts: str) -> tuple[Turn, ...]:
    roles = [Role.USER, Role.AI]
    return tuple(Turn(roles[i % 2], text, "") for i, text in enumerate(texts))


def said(turns: tuple[Turn, ...] | list[tuple[Turn, ...]]) -> object:
    """(role, text) pairs (turns carry a creation time, which does not matter here)."""
    if isinstance(turns, list):
        return [said(d) for d in turns]
    return [(turn.role, turn.text) for turn in turns]


def write_jsonl(path: Path, count: int) -> Path:
    lines = [
        json.dumps(
            {"turns": [{"role": "user", "text": f"질문 {i}"}, {"role": "ai", "text": f"답 {i}"}]}
        )
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Examples


def test_an_example_is_the_inference_prompt_plus_the_reply(tokenizer: KoGPT2Tokenizer) -> None:
    builder = ExampleBuilder(tokenizer, PERSONA, tokenizer.eos_id, max_tokens=1024)
    turns = dialogue("안녕", "반가워요", "오늘 날씨 어때?", "맑고 따뜻해요")
    example = builder.build(turns)
    assert example is not None

    prompt = PromptBuilder(tokenizer).build(PERSONA, turns[:2], turns[2].text, budget=1024)
    reply = [*tokenizer.encode_text("맑고 따뜻해요\n"), tokenizer.eos_id]
    assert example.input_ids == (*prompt.prompt_ids, *reply)  # what the bot will be asked

    targets = [
        token for token, label in zip(*example_rows(example), strict=True) if label != IGNORE
    ]
    first_reply = tokenizer.encode_text("반가워요\n")
    assert targets == [*first_reply, *reply]  # the AI's words (line ends, `</s>`), nothing else
    said = tokenizer.decode(
        [t for t, label in zip(*example_rows(example), strict=True) if label == IGNORE]
    )
    assert PERSONA in said and "User:" in said and "안녕" in said and "반가워요" not in said


def example_rows(example: object) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return example.input_ids, example.labels  # type: ignore[attr-defined]


def test_a_long_dialogue_keeps_its_newest_exchanges(tokenizer: KoGPT2Tokenizer) -> None:
    long = "아주 긴 이야기 " * 40
    turns = dialogue(long, "첫 답", "짧은 질문", "짧은 답")
    example = ExampleBuilder(tokenizer, PERSONA, tokenizer.eos_id, max_tokens=64).build(turns)
    assert example is not None and len(example.input_ids) <= 64
    text = tokenizer.decode(list(example.input_ids))
    assert "짧은 질문" in text and "아주 긴" not in text
    too_long = ExampleBuilder(tokenizer, PERSONA, tokenizer.eos_id, max_tokens=16)
    assert too_long.build(dialogue(long, "답")) is None


def test_turns_are_cleaned_joined_and_trimmed() -> None:
    turns = [
        Turn(Role.AI, "먼저 인사", ""),
        Turn(Role.USER, "안녕", ""),
        Turn(Role.USER, "  반가워\n", ""),
        Turn(Role.AI, "", ""),
        Turn(Role.AI, "네 반가워요", ""),
        Turn(Role.USER, "남은 질문", ""),
    ]
    assert said(usable(turns)) == said(dialogue("안녕 반가워", "네 반가워요"))
    assert usable([Turn(Role.USER, "혼잣말", "")]) == ()


def test_csv_and_jsonl_are_read(tmp_path: Path) -> None:
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text(
        "\ufeffQ,A,label\n안녕,반가워요,0\n,빈 질문,0\n잘 자,좋은 꿈 꿔요,2\n", encoding="utf-8"
    )
    expected = [dialogue("안녕", "반가워요"), dialogue("잘 자", "좋은 꿈 꿔요")]
    assert said(read_dialogues(csv_file)) == said(expected)

    chat = tmp_path / "chat.jsonl"
    records = [
        {
            "messages": [
                {"role": "user", "content": "뭐 해?"},
                {"role": "assistant", "content": "쉬어요"},
            ]
        },
        {
            "turns": [
                {"role": "user", "text": "a"},
                {"role": "bot", "text": "b"},
                {"role": "human", "text": "c"},
            ]
        },
    ]
    chat.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n")
    assert said(read_dialogues(chat)) == said([dialogue("뭐 해?", "쉬어요"), dialogue("a", "b")])

    (tmp_path / "bad.jsonl").write_text('{"turns": [{"role": "robot", "text": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*robot"):
        read_dialogues(tmp_path / "bad.jsonl")
    (tmp_path / "no_q.csv").write_text("question,answer\nx,y\n")
    with pytest.raises(DataError, match="Q and A"):
        read_dialogues(tmp_path / "no_q.csv")
    with pytest.raises(DataError, match="no such file"):
        read_dialogues(tmp_path / "missing.csv")


def test_the_held_out_split_is_seeded_and_never_empty(tokenizer: KoGPT2Tokenizer) -> None:
    builder = ExampleBuilder(tokenizer, PERSONA, tokenizer.eos_id, max_tokens=256)
    examples = [builder.build(dialogue(f"질문 {i}", f"답 {i}")) for i in range(10)]
    train_a, held_a = split_held_out([e for e in examples if e], 0.01, seed=3, max_held_out=5)
    train_b, held_b = split_held_out([e for e in examples if e], 0.01, seed=3, max_held_out=5)
    assert (train_a, held_a) == (train_b, held_b) and len(held_a) == 1 and len(train_a) == 9


# Training


def tiny_config(data: Path, base: Path, out: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "from_scratch": True,
        "layers": 1,
        "dim": 32,
        "heads": 1,
        "context": 128,
        "batch_size": 8,
        "epochs": 1,
        "warmup_steps": 1,
        "device": "cpu",
    }
    values.update(overrides)
    return TrainConfig(data=data, base=str(base), out=out, **values)  # type: ignore[arg-type]


def test_training_resumes_from_its_checkpoint(tmp_path: Path, kogpt2_dir: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", 60)
    out = tmp_path / "model"
    lines: list[str] = []
    first = train(tiny_config(data, kogpt2_dir, out, max_steps=2), lines.append)
    assert first.stop_reason == "--max-steps 2 reached" and not first.finished
    state = torch.load(out / CHECKPOINT / TRAINER_STATE, weights_only=True)
    assert state["position"]["step"] == 2

    resumed = Trainer(tiny_config(data, kogpt2_dir, out, max_steps=4), lines.append)
    assert resumed.position.step == 2 and any("resuming" in line for line in lines)
    report = resumed.run()
    state = torch.load(out / CHECKPOINT / TRAINER_STATE, weights_only=True)
    assert state["position"]["step"] == 4
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {4}  # Adam's too
    assert [entry["step"] for entry in report.held_out_loss] == [0, 2, 4]

    with pytest.raises(ValueError, match="--no-resume"):
        Trainer(tiny_config(data, kogpt2_dir, out, batch_size=4))
    fresh = Trainer(tiny_config(data, kogpt2_dir, out, batch_size=4, resume=False), lines.append)
    assert fresh.position.step == 0


def test_kobot_train_command(
    tmp_path: Path, kogpt2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", 20)
    out = tmp_path / "model"
    common = ["train", "--base", str(kogpt2_dir), "--out", str(out), "--from-scratch"]
    small = [
        "--layers",
        "1",
        "--dim",
        "32",
        "--context",
        "128",
        "--max-steps",
        "1",
        "--device",
        "cpu",
    ]
    assert cli_main([*common, "--data", str(data), *small]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 1 and len(report["held_out_loss"]) == 2
    assert "held-out loss" in capsys.readouterr().out

    (tmp_path / "empty.csv").write_text("Q,A\n")
    assert cli_main([*common, "--data", str(tmp_path / "empty.csv"), *small, "--no-resume"]) == 2
    assert "no usable dialogues" in capsys.readouterr().err


@pytest.mark.slow
async def test_demo_from_scratch_on_chatbot_data_lowers_held_out_loss(
    tmp_path: Path, kogpt2_dir: Path
) -> None:
    """About a minute on two busy cores: 2,000 ChatbotData pairs, a 1-layer 64-wide GPT-2."""
    out = tmp_path / "chatbot-tiny"
    config = tiny_config(
        CHATBOT_CSV,
        kogpt2_dir,
        out,
        dim=64,
        context=1024,
        batch_size=32,
        lr=3e-3,
        warmup_steps=5,
        limit=2000,
        max_held_out=100,
        max_minutes=1.5,
    )
    report = train(config, lambda line: None)
    assert report.held_out_examples == 100 and report.train_examples >= 1800
    untrained, trained = report.first_loss, report.last_loss
    assert untrained > 10.0  # about ln(51,200): the untrained model knows nothing
    assert trained < untrained - 2.0, report.held_out_loss
    steps = int(report.held_out_loss[-1]["step"])
    print(f"held-out loss {untrained:.3f} → {trained:.3f} after {steps} steps")

    backend = engine_backend(out)  # the folder KOBOT_MODEL loads, as the factory ships it
    settings = make_settings(out, tmp_path, temperature=0.0)
    manager = await build_dialogue_manager(settings, backend)
    try:
        reply = await manager.handle(message("오늘 너무 피곤해"))
    finally:
        await manager.close()
    assert reply.kind is ReplyKind.CHAT and reply.text.strip()
