"""KoGPT2's tokenizer for prompts typed by users: look-alikes of control tokens stay plain text.

KoGPT2 (`skt/kogpt2-base-v2`) has 375 added tokens, all flagged "special" in `tokenizer.json`:
ids 0-108 are control tokens (`<s>`, `</s>`, `<usr>`, `<pad>`, `<sys>`, `<unk>`, `<mask>`, `<d>`,
`</d>`, `<unused0>`…`<unused99>`) and ids 109-374 are emoticons (`:)`) and emoji. A user who types
`</s>` must not end the prompt, so `encode_text` uses a copy of the tokenizer without the control
tokens (their text goes through BPE like any other text), while emoticons and emoji keep their ids.
Decoding drops only control ids: `skip_special_tokens=True` would also drop every emoji.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import get_session
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from core.generation.errors import ModelLoadError, describe

__all__ = [
    "DEFAULT_MODEL",
    "KOGPT2_SPECIAL_TOKENS",
    "KoGPT2Tokenizer",
    "ModelLoadError",
    "ModelSource",
    "load_tokenizer",
    "resolve_model_source",
    "tokenizer_from_source",
]

KOGPT2_SPECIAL_TOKENS: dict[str, str] = {
    "bos_token": "</s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}
DEFAULT_MODEL = "skt/kogpt2-base-v2"
MODEL_VARIABLE = "KOBOT_MODEL"
_CONTROL_TOKEN = re.compile(r"<[^<>\s]+>")
_ENCODE_CACHE_SIZE = 4096
_CACHE_MAX_CHARS = 1024
HUB_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model comes from: `name` is what `from_pretrained` gets."""

    model: str
    name: str
    is_folder: bool
    local_files_only: bool = False


def looks_like_path(model: str) -> bool:
    """True for names that can only be a folder (a hub id is `name` or `owner/name`)."""
    return (
        model.startswith(("/", ".", "~"))
        or "\\" in model
        or model.count("/") > 1
        or re.match(r"^[A-Za-z]:", model) is not None
    )


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One quick request to the hub (proxy settings honoured), so that an offline start fails in
    seconds instead of minutes of download retries. False when HF_HUB_OFFLINE is set."""
    if hf_constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(hf_constants.ENDPOINT, timeout=timeout_s)
    except Exception:
        return False
    return True


def resolve_model_source(model: str) -> ModelSource:
    """The local folder for `model` if there is one, else the hub id (cache only when the hub
    cannot be reached); a name that can only be a folder but does not exist fails."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return ModelSource(model, str(folder), is_folder=True)
    if looks_like_path(model):
        raise ModelLoadError(
            f"{MODEL_VARIABLE}: folder {model!r} does not exist. Set {MODEL_VARIABLE} to a folder "
            "holding config.json, tokenizer.json and the weights, or to a Hugging Face model id "
            f"such as {DEFAULT_MODEL}."
        )
    return ModelSource(model, model, is_folder=False, local_files_only=not hub_reachable())


def load_error(source: ModelSource, error: BaseException) -> ModelLoadError:
    """A ModelLoadError that says what failed and how to set KOBOT_MODEL."""
    reason = describe(error)
    if source.is_folder:
        return ModelLoadError(
            f"{MODEL_VARIABLE}: could not load the folder {source.name!r} ({reason}). It must hold "
            "config.json, tokenizer.json and the weights (the save_pretrained format)."
        )
    where = (
        "the Hugging Face hub is unreachable (or HF_HUB_OFFLINE is set) and it is not in the "
        "local cache"
        if source.local_files_only
        else "not found on the Hugging Face hub"
    )
    return ModelLoadError(
        f"{MODEL_VARIABLE}: could not load {source.model!r}: {where} ({reason}). Without network "
        f"access, set {MODEL_VARIABLE} to a local folder holding config.json, tokenizer.json and "
        "the weights (model.safetensors or pytorch_model.bin), or start once while online so the "
        "model is downloaded into the Hugging Face cache."
    )


def control_token_ids(hf: PreTrainedTokenizerFast) -> frozenset[int]:
    """Ids of `<…>` added tokens and of the declared special tokens (KoGPT2: 0-108)."""
    added = hf.backend_tokenizer.get_added_tokens_decoder()
    ids = {i for i, token in added.items() if _CONTROL_TOKEN.fullmatch(token.content)}
    ids.update(int(i) for i in hf.all_special_ids)
    return frozenset(ids)


def plain_text_tokenizer(hf: PreTrainedTokenizerFast, control_ids: Iterable[int]) -> Tokenizer:
    """A copy of `hf`'s Rust tokenizer whose control tokens are no longer matched in text."""
    dropped = set(control_ids)
    spec = json.loads(hf.backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] not in dropped]
    spec["post_processor"] = None
    return Tokenizer.from_str(json.dumps(spec))


class KoGPT2Tokenizer:
    """Encodes user text safely (a `TokenCounter`) and decodes replies without control tokens."""

    def __init__(self, hf: PreTrainedTokenizerFast, cache_size: int = _ENCODE_CACHE_SIZE) -> None:
        apply_missing_special_tokens(hf)
        self.hf = hf
        self.control_ids = control_token_ids(hf)
        self._plain = plain_text_tokenizer(hf, self.control_ids)
        self._size = self._plain.get_vocab_size(with_added_tokens=True)
        self._cached = lru_cache(maxsize=cache_size)(self._encode_uncached)

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.hf.pad_token_id)

    @property
    def unk_id(self) -> int:
        return int(self.hf.unk_token_id)

    @property
    def n_special(self) -> int:
        """Ids below this are control tokens (`<s>`…`<unused99>`: 109 for KoGPT2)."""
        return max(self.control_ids, default=-1) + 1

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` with no BOS/EOS added; `</s>`, `<usr>`… typed by users stay plain text.

        Only a character the vocabulary lacks becomes a control id: `<unk>` (5).
        """
        if len(text) > _CACHE_MAX_CHARS:
            return list(self._encode_uncached(text))
        return list(self._cached(text))

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self._plain.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, leaving out control tokens (emoticons and emoji are kept)."""
        kept = [i for i in map(int, ids) if 0 <= i < self._size and i not in self.control_ids]
        return str(self._plain.decode(kept, skip_special_tokens=False))


def apply_missing_special_tokens(hf: PreTrainedTokenizerFast) -> None:
    """Set KoGPT2's bos/eos/unk/pad/mask where the folder's config does not name them."""
    missing = {k: v for k, v in KOGPT2_SPECIAL_TOKENS.items() if getattr(hf, k, None) is None}
    if missing:
        hf.add_special_tokens(missing)  # type: ignore[arg-type]


def load_tokenizer(model: str) -> KoGPT2Tokenizer:
    """KoGPT2's tokenizer from a hub id or a local folder; ModelLoadError when unavailable."""
    return tokenizer_from_source(resolve_model_source(model))


def tokenizer_from_source(source: ModelSource) -> KoGPT2Tokenizer:
    """The tokenizer of a resolved source.

    `PreTrainedTokenizerFast` reads `tokenizer.json` as is. (`AutoTokenizer` is wrong here: for a
    folder without `tokenizer_config.json`, like the hub's, transformers 5 picks the byte-level
    `GPT2Tokenizer` from `config.json` and tokenizes Korean into garbage.)
    """
    try:
        hf = PreTrainedTokenizerFast.from_pretrained(
            source.name, local_files_only=source.local_files_only
        )
    except Exception as error:
        raise load_error(source, error) from error
    return KoGPT2Tokenizer(hf)
