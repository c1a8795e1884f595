"""Fixtures for the generation tests: the real tokenizer and a prompt on the tiny random GPT-2."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.generation.tokenizer import KoGPT2Tokenizer, load_tokenizer

PROMPT = "다음은 친절한 AI 챗봇과 사용자의 대화입니다.\nUser: 안녕하세요\nAI:"


@pytest.fixture(scope="session")
def tokenizer(kogpt2_dir: Path) -> KoGPT2Tokenizer:
    """The real KoGPT2 tokenizer, loaded from the shared folder as from the hub (no config)."""
    return load_tokenizer(str(kogpt2_dir))


@pytest.fixture
def prompt_ids(tokenizer: KoGPT2Tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.encode_text(PROMPT))
