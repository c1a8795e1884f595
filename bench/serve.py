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
- hf-batch: Hugging Face `model.generate` on a left-padded batch of every message waiting when
  the previous batch ends (static batching, same dtype as the engine, no KV reuse).
- ct2: CTranslate2 int8 (`Generator.generate_batch`, the same static batching) in a process of
  its own (`bench/ct2_peer.py` says why), the model converted once into a cache folder
  (`--cache-dir`); needs `pip install -e .[bench]`.
- engine: kobot's `Engine` (continuous batching, chunked prefill, per-conversation KV reuse).

The model is built, and the engine set up, on threads that end (`core.generation.threads`), as
the bot does; each arm's torch work runs on the arm's own thread.

`--burst` sends every user's first message at once with no history (one turn each): the peer
comparison. The last line gives the engine's ratio to the best other arm run.

Both arms sample with kobot's default settings and generate exactly --max-new-tokens per reply
(EOS banned, stop strings off), so tokens/s compare like for like. Both run with the same torch
threads and OpenMP as the environment sets it: unset, as the bot runs, unless you set
OMP_WAIT_POLICY. On a quiet CPU that is the faster choice: with OMP_WAIT_POLICY=PASSIVE every
parallel op waits for a sleeping thread to wake (`bench/profile_step.py`, 2 cores, bf16: 18–21 ms
a decode step at batch 1 against 11–14 unset, 37–41 against 25–29 at batch 32). On a CPU busy
with other processes, PASSIVE keeps spinning threads from stealing the cores they wait for.

    python bench/serve.py --users 32 --turns 3 [--history 0-20] [--device cuda] [--threads 1]
    python bench/serve.py --burst --users 32 --arms naive,hf-batch,ct2,engine
    python bench/serve.py --burst --users 32 --arms ct2,engine --rounds 5   # medians of 5
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LogitsProcessor,
    LogitsProcessorList,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ct2_peer import Ct2Peer
from bench.memory import peak_rss_mb, reset_peak_rss
from bench.shared_data import shared_dir
from core.dialogue.context import ContextStarts
from core.dialogue.prompt import PromptBuilder
from core.dialogue.services import sampling_params
from core.dialogue.trimming import token_budget
from core.generation.base import SamplingParams
from core.generation.cpu_features import auto_dtype
from core.generation.engine.forward import GPT2Forward
from core.generation.engine.kernels.dense import dense_isa
from core.generation.engine.scheduler import Engine, EngineConfig, EngineRequest, EngineStats
from core.generation.hf_decoder import generation_config
from core.generation.threads import on_a_fresh_thread
from core.generation.tokenizer import KoGPT2Tokenizer, load_tokenizer
from core.messages import ConversationKey, Role, Turn
from core.settings import Settings

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
        self.trimmed = 0

    def build(self, user: User, text: str) -> tuple[int, ...]:
        recent = user.history[-self.settings.history_turns :]
        recent = self.starts.since(
            user.key, recent, self.settings.history_turns, self.settings.trim_low_water
        )
        prompt = self.builder.build(
            self.settings.persona, recent, text, self.budget, self.low_water
        )
        self.starts.update(user.key, recent, prompt)
        self.trimmed += prompt.dropped_turns > 0
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
        self.config = generation_config(params, tokenizer.eos_id, tokenizer.pad_id)
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


class BatchedArm:
    """Static batching: every message waiting when the previous batch ends runs as one batch
    (up to `max_batch`) through `run_batch`, on one worker thread."""

    def __init__(
        self, run_batch: Callable[[list[tuple[int, ...]]], list[int]], max_batch: int
    ) -> None:
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.pending: list[tuple[tuple[int, ...], float, asyncio.Future[Reply]]] = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        self.task: asyncio.Task[None] | None = None

    async def generate(self, key: str, ids: tuple[int, ...]) -> Reply:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.pending.append((ids, time.perf_counter(), future))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # messages sent in the same tick join the first batch
        loop = asyncio.get_running_loop()
        while self.pending:
            batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
            prompts = [ids for ids, _, _ in batch]
            counts = await loop.run_in_executor(self.executor, self.run_batch, prompts)
            done = time.perf_counter()
            for (_, arrived, future), count in zip(batch, counts, strict=True):
                future.set_result(Reply(count, done - arrived, done - arrived))


def hf_batch_runner(
    model: GPT2LMHeadModel, tokenizer: KoGPT2Tokenizer, params: SamplingParams, device: str
) -> Callable[[list[tuple[int, ...]]], list[int]]:
    """`model.generate` on the prompts left-padded into one batch."""
    config = generation_config(params, tokenizer.eos_id, tokenizer.pad_id)
    config.min_new_tokens = params.max_new_tokens
    config.pad_token_id = tokenizer.pad_id

    def run(prompts: list[tuple[int, ...]]) -> list[int]:
        width = max(len(ids) for ids in prompts)
        padded = [[tokenizer.pad_id] * (width - len(ids)) + list(ids) for ids in prompts]
        mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts]
        input_ids = torch.tensor(padded, device=device)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.tensor(mask, device=device),
                generation_config=config,
            )
        return [output.shape[1] - width] * len(prompts)

    return run


def ct2_model_dir(bench: Bench) -> Path:
    """The bench model converted to CTranslate2 int8, once per config and seed (cached)."""
    import ctranslate2.converters

    config_text = (bench.args.model_config / "config.json").read_bytes()
    digest = hashlib.sha256(config_text + str(bench.args.seed).encode()).hexdigest()[:16]
    target = bench.args.cache_dir / f"ct2-int8-{digest}"
    if (target / "model.bin").exists():
        return target
    source = bench.args.cache_dir / f"hf-{digest}"

    def convert() -> None:
        model = build_model(bench.args.model_config, "cpu", torch.float32, bench.args.seed)
        model.save_pretrained(source)
        bench.tokenizer.hf.save_pretrained(source)
        converter = ctranslate2.converters.TransformersConverter(str(source))
        converter.convert(str(target), quantization="int8", force=True)

    on_a_fresh_thread(convert)
    return target


def start_ct2(bench: Bench) -> Ct2Peer:
    """CTranslate2's `generate_batch` in its own process (`bench/ct2_peer.py`), with kobot's
    sampling settings (EOS banned by min_length)."""
    params = bench.params
    options = {
        "max_length": params.max_new_tokens,
        "min_length": params.max_new_tokens,
        "sampling_topk": params.top_k,
        "sampling_topp": params.top_p,
        "sampling_temperature": params.temperature,
        "repetition_penalty": params.repetition_penalty,
        "no_repeat_ngram_size": params.no_repeat_ngram_size,
    }
    return Ct2Peer(str(ct2_model_dir(bench)), torch.get_num_threads(), options)


# --- measuring ---------------------------------------------------------------------------------


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


async def warm_up(generate: Generate, ids: tuple[int, ...], copies: int = 1) -> None:
    """`copies` messages at once: a batching arm meets the measured batch size before it is
    measured (its allocations made, its memory touched), as it would after a minute of traffic."""
    await asyncio.gather(*(generate(f"warm-up-{copy}", ids) for copy in range(copies)))


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
    parser.add_argument(
        "--history-turns", type=int, default=0, help="KOBOT_HISTORY_TURNS (0: kobot's default)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    parser.add_argument(
        "--max-batch", type=int, default=0, help="engine batch bound (0: what the KV budget holds)"
    )
    parser.add_argument("--kv-budget-mb", type=float, default=4096)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--compile", choices=["off", "compile"], default="off")
    parser.add_argument("--arms", default="naive,engine", help="naive,hf-batch,ct2,engine")
    parser.add_argument(
        "--burst",
        action="store_true",
        help="every user sends one message at once, with no history (the peer comparison)",
    )
    parser.add_argument(
        "--quant", choices=["auto", "off", "int8"], default="auto", help="KOBOT_ENGINE_QUANT"
    )
    parser.add_argument(
        "--kv-dtype",
        choices=["auto", "model", "int8"],
        default="auto",
        help="KOBOT_ENGINE_KV_DTYPE",
    )
    parser.add_argument(
        "--kernels", choices=["auto", "off"], default="auto", help="KOBOT_ENGINE_KERNELS"
    )
    parser.add_argument(
        "--decode-pool", choices=["auto", "on", "off"], default="auto", help="EngineConfig"
    )
    parser.add_argument(
        "--graphs", choices=["auto", "off", "static"], default="auto", help="KOBOT_ENGINE_GRAPHS"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("KOBOT_BENCH_CACHE", Path.home() / ".cache" / "kobot-bench")),
        help="where the CTranslate2 conversion is kept",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the arms this many times, their order reversed every other round (these "
        "machines are noisy: each round's ratios, then their medians)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-config", type=Path, default=SHARED / "kogpt2-base-v2")
    parser.add_argument("--data", type=Path, default=SHARED / "chatbot-data" / "ChatbotData.csv")
    return parser.parse_args(argv)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return auto_dtype(device)
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@dataclass
class Bench:
    """Everything both arms share: the settings, the model, the data."""

    args: argparse.Namespace
    tokenizer: KoGPT2Tokenizer
    settings: Settings
    params: SamplingParams
    model: GPT2LMHeadModel
    pairs: list[tuple[str, str]]

    def users(self) -> list[User]:
        """The same users (same messages, same prior history) for every arm."""
        low, _, high = self.args.history.partition("-")
        history = (int(low), int(high or low))
        return make_users(self.pairs, self.args.users, self.args.turns, history, self.args.seed)

    def prompts(self) -> Prompts:
        return Prompts(self.tokenizer, self.settings, int(self.model.config.n_positions))

    @property
    def warm_up_batch(self) -> int:
        """How many warm-up messages a batching arm gets at once (the naive loop gets one)."""
        return min(self.args.users, self.args.max_batch or 32)

    @property
    def warm_up_ids(self) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode_text("안녕하세요\nAI:"))


def setup(argv: Sequence[str] | None) -> Bench:
    args = parse_args(argv)
    if args.burst:
        args.turns, args.history = 1, "0"
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"history_turns": args.history_turns} if args.history_turns else {}
    settings = Settings(_env_file=None, max_new_tokens=args.max_new_tokens, **overrides)  # type: ignore[call-arg]
    dtype = resolve_dtype(args.dtype, args.device)
    return Bench(
        args=args,
        tokenizer=load_tokenizer(str(args.model_config)),
        settings=settings,
        params=sampling_params(settings),
        model=on_a_fresh_thread(
            lambda: build_model(args.model_config, args.device, dtype, args.seed)
        ),
        pairs=load_pairs(args.data),
    )


def print_header(bench: Bench) -> None:
    args = bench.args
    dtype = str(bench.model.dtype).removeprefix("torch.")
    print(
        f"model: kogpt2-base-v2 config, random weights, {dtype} on {args.device} "
        f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}) | {args.users} users × {args.turns} turns, "
        f"prior history {args.history} exchanges, history window "
        f"{bench.settings.history_turns} turns | {bench.params}",
        flush=True,
    )
    print(
        f"every reply is exactly {args.max_new_tokens} new tokens in both arms (EOS banned, stop "
        "strings off), so tokens/s compare like for like",
        flush=True,
    )


async def run_naive(bench: Bench, prompts: Prompts) -> ArmResult:
    naive = NaiveArm(bench.model, bench.tokenizer, bench.params, bench.args.device)
    try:
        await warm_up(naive.generate, bench.warm_up_ids)
        return await measure("naive", bench.users(), prompts, naive.generate)
    finally:
        naive.executor.shutdown()


async def run_engine(bench: Bench, prompts: Prompts) -> ArmResult:
    args = bench.args
    config = EngineConfig(
        max_batch=args.max_batch,
        kv_budget_mb=args.kv_budget_mb,
        prefill_chunk=args.prefill_chunk,
        decode_pool=args.decode_pool,
    )

    def start() -> Engine:
        forward = GPT2Forward(
            bench.model, args.compile, args.quant, args.kernels, graphs=args.graphs,
            kv_dtype=args.kv_dtype,
        )  # fmt: skip
        return Engine(forward, config)

    engine = on_a_fresh_thread(start)
    try:
        arm = EngineArm(engine, bench.params, bench.tokenizer.eos_id)
        await warm_up(arm.generate, bench.warm_up_ids, bench.warm_up_batch)
        engine.cache.clear()
        engine.stats = EngineStats()
        result = await measure("engine", bench.users(), prompts, arm.generate)
        result.extra |= engine_figures(engine, result.wall_s)
        return result
    finally:
        await asyncio.to_thread(engine.close)


async def run_batched(
    name: str,
    bench: Bench,
    prompts: Prompts,
    run_batch: Callable[[list[tuple[int, ...]]], list[int]],
    before_measuring: Callable[[], None] = lambda: None,
) -> ArmResult:
    arm = BatchedArm(run_batch, bench.args.max_batch or 32)
    try:
        await warm_up(arm.generate, bench.warm_up_ids, bench.warm_up_batch)
        before_measuring()
        return await measure(name, bench.users(), prompts, arm.generate)
    finally:
        arm.executor.shutdown()


async def run_hf_batch(bench: Bench, prompts: Prompts) -> ArmResult:
    args = bench.args
    runner = hf_batch_runner(bench.model, bench.tokenizer, bench.params, args.device)
    return await run_batched("hf-batch", bench, prompts, runner)


async def run_ct2(bench: Bench, prompts: Prompts) -> ArmResult:
    peer = start_ct2(bench)
    hf = bench.tokenizer.hf

    def run(batch: list[tuple[int, ...]]) -> list[int]:
        tokens = [hf.convert_ids_to_tokens(list(ids)) for ids in batch]
        return peer.run(cast(list[list[str]], tokens))  # a list of ids gives a list of tokens

    try:
        result = await run_batched("ct2", bench, prompts, run, peer.reset_peak_rss)
        result.peak_rss_mb = peer.peak_rss_mb
        return result
    finally:
        peer.close()


def engine_figures(engine: Engine, wall_s: float) -> dict[str, str]:
    stats, arena = engine.stats, engine.arena
    step_ms = 1000 * stats.busy_s / max(stats.steps, 1)
    return {
        "reused prompt tokens": f"{stats.reused_tokens}/{stats.prompt_tokens}",
        "max batch": f"{stats.max_batch_seen} (bound {engine.max_batch})",
        "dense": dense_layers(engine.forward),
        "attention": attention_kind(engine.forward),
        "static decode steps": static_steps(engine.forward),
        "steps": f"{stats.steps} ({step_ms:.0f} ms each, busy {stats.busy_s / wall_s:.0%})",
        "KV peak": f"{arena.peak_used * arena.bytes_per_token / MB:.0f} MB "
        f"of {arena.budget_bytes / MB:.0f} MB"
        + f" (+ decode pool {engine.forward.decode_slots.pool_bytes / MB:.0f} MB)",
    }


def attention_kind(forward: GPT2Forward) -> str:
    if forward.attention_kernel is None:
        return "torch"
    storage = forward.kv_storage
    rows = "int8" if storage.dtype == torch.uint8 else str(storage.dtype).removeprefix("torch.")
    return f"kernel, KV in {rows}"


def dense_layers(forward: GPT2Forward) -> str:
    weights = str(forward.dtype).removeprefix("torch.")
    if forward.quant == "int8":
        weights = f"int8 (activations {str(forward.activation_dtype).removeprefix('torch.')})"
    isa = f" on {dense_isa()}" if forward.linear_kind == "panels" else ""
    return f"{forward.linear_kind} {weights}{isa}"


def static_steps(forward: GPT2Forward) -> str:
    graphs = forward.decode_graphs
    if graphs is None:
        return "off"
    return f"{graphs.steps} ({graphs.captured} CUDA graphs captured)"


async def main(argv: Sequence[str] | None = None) -> None:
    bench = setup(argv)
    print_header(bench)
    names = bench.args.arms.split(",")
    rounds = [await run_round(bench, names[:: 1 if index % 2 == 0 else -1], index == 0)
              for index in range(max(1, bench.args.rounds))]  # fmt: skip
    if len(rounds) > 1:
        print_medians(rounds)
    if {"naive", "engine"} <= rounds[-1].keys():
        compare(rounds[-1]["naive"], rounds[-1]["engine"], bench.args.users)


async def run_round(bench: Bench, names: list[str], first: bool) -> dict[str, ArmResult]:
    """Every arm once, in this order; then the engine's ratio to each peer."""
    arms = {"naive": run_naive, "hf-batch": run_hf_batch, "ct2": run_ct2, "engine": run_engine}
    results: dict[str, ArmResult] = {}
    for name in names:
        prompts = bench.prompts()
        results[name] = await arms[name](bench, prompts)
        report(results[name])
        if first and len(results) == 1:
            print_prompts(results[name].prompt_tokens, prompts.trimmed)
    print_ratios(results)
    return results


def print_ratios(results: dict[str, ArmResult]) -> None:
    peers = [arm for name, arm in results.items() if name != "engine"]
    if "engine" not in results or not peers:
        return
    best = max(peers, key=lambda arm: arm.tokens_per_s)
    engine = results["engine"]
    print(
        f"engine vs best peer ({best.name}, {best.tokens_per_s:.1f} tok/s): "
        f"{engine.tokens_per_s / best.tokens_per_s:.2f}×"
        + "".join(
            f" | vs {arm.name} {engine.tokens_per_s / arm.tokens_per_s:.2f}×" for arm in peers
        ),
        flush=True,
    )


def print_medians(rounds: list[dict[str, ArmResult]]) -> None:
    """Each arm's median tok/s over the rounds, and the median of the engine's per-round ratios
    (a ratio within one round compares runs minutes apart, not a quiet run with a loaded one)."""
    line = f"medians over {len(rounds)} rounds: " + ", ".join(
        f"{name} {statistics.median(r[name].tokens_per_s for r in rounds):.1f} tok/s"
        for name in rounds[0]
    )
    if "engine" in rounds[0]:
        line += "".join(
            f" | engine vs {name} {median_ratio(rounds, name):.2f}×"
            for name in rounds[0]
            if name != "engine"
        )
    print(line, flush=True)


def median_ratio(rounds: list[dict[str, ArmResult]], peer: str) -> float:
    return statistics.median(r["engine"].tokens_per_s / r[peer].tokens_per_s for r in rounds)


def print_prompts(lengths: list[int], trimmed: int) -> None:
    print(
        f"prompt tokens: min {min(lengths)} median {statistics.median(lengths):.0f} "
        f"max {max(lengths)}; {trimmed} of {len(lengths)} prompts trimmed (older turns dropped "
        "down to the low-water mark)",
        flush=True,
    )


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
