"""Fixtures for every test: the real KoGPT2 tokenizer and a tiny random GPT-2 built from it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.shared_data import shared_dir

SHARED = shared_dir()
KOGPT2_DIR = Path(os.environ.get("TEST_KOGPT2_DIR", SHARED / "kogpt2-base-v2"))
CHATBOT_CSV = Path(os.environ.get("TEST_CHATBOT_CSV", SHARED / "chatbot-data" / "ChatbotData.csv"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tiny test model is fastest on one thread, and CI machines have two busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def kogpt2_dir() -> Path:
    if not (KOGPT2_DIR / "tokenizer.json").is_file():
        pytest.fail(f"KoGPT2 tokenizer not found at {KOGPT2_DIR} (set TEST_KOGPT2_DIR)")
    return KOGPT2_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(kogpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide GPT-2 with random weights and the real KoGPT2 tokenizer (1,024 window)."""
    from core.generation.model_files import create_random_model

    return create_random_model(tmp_path_factory.mktemp("tiny-kogpt2"), kogpt2_dir)


@pytest.fixture(autouse=True)
def _clean_kobot_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never see the developer's KOBOT_* variables or `.env`."""
    for name in list(os.environ):
        if name.upper().startswith("KOBOT_"):
            monkeypatch.delenv(name, raising=False)
    yield
