"""Where the milliseconds of one engine decode step go: torch.profiler, by op.

Builds the kogpt2-base-v2-sized model (random weights, the dtype `auto` picks), prefills
`--batch` sequences of `--prompt` tokens into a KV arena, then profiles `--steps` decode steps
(forward pass, LM head, sampling with kobot's defaults) and prints the top ops by self CPU time
and the wall time per step.

    python bench/profile_step.py --batch 32 --prompt 64 --steps 10 [--dtype bf16] [--quant int8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve import SHARED, build_model, resolve_dtype
from core.dialogue.services import sampling_params
from core.generation.engine.forward import GPT2Forward, SeqChunk
from core.generation.engine.kv import KVArena
from core.generation.engine.sampling import SamplerState, choose_tokens
from core.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quant", choices=["auto", "off", "int8"], default="auto")
    parser.add_argument("--kernels", choices=["auto", "off"], default="auto")
    parser.add_argument("--kv-dtype", choices=["auto", "model", "int8"], default="auto")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--no-profile", action="store_true", help="only the wall times")
    parser.add_argument("--shapes", action="store_true", help="one row per op and input shape")
    parser.add_argument("--decode-pool", choices=["off", "on"], default="on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, "cpu")
    model = build_model(SHARED / "kogpt2-base-v2", "cpu", dtype, 0)
    forward = GPT2Forward(model, quant=args.quant, kernels=args.kernels, kv_dtype=args.kv_dtype)
    if args.decode_pool == "on":  # batched decode attention (the engine default)
        forward.decode_slots.max_bytes = 1 << 30
    storage = forward.kv_storage
    arena = KVArena(forward.dims, 1024 * 1024 * 1024, "cpu", storage.dtype, storage.row)
    capacity = args.prompt + args.steps + 40
    blocks = [arena.allocate(capacity) for _ in range(args.batch)]
    views = [arena.view(block) for block in blocks if block is not None]
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(10, 51200, (args.prompt,), generator=generator).tolist() for _ in views
    ]
    params = sampling_params(Settings(_env_file=None))  # type: ignore[call-arg]
    states = [SamplerState(params, list(p), len(p)) for p in prompts]
    first = [SeqChunk(v, 0, p) for v, p in zip(views, prompts, strict=True)]
    forward.last_hidden(first, arena.buffer)

    def step() -> None:
        pairs = zip(views, states, strict=True)
        chunks = [SeqChunk(v, len(s.ids) - 1, s.ids[-1:]) for v, s in pairs]
        logits = forward.lm_head(forward.last_hidden(chunks, arena.buffer))
        tokens = choose_tokens(logits, states, forward.top_k, forward.fused_sample)
        for state, token in zip(states, tokens, strict=True):
            state.append(token)

    with torch.inference_mode():
        for state in states:  # the first new token of each (the prefill's)
            state.append(int(torch.randint(10, 51200, (1,), generator=generator)))
        for _ in range(5):
            step()
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        wall = statistics.median(times)
        if args.no_profile:
            prof = None
        else:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
                for _ in range(args.steps):
                    step()
    print(
        f"batch {args.batch}, {args.prompt}-token prompts, {forward.dtype}, quant "
        f"{forward.quant}, KV {forward.kv_storage.dtype}: "
        f"{1000 * wall:.1f} ms per decode step (unprofiled median; min {1000 * min(times):.1f}), "
        f"{os.getloadavg()[0]:.2f} load, OMP_WAIT_POLICY {os.getenv('OMP_WAIT_POLICY', 'unset')}"
    )
    if prof is not None:
        table = prof.key_averages(group_by_input_shape=args.shapes)
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
