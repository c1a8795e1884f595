"""Fixtures for the generation tests: the real tokenizer and a prompt on the tiny random GPT-2."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import GPT2LMHeadModel

from core.generation.tokenizer import KoGPT2Tokenizer, load_tokenizer
from tests.conftest import CHATBOT_CSV
from tests.support.trained import Vocabulary, held_out, train_tiny

PROMPT = "다음은 친절한 AI 챗봇과 사용자의 대화입니다.\nUser: 안녕하세요\nAI:"


@pytest.fixture(scope="session")
def tokenizer(kogpt2_dir: Path) -> KoGPT2Tokenizer:
    """The real KoGPT2 tokenizer, loaded from the shared folder as from the hub (no config)."""
    return load_tokenizer(str(kogpt2_dir))


@pytest.fixture
def prompt_ids(tokenizer: KoGPT2Tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.encode_text(PROMPT))


@pytest.fixture(scope="session")
def trained(tokenizer: KoGPT2Tokenizer) -> tuple[GPT2LMHeadModel, Vocabulary]:
    """A tiny GPT-2 trained briefly on the chat data, and its vocabulary (`trained.py`)."""
    return train_tiny(tokenizer, CHATBOT_CSV)


@pytest.fixture(scope="session")
def trained_model(trained: tuple[GPT2LMHeadModel, Vocabulary]) -> GPT2LMHeadModel:
    return trained[0]


@pytest.fixture(scope="session")
def held_out_prompts(
    tokenizer: KoGPT2Tokenizer, trained: tuple[GPT2LMHeadModel, Vocabulary]
) -> list[list[int]]:
    """Chat prompts the trained model has not seen, in its vocabulary."""
    return held_out(tokenizer, CHATBOT_CSV, trained[1])
