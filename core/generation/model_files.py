"""Loading KoGPT2's tokenizer, and creating fresh (untrained) models in the same folder format."""

from __future__ import annotations

from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from core.generation.tokenizer import KOGPT2_SPECIAL_TOKENS


def load_tokenizer_file(tokenizer_file: str | Path) -> PreTrainedTokenizerFast:
    """KoGPT2's tokenizer from a bare `tokenizer.json`, with the model card's special tokens."""
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **KOGPT2_SPECIAL_TOKENS)


def create_random_model(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a GPT-2 with random weights and KoGPT2's tokenizer into `out_dir`.

    `tokenizer_dir` holds `tokenizer.json` (and optionally `config.json`, whose vocabulary size and
    special-token ids are kept). The folder loads like a Hugging Face model id.
    """
    import torch

    tokenizer_dir = Path(tokenizer_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer_file(tokenizer_dir / "tokenizer.json")
    config = GPT2Config(
        vocab_size=len(tokenizer) if len(tokenizer) > 51200 else 51200,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
