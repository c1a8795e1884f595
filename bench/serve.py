"""Many users chatting at once: the naive loop against kobot's engine, in one process.

The model is kogpt2-base-v2's size (config from ../shared/kogpt2-base-v2, random weights; fp32
on the CPU, fp16 on CUDA unless --dtype says otherwise). N users each hold a conversation from
../shared/chatbot-data/ChatbotData.csv: a prior history of random length, then M turns, each
sent as soon as the previous reply arrives. Prompts are built as the dialogue manager builds
them (PromptBuilder, trimmed to the window down to the low-water mark, context start kept).
The AI turn stored in the history is the data set's answer, so both arms see the same prompts
(random weights produce noise).

- naive: one Hugging Face `model.generate` per message, in arrival order, on one worker thread,
  with the whole history each time (the KoGPT2 model card's way).
- engine: kobot's `Engine` (continuous batching, chunked prefill, per-conversation KV reuse).

Both arms sample with kobot's default settings and generate exactly --max-new-tokens per reply
(EOS banned, stop strings off), so tokens/s compare like for like. Both run with the same torch
threads and OMP_WAIT_POLICY=PASSIVE (unless set otherwise): on a CPU shared with other processes,
OpenMP threads that spin at every join steal the very cores they wait for (both arms measured
several times slower with spinning under load).

    python bench/serve.py --users 32 --turns 3 [--history 0-20] [--device cuda] [--threads 1]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see above)

import argparse
import asyncio
import contextlib
import csv
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared_data import shared_dir
from core.dialogue import ContextStarts, sampling_params
from core.generation.base import SamplingParams
from core.generation.engine import Engine, EngineConfig, EngineRequest
from core.generation.gpt2_forward import GPT2Forward
from core.generation.local import generation_config
from core.generation.tokenizer import KoGPT2Tokenizer, load_tokenizer
from core.messages import ConversationKey, Role, Turn
from core.prompt import PromptBuilder
from core.settings import Settings
from core.trimming import token_budget

SHARED = shared_dir()
MB = 1024 * 1024

Generate = Callable[[str, tuple[int, ...]], Awaitable["Reply"]]


@dataclass(frozen=True)
class Reply:
    new_tokens: int
    latency_s: float
    first_token_s: float


@dataclass
class ArmResult:
    name: str
    wall_s: float
    replies: list[Reply]
    prompt_tokens: list[int]
    peak_rss_mb: float
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return sum(r.new_tokens for r in self.replies) / self.wall_s

    def latency(self, q: float) -> float:
        return quantile([r.latency_s for r in self.replies], q)

    def ttft(self, q: float) -> float:
        return quantile([r.first_token_s for r in self.replies], q)


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(q * 100) - 1]


# --- workload -----------------------------------------------------------------------------------


def load_pairs(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return [(row["Q"], row["A"]) for row in csv.DictReader(handle)]


@dataclass
class User:
    """One conversation: its history and the messages it will send."""

    key: ConversationKey
    history: list[Turn]
    messages: list[str]
    answers: list[str]


def make_users(
    pairs: list[tuple[str, str]], n_users: int, turns: int, history: tuple[int, int], seed: int
) -> list[User]:
    """Users with 1–3-sentence messages and 1–2-sentence answers from the data set, and a prior
    history of `history[0]`…`history[1]` exchanges."""
    rng = random.Random(seed)

    def message() -> str:
        return " ".join(rng.choice(pairs)[0] for _ in range(rng.randint(1, 3)))

    def answer() -> str:
        return " ".join(rng.choice(pairs)[1] for _ in range(rng.randint(1, 2)))

    users = []
    for index in range(n_users):
        user_id = f"user{index}"
        prior: list[Turn] = []
        for _ in range(rng.randint(*history)):
            prior += [Turn(Role.USER, message(), user_id), Turn(Role.AI, answer(), user_id)]
        key = ConversationKey("bench", user_id, user_id)
        users.append(
            User(key, prior, [message() for _ in range(turns)], [answer() for _ in range(turns)])
        )
    return users


class Prompts:
    """Prompt ids as the dialogue manager makes them (history window, trimming, context start)."""

    def __init__(self, tokenizer: KoGPT2Tokenizer, settings: Settings, n_positions: int) -> None:
        self.builder = PromptBuilder(tokenizer)
        self.settings = settings
        self.budget = token_budget(n_positions, settings.max_new_tokens)
        self.low_water = int(self.budget * settings.trim_low_water)
        self.starts = ContextStarts()

    def build(self, user: User, text: str) -> tuple[int, ...]:
        recent = user.history[-self.settings.history_turns :]
        recent = self.starts.since(user.key, recent)
        prompt = self.builder.build(
            self.settings.persona, recent, text, self.budget, self.low_water
        )
        self.starts.update(user.key, recent, prompt)
        return prompt.prompt_ids


async def run_users(
    users: list[User], prompts: Prompts, generate: Generate
) -> tuple[float, list[Reply], list[int]]:
    """Every user sends its turns one after the other; all users at once."""
    replies: list[Reply] = []
    lengths: list[int] = []

    async def converse(user: User) -> None:
        for text, answer in zip(user.messages, user.answers, strict=True):
            ids = prompts.build(user, text)
            lengths.append(len(ids))
            replies.append(await generate(user.key.as_id(), ids))
            user.history += [
                Turn(Role.USER, text, user.key.user_id),
                Turn(Role.AI, answer, user.key.user_id),
            ]

    started = time.perf_counter()
    await asyncio.gather(*(converse(user) for user in users))
    return time.perf_counter() - started, replies, lengths


# --- the two arms ------------------------------------------------------------------------------


class FirstStep(LogitsProcessor):
    """Records when the first new token's scores exist (the end of the prefill)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.at is None:
            if scores.is_cuda:
                torch.cuda.synchronize(scores.device)
            self.at = time.perf_counter()
        return scores


class NaiveArm:
    """One `model.generate` per message, in arrival order, on one worker thread."""

    def __init__(
        self,
        model: GPT2LMHeadModel,
        tokenizer: KoGPT2Tokenizer,
        params: SamplingParams,
        device: str,
    ) -> None:
        self.model = model
        self.config = generation_config(params, tokenizer)
        self.config.min_new_tokens = params.max_new_tokens
        self.device = device
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="naive")

    def _run(self, ids: tuple[int, ...], arrived: float) -> Reply:
        first = FirstStep()
        input_ids = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self.config,
                logits_processor=LogitsProcessorList([first]),
            )
        done = time.perf_counter()
        return Reply(output.shape[1] - len(ids), done - arrived, (first.at or done) - arrived)

    async def generate(self, key: str, ids: tuple[int, ...]) -> Reply:
        arrived = time.perf_counter()
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self._run, ids, arrived
        )


class EngineArm:
    """kobot's engine: every user's request joins the running batch."""

    def __init__(self, engine: Engine, params: SamplingParams, eos_id: int) -> None:
        self.engine = engine
        self.params = params
        self.eos_id = eos_id

    async def generate(self, key: str, ids: tuple[int, ...]) -> Reply:
        request = EngineRequest(
            ids,
            self.params,
            cache_key=key,
            eos_id=self.eos_id,
            min_new_tokens=self.params.max_new_tokens,
        )
        output = await self.engine.generate(request)
        return Reply(len(output.ids), output.total_s, output.first_token_s or output.total_s)


# --- measuring ---------------------------------------------------------------------------------


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # Linux: reset VmHWM, the peak RSS
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(config_dir: Path, device: str, dtype: torch.dtype, seed: int) -> GPT2LMHeadModel:
    config = GPT2Config.from_json_file(str(config_dir / "config.json"))
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    torch.nn.Module.to(model, device=device, dtype=dtype)  # (transformers wraps `to`)
    return model.eval()


async def measure(name: str, users: list[User], prompts: Prompts, generate: Generate) -> ArmResult:
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    wall, replies, lengths = await run_users(users, prompts, generate)
    result = ArmResult(name, wall, replies, lengths, peak_rss_mb())
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        result.extra["GPU memory peak"] = f"{torch.cuda.max_memory_allocated() / MB:.0f} MB"
    return result


async def warm_up(generate: Generate, ids: tuple[int, ...]) -> None:
    await generate("warm-up", ids)


def report(arm: ArmResult) -> None:
    n = len(arm.replies)
    tokens = sum(r.new_tokens for r in arm.replies)
    print(
        f"{arm.name:>6}: {n} replies, {tokens} new tokens in {arm.wall_s:.1f} s = "
        f"{arm.tokens_per_s:.1f} tok/s | latency p50 {arm.latency(0.5):.2f} s p95 "
        f"{arm.latency(0.95):.2f} s | first token p50 {arm.ttft(0.5):.2f} s p95 "
        f"{arm.ttft(0.95):.2f} s | peak RSS {arm.peak_rss_mb:.0f} MB"
        + "".join(f" | {k} {v}" for k, v in arm.extra.items()),
        flush=True,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument(
        "--history", default="0", help="prior exchanges per user: N or MIN-MAX (random)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--kv-budget-mb", type=float, default=4096)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--compile", choices=["off", "compile"], default="off")
    parser.add_argument("--arms", default="naive,engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-config", type=Path, default=SHARED / "kogpt2-base-v2")
    parser.add_argument("--data", type=Path, default=SHARED / "chatbot-data" / "ChatbotData.csv")
    return parser.parse_args(argv)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


async def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    dtype = resolve_dtype(args.dtype, args.device)
    low, _, high = args.history.partition("-")
    history = (int(low), int(high or low))
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(str(args.model_config))
    settings = Settings(_env_file=None, max_new_tokens=args.max_new_tokens)  # type: ignore[call-arg]
    params = sampling_params(settings)
    model = build_model(args.model_config, args.device, dtype, args.seed)
    n_positions = int(model.config.n_positions)
    pairs = load_pairs(args.data)
    print(
        f"model: kogpt2-base-v2 config, random weights, {str(dtype).removeprefix('torch.')} on "
        f"{args.device} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '')}) | {args.users} users × {args.turns} "
        f"turns, prior history {args.history} exchanges | {params}",
        flush=True,
    )
    print(
        f"every reply is exactly {args.max_new_tokens} new tokens in both arms (EOS banned, stop "
        "strings off), so tokens/s compare like for like",
        flush=True,
    )
    warm = tuple(tokenizer.encode_text("안녕하세요\nAI:"))
    results: dict[str, ArmResult] = {}
    for name in args.arms.split(","):
        users = make_users(pairs, args.users, args.turns, history, args.seed)
        prompts = Prompts(tokenizer, settings, n_positions)
        if name == "naive":
            naive = NaiveArm(model, tokenizer, params, args.device)
            await warm_up(naive.generate, warm)
            results[name] = await measure(name, users, prompts, naive.generate)
            naive.executor.shutdown()
        else:
            config = EngineConfig(
                max_batch=args.max_batch,
                kv_budget_mb=args.kv_budget_mb,
                prefill_chunk=args.prefill_chunk,
            )
            engine = Engine(GPT2Forward(model, args.compile), config)
            arm = EngineArm(engine, params, tokenizer.eos_id)
            await warm_up(arm.generate, warm)
            engine.cache.clear()
            result = await measure(name, users, prompts, arm.generate)
            stats = engine.stats
            result.extra |= {
                "reused prompt tokens": f"{stats.reused_tokens}/{stats.prompt_tokens}",
                "max batch": str(stats.max_batch_seen),
                "KV peak": f"{engine.arena.peak_used * engine.arena.bytes_per_token / MB:.0f} MB "
                f"of {engine.arena.budget_bytes / MB:.0f} MB",
            }
            results[name] = result
            await asyncio.to_thread(engine.close)
        lengths = results[name].prompt_tokens
        report(results[name])
        if name == args.arms.split(",")[0]:
            print(
                f"prompt tokens: min {min(lengths)} median {statistics.median(lengths):.0f} "
                f"max {max(lengths)}",
                flush=True,
            )
    if {"naive", "engine"} <= results.keys():
        compare(results["naive"], results["engine"], args.users)


def compare(naive: ArmResult, engine: ArmResult, users: int) -> None:
    print(
        f"engine vs naive: latency p50 {naive.latency(0.5) / engine.latency(0.5):.1f}× lower, "
        f"p95 {naive.latency(0.95) / engine.latency(0.95):.1f}× lower "
        f"(engine p95 {engine.latency(0.95):.2f} s vs naive p50 {naive.latency(0.5):.2f} s); "
        f"first token p50 {naive.ttft(0.5) / engine.ttft(0.5):.1f}× sooner; "
        f"peak RSS {engine.peak_rss_mb / naive.peak_rss_mb:.2f}× naive's",
        flush=True,
    )
    print(f"throughput ratio at {users} users: {engine.tokens_per_s / naive.tokens_per_s:.1f}×")


if __name__ == "__main__":
    asyncio.run(main())
