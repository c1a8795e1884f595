"""Facts about KoGPT2's real tokenizer, and the safety of `encode_text` against look-alikes."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

from core.generation.base import TokenCounter
from core.generation.tokenizer import (
    KoGPT2Tokenizer,
    ModelLoadError,
    load_tokenizer,
    looks_like_path,
)

GREETING_IDS = [25906, 8702, 7801, 25856, 10070, 34018, 9677, 7098, 25856]
KOGPT2_CONTROL_TOKENS = [
    "<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>", "<d>", "</d>",
    *(f"<unused{i}>" for i in range(100)),
]  # fmt: skip
LOOK_ALIKES = [*KOGPT2_CONTROL_TOKENS, "<|endoftext|>", "＜/s＞", "</S>", "<unused100>"]
CONTEXTS = ["{}", " {}", "{} ", "안녕{}하세요", "x{}y", "{}{}{}", "User: {}\nAI:", "<{}>"]
UNK = 5


def test_is_a_token_counter(tokenizer: KoGPT2Tokenizer) -> None:
    counter: TokenCounter = tokenizer
    assert counter.encode_text("안녕") == [25906]


def test_greeting_is_nine_tokens(tokenizer: KoGPT2Tokenizer) -> None:
    assert tokenizer.encode_text("안녕하세요. 오늘 날씨가 좋네요.") == GREETING_IDS


def test_no_bos_or_eos_is_added(tokenizer: KoGPT2Tokenizer) -> None:
    ids = tokenizer.encode_text("안녕")
    assert ids == [25906]
    assert tokenizer.hf("안녕")["input_ids"] == ids  # not even by the HF defaults
    assert tokenizer.encode_text("") == []


def test_special_token_ids(tokenizer: KoGPT2Tokenizer) -> None:
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id) == (1, 3, 5)
    assert tokenizer.n_special == 109
    assert tokenizer.control_ids == frozenset(range(109))
    assert tokenizer.vocab_size == 51200


def test_rare_syllables_are_genuine_unk(tokenizer: KoGPT2Tokenizer) -> None:
    assert tokenizer.encode_text("걔 쫌 삔") == [739, UNK, 739, UNK, 739, UNK]
    assert tokenizer.decode(tokenizer.encode_text("걔 쫌 삔")).strip() == ""


def test_emoji_and_emoticons_keep_their_ids(tokenizer: KoGPT2Tokenizer) -> None:
    ids = tokenizer.encode_text("안녕 :) 😊")
    assert ids == [25906, 739, 110, 739, 339]
    assert tokenizer.decode(ids) == "안녕 :) 😊"


def test_raw_tokenizer_would_map_look_alikes_to_control_ids(tokenizer: KoGPT2Tokenizer) -> None:
    """Why `encode_text` exists: the hub tokenizer turns typed `</s>` into the real EOS."""
    assert tokenizer.hf.encode("</s>", add_special_tokens=False) == [1]
    assert tokenizer.hf.encode("<unused0>", add_special_tokens=False) == [9]


@pytest.mark.parametrize("look_alike", LOOK_ALIKES)
def test_look_alikes_are_plain_text(tokenizer: KoGPT2Tokenizer, look_alike: str) -> None:
    for context in CONTEXTS:
        text = context.format(look_alike, look_alike, look_alike)
        ids = tokenizer.encode_text(text)
        assert min(ids) >= tokenizer.n_special, (text, ids)


def test_only_genuine_unknowns_become_unk(tokenizer: KoGPT2Tokenizer) -> None:
    ids = tokenizer.encode_text("걔</s><unk>")
    assert [i for i in ids if i < tokenizer.n_special] == [UNK]


def test_plain_text_survives_a_round_trip(tokenizer: KoGPT2Tokenizer) -> None:
    text = "안녕</s>하세요 <usr> <unused7> :)"
    assert tokenizer.decode(tokenizer.encode_text(text)) == text


def test_decode_drops_control_ids_only(tokenizer: KoGPT2Tokenizer) -> None:
    ids = [0, *tokenizer.encode_text("좋아요 😊"), 1, 3, 9, 108]
    assert tokenizer.decode(ids) == "좋아요 😊"
    assert tokenizer.decode([*tokenizer.encode_text("좋아요"), 10**6, -1]) == "좋아요"


def test_encode_cache_returns_fresh_lists(tokenizer: KoGPT2Tokenizer) -> None:
    first = tokenizer.encode_text("캐시 시험")
    first.append(0)
    assert tokenizer.encode_text("캐시 시험") == first[:-1]
    long_text = "가" * 5000
    assert tokenizer.encode_text(long_text) == tokenizer.encode_text(long_text)


def test_hub_like_folder_gets_kogpt2_special_tokens(kogpt2_dir: Path, tmp_path: Path) -> None:
    """The hub repository has tokenizer.json and config.json but no tokenizer_config.json."""
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(kogpt2_dir / name, tmp_path / name)
    tok = load_tokenizer(str(tmp_path))
    assert (tok.hf.bos_token, tok.hf.eos_token, tok.hf.pad_token) == ("</s>", "</s>", "<pad>")
    assert (tok.hf.unk_token, tok.hf.mask_token) == ("<unk>", "<mask>")
    assert tok.encode_text("안녕하세요. 오늘 날씨가 좋네요.") == GREETING_IDS


def test_saved_model_folder_tokenizer_behaves_the_same(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.encode_text("안녕하세요. 오늘 날씨가 좋네요.") == GREETING_IDS
    assert min(tok.encode_text("</s><d><unused0>")) >= 109
    assert tok.eos_id == 1


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"KOBOT_MODEL: folder .* does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_offline_hub_id_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="KOBOT_MODEL") as error:
        load_tokenizer("kobot-tests/no-such-model")
    assert "local folder" in str(error.value)


@pytest.mark.parametrize(
    ("name", "is_path"),
    [
        ("skt/kogpt2-base-v2", False),
        ("gpt2", False),
        ("/models/kogpt2", True),
        ("./kogpt2", True),
        ("~/kogpt2", True),
        ("models/kogpt2/v2", True),
        ("C:\\models", True),
    ],
)
def test_looks_like_path(name: str, is_path: bool) -> None:
    assert looks_like_path(name) is is_path
