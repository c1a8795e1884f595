"""ONNX Runtime against torch on the CPU, at the kogpt2-base-v2 size (random weights, fp32).

Measures, for the same weights: the prefill of a prompt (one forward over it, KV cache out, only
the last position's logits, as `generate` does) and a decode step (one token after that prompt,
with its KV cache), then a whole greedy reply (32 new tokens) through each backend's decode loop.
Prints the medians and the ratios torch / ONNX (above 1 means ONNX is faster).

    python bench/onnx_vs_torch.py [--config ../shared/kogpt2-base-v2] [--prompts 256 900]
                                  [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared_data import shared_dir
from core.generation.base import SamplingParams
from core.generation.onnx.decoder import OnnxSession, decode_ids
from core.generation.onnx.export import export_model
from core.generation.stopping import RunControl, StopRule

SHARED = shared_dir()
DECODE_STEPS = 16
REPLY_TOKENS = 32


def paired_ms(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median times of two actions run alternately (a shared CPU's load hits both alike)."""
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for action, kept in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            action()
            kept.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def torch_prefill(model: GPT2LMHeadModel, ids: torch.Tensor) -> DynamicCache:
    with torch.inference_mode():
        out = model(ids, DynamicCache(), use_cache=True, logits_to_keep=1)
    return cache_of(out)


def cache_of(output: object) -> DynamicCache:
    """The KV cache of a forward (`cache` in transformers 5.2x, `past_key_values` before)."""
    cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    assert isinstance(cache, DynamicCache)
    return cache


def torch_decode(model: GPT2LMHeadModel, ids: torch.Tensor) -> Callable[[], None]:
    """DECODE_STEPS decode steps after the prompt (its cache cropped back after each run)."""
    cache = torch_prefill(model, ids)
    token = ids[:, -1:]

    def steps() -> None:
        with torch.inference_mode():
            for _ in range(DECODE_STEPS):
                model(token, cache, use_cache=True)
        cache.crop(-DECODE_STEPS)

    return steps


def onnx_decode(decoder: OnnxSession, prompt: list[int]) -> Callable[[], None]:
    """DECODE_STEPS decode steps after the prompt."""
    _, past = decoder.prefill(prompt)

    def steps() -> None:
        run_past = past
        for _ in range(DECODE_STEPS):
            _, run_past = decoder.step(prompt[-1:], run_past)

    return steps


def reply_ms(
    model: GPT2LMHeadModel, decoder: OnnxSession, prompt: list[int], repeats: int
) -> tuple[float, float]:
    """A greedy 32-token reply: transformers' `generate` vs the ONNX backend's loop."""
    params = SamplingParams(max_new_tokens=REPLY_TOKENS, do_sample=False, temperature=0.0)
    ids = torch.tensor([prompt])

    def with_torch() -> None:
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=REPLY_TOKENS,
                min_new_tokens=REPLY_TOKENS,
                do_sample=False,
                repetition_penalty=params.repetition_penalty,
                no_repeat_ngram_size=params.no_repeat_ngram_size,
                pad_token_id=3,
            )

    def with_onnx() -> None:
        stopper = StopRule(lambda _: "", (), RunControl(600))
        decode_ids(decoder, prompt, params, stopper, eos_id=-1)

    return paired_ms(with_torch, with_onnx, repeats)


def line(label: str, torch_ms: float, onnx_ms: float) -> None:
    print(
        f"{label:<34} torch {torch_ms:8.1f} ms   onnx {onnx_ms:8.1f} ms   "
        f"torch/onnx {torch_ms / onnx_ms:4.2f}×"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=SHARED / "kogpt2-base-v2")
    parser.add_argument("--prompts", type=int, nargs="+", default=[256, 900])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="threads for each (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPT2Config.from_pretrained(args.config)
    model = GPT2LMHeadModel(config).eval()
    print(
        f"kogpt2-base-v2 size, random weights, fp32, {torch.get_num_threads()} threads each, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as folder:
        report = export_model(model, folder, source_model="random kogpt2-base-v2")
        print(f"export: {report.seconds:.1f} s, max |logit diff| {report.max_abs_diff:.2e}")
        decoder = OnnxSession(folder, threads=torch.get_num_threads())
        for length in args.prompts:
            prompt = torch.randint(1000, config.vocab_size, (1, length))
            as_list = prompt[0].tolist()
            prefill = paired_ms(
                partial(torch_prefill, model, prompt),
                partial(decoder.prefill, as_list),
                args.repeats,
            )
            line(f"prefill {length} tokens", *prefill)
            decode = paired_ms(
                torch_decode(model, prompt), onnx_decode(decoder, as_list), args.repeats
            )
            line(f"decode step after {length} tokens", *(t / DECODE_STEPS for t in decode))
            reply_torch, reply_onnx = reply_ms(model, decoder, as_list, max(1, args.repeats // 2))
            line(f"greedy {REPLY_TOKENS}-token reply ({length})", reply_torch, reply_onnx)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other work on this CPU skews both)")


if __name__ == "__main__":
    main()
