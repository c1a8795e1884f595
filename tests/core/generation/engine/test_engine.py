"""The engine on a small random GPT-2: same greedy output as Hugging Face `generate`, with and
without KV reuse, while requests join and leave the batch, within the KV budget."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from core.generation.base import GenerationError, GenerationErrorKind, SamplingParams
from core.generation.engine.forward import GPT2Forward
from core.generation.engine.scheduler import Engine, EngineConfig, EngineRequest, FinishKind
from tests.support.event_loop import ticking
from tests.support.failures import DECODER_FAILURES

EOS = 1
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
PLAIN_GREEDY = dataclasses.replace(GREEDY, repetition_penalty=1.0, no_repeat_ngram_size=0)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.9)


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=51200, bos_token_id=0, eos_token_id=EOS
    )
    torch.manual_seed(0)
    built = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # sharper logits than the init's: no near-ties for argmax
        for parameter in built.parameters():
            parameter.mul_(4)
    return built


def start(model: GPT2LMHeadModel, **config: object) -> Engine:
    values: dict[str, object] = {"kv_budget_mb": 16, "idle_poll_s": 0.02}
    values.update(config)
    return Engine(GPT2Forward(model), EngineConfig(**values))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(model: GPT2LMHeadModel) -> Iterator[Engine]:
    made = start(model)
    yield made
    made.close()


def ids(n: int, seed: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(110, 51200, (n,), generator=gen).tolist())


def hf_greedy(
    model: GPT2LMHeadModel, prompt: tuple[int, ...], params: SamplingParams
) -> tuple[int, ...]:
    config = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=False,
        repetition_penalty=params.repetition_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        eos_token_id=EOS,
        pad_token_id=3,
    )
    input_ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
    return tuple(out[0, len(prompt) :].tolist())


def request(
    prompt: tuple[int, ...], params: SamplingParams = GREEDY, **fields: object
) -> EngineRequest:
    return EngineRequest(prompt, params, eos_id=EOS, **fields)  # type: ignore[arg-type]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# --- same output as Hugging Face ------------------------------------------------------------


async def test_greedy_matches_hugging_face_generate_in_one_batch(
    engine: Engine, model: GPT2LMHeadModel
) -> None:
    cases = [
        (ids(5, 1), GREEDY),
        (ids(70, 2), PLAIN_GREEDY),
        (ids(300, 3), dataclasses.replace(GREEDY, no_repeat_ngram_size=2, max_new_tokens=20)),
        (ids(33, 4), dataclasses.replace(GREEDY, repetition_penalty=2.0, max_new_tokens=7)),
    ]
    outputs = await asyncio.gather(*(engine.generate(request(p, params)) for p, params in cases))
    for (prompt, params), output in zip(cases, outputs, strict=True):
        assert output.ids == hf_greedy(model, prompt, params)
        assert output.finish in (FinishKind.LENGTH, FinishKind.EOS)


def conversation_turns(
    first: tuple[int, ...], replies: list[tuple[int, ...]], turn: int
) -> tuple[int, ...]:
    """Turn N's prompt: the previous prompt, its reply (all but the last token, re-tokenized
    differently, as the dialogue stores cleaned text), and a new user line."""
    prompt = first
    for index in range(turn):
        prompt = prompt + replies[index][:-1] + ids(15, 100 + index)
    return prompt


async def test_kv_reuse_gives_the_same_greedy_output(
    engine: Engine, model: GPT2LMHeadModel
) -> None:
    first = ids(40, 7)
    replies: list[tuple[int, ...]] = []
    reused: list[int] = []
    for turn in range(4):
        prompt = conversation_turns(first, replies, turn)
        output = await engine.generate(request(prompt, cache_key="conversation"))
        fresh = await engine.generate(request(prompt))  # no cache key: a full prefill
        assert output.ids == fresh.ids == hf_greedy(model, prompt, GREEDY)
        replies.append(output.ids)
        reused.append(output.reused_tokens)
    assert reused[0] == 0
    assert all(r >= len(first) for r in reused[1:])  # only the new tokens were prefilled


async def test_a_changed_prefix_reuses_only_the_common_part(
    engine: Engine, model: GPT2LMHeadModel
) -> None:
    persona, old, new = ids(10, 20), ids(60, 21), ids(30, 22)
    await engine.generate(request(persona + old, cache_key="trimmed"))
    trimmed = persona + old[40:] + new  # older turns dropped: only the persona is shared
    output = await engine.generate(request(trimmed, cache_key="trimmed"))
    assert output.reused_tokens == len(persona)
    assert output.ids == hf_greedy(model, trimmed, GREEDY)


async def test_the_same_prompt_again_reuses_all_but_its_last_token(engine: Engine) -> None:
    prompt = ids(25, 23)
    first = await engine.generate(request(prompt, cache_key="again"))
    second = await engine.generate(request(prompt, cache_key="again"))
    assert second.reused_tokens == len(prompt) - 1 and second.ids == first.ids


async def test_chunked_prefill_gives_the_same_output(model: GPT2LMHeadModel) -> None:
    chunked = start(model, prefill_chunk=16)
    try:
        prompt = ids(150, 8)
        output = await chunked.generate(request(prompt))
        assert output.ids == hf_greedy(model, prompt, GREEDY)
    finally:
        chunked.close()


# --- batching -------------------------------------------------------------------------------


async def test_requests_join_and_leave_mid_batch(model: GPT2LMHeadModel) -> None:
    engine = start(model)
    try:
        long_params = dataclasses.replace(PLAIN_GREEDY, max_new_tokens=200)
        long_prompt = ids(20, 9)
        long_handle = engine.submit(request(long_prompt, long_params))
        await asyncio.to_thread(wait_until, lambda: engine.stats.generated_tokens >= 5)
        shorts = [ids(10 + i, 30 + i) for i in range(3)]
        outputs = await asyncio.gather(*(engine.generate(request(p)) for p in shorts))
        assert not long_handle.future.done()  # they joined and left while it kept going
        long_output = await asyncio.wrap_future(long_handle.future)
        assert long_output.ids == hf_greedy(model, long_prompt, long_params)
        for prompt, output in zip(shorts, outputs, strict=True):
            assert output.ids == hf_greedy(model, prompt, GREEDY)
        assert engine.stats.max_batch_seen == 4
    finally:
        engine.close()


async def test_max_batch_bounds_the_batch(model: GPT2LMHeadModel) -> None:
    small = start(model, max_batch=2)
    try:
        outputs = await asyncio.gather(*(small.generate(request(ids(12, s))) for s in range(5)))
        assert all(
            len(o.ids) == GREEDY.max_new_tokens for o in outputs if o.finish is FinishKind.LENGTH
        )
        assert small.stats.max_batch_seen == 2 and small.stats.finished == 5
    finally:
        small.close()


async def test_each_request_keeps_its_own_sampling(engine: Engine) -> None:
    seeded = request(ids(30, 10), SAMPLED, seed=123)
    alone = await engine.generate(seeded)
    crowd = [
        request(ids(50, 11), dataclasses.replace(SAMPLED, temperature=0.5, top_k=0), seed=1),
        request(ids(15, 12), GREEDY),
        seeded,
        request(ids(40, 13), dataclasses.replace(SAMPLED, top_p=0.5, repetition_penalty=1.0)),
    ]
    together = await asyncio.gather(*(engine.generate(r) for r in crowd))
    assert together[2].ids == alone.ids
    other_seed = await engine.generate(dataclasses.replace(seeded, seed=124))
    assert other_seed.ids != alone.ids


# --- memory ---------------------------------------------------------------------------------


async def test_kv_budget_is_never_exceeded_and_lru_conversations_are_evicted(
    model: GPT2LMHeadModel,
) -> None:
    tight = start(model, kv_budget_mb=0.25, decode_pool="off")  # 256 tokens of KV, all arena
    try:
        assert tight.arena.capacity == 256
        prompts = {f"user{i}": ids(40 + 5 * i, 40 + i) for i in range(8)}
        outputs = await asyncio.gather(
            *(tight.generate(request(p, cache_key=key)) for key, p in prompts.items())
        )
        for prompt, output in zip(prompts.values(), outputs, strict=True):
            assert output.ids == hf_greedy(model, prompt, GREEDY)
        assert tight.arena.peak_used <= tight.arena.capacity
        assert tight.cache.evictions > 0 and tight.stats.max_batch_seen < 8
        with pytest.raises(GenerationError) as too_big:
            tight.submit(request(ids(300, 1)))
        assert too_big.value.kind is GenerationErrorKind.OUT_OF_MEMORY
    finally:
        tight.close()


async def test_idle_conversations_are_dropped(model: GPT2LMHeadModel) -> None:
    now = [0.0]
    idle = Engine(
        GPT2Forward(model),
        EngineConfig(kv_budget_mb=4, kv_idle_s=60, idle_poll_s=0.01),
        clock=lambda: now[0],
    )
    try:
        await idle.generate(request(ids(20, 50), cache_key="a"))
        assert "a" in idle.cache and idle.arena.used > 0
        now[0] += 61
        idle.wake()
        await asyncio.to_thread(wait_until, lambda: "a" not in idle.cache)
        assert idle.arena.used == 0 and idle.cache.idle_drops == 1
    finally:
        idle.close()


# --- the event loop, cancelling, deadlines, errors -------------------------------------------


async def test_the_event_loop_runs_while_the_engine_works(engine: Engine) -> None:
    params = dataclasses.replace(GREEDY, max_new_tokens=60)
    async with ticking(0.005) as ticks:
        started = time.monotonic()
        await asyncio.gather(*(engine.generate(request(ids(200, s), params)) for s in range(4)))
        elapsed = time.monotonic() - started
    assert ticks.count >= min(10, elapsed / 0.005 / 4)


async def test_cancelling_the_caller_stops_the_request(engine: Engine) -> None:
    endless = request(
        ids(10, 60), dataclasses.replace(PLAIN_GREEDY, max_new_tokens=900), cache_key="c"
    )
    task = asyncio.create_task(engine.generate(endless))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(wait_until, lambda: engine.running == 0)
    assert "c" in engine.cache  # what it computed is kept for the conversation
    assert (await engine.generate(request(ids(10, 61)))).finish is FinishKind.LENGTH


async def test_a_deadline_ends_the_request_with_timeout(engine: Engine) -> None:
    endless = request(
        ids(10, 62),
        dataclasses.replace(PLAIN_GREEDY, max_new_tokens=900),
        deadline=time.monotonic() + 0.1,
    )
    output = await engine.generate(endless)
    assert output.finish is FinishKind.TIMEOUT and len(output.ids) < 900


async def test_eos_and_stop_rules_end_a_request(engine: Engine) -> None:
    forced = request(ids(10, 63), PLAIN_GREEDY, hook=lambda seq, s: _force(s, EOS))
    eos = await engine.generate(forced)
    assert (eos.ids, eos.finish) == ((EOS,), FinishKind.EOS)
    stopped = await engine.generate(
        request(ids(10, 64), PLAIN_GREEDY, stop=lambda new: len(new) == 3)
    )
    assert (len(stopped.ids), stopped.finish) == (3, FinishKind.STOP)
    banned = await engine.generate(
        request(ids(10, 63), PLAIN_GREEDY, min_new_tokens=4, hook=lambda seq, s: _prefer(s, EOS))
    )
    assert EOS not in banned.ids[:4] and banned.ids[4] == EOS


def _force(scores: torch.Tensor, token: int) -> torch.Tensor:
    forced = torch.full_like(scores, float("-inf"))
    forced[token] = 0.0
    return forced


def _prefer(scores: torch.Tensor, token: int) -> torch.Tensor:
    scores[token] = scores.max() + 100 if torch.isfinite(scores[token]) else scores[token]
    return scores


@pytest.mark.parametrize(("failure", "kind"), DECODER_FAILURES)
async def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(
    model: GPT2LMHeadModel, monkeypatch: pytest.MonkeyPatch, failure: Exception, kind: str
) -> None:
    broken = start(model)
    try:
        real = broken.forward.last_hidden
        calls = [0]

        def fail_once(chunks: object, buffer: object = None) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 1:
                raise failure
            return real(chunks, buffer)  # type: ignore[arg-type]

        monkeypatch.setattr(broken.forward, "last_hidden", fail_once)
        with pytest.raises(GenerationError) as error:
            await broken.generate(request(ids(10, 70), cache_key="x"))
        assert error.value.kind == kind and broken.arena.used == 0
        assert (await broken.generate(request(ids(10, 71)))).finish is FinishKind.LENGTH
    finally:
        broken.close()


@pytest.mark.parametrize("prompt", [(), (51200,), (-1,), (400,) * 1020])
def test_impossible_requests_are_refused_at_once(engine: Engine, prompt: tuple[int, ...]) -> None:
    with pytest.raises(GenerationError) as error:
        engine.submit(request(prompt))
    assert error.value.kind is GenerationErrorKind.INTERNAL


async def test_close_fails_running_and_later_requests(model: GPT2LMHeadModel) -> None:
    closing = start(model)
    endless = request(ids(10, 80), dataclasses.replace(PLAIN_GREEDY, max_new_tokens=900))
    handle = closing.submit(endless)
    await asyncio.to_thread(wait_until, lambda: closing.running == 1)
    await asyncio.to_thread(closing.close)
    with pytest.raises(GenerationError) as running:
        await asyncio.wrap_future(handle.future)
    assert running.value.kind is GenerationErrorKind.UNAVAILABLE
    with pytest.raises(GenerationError) as later:
        closing.submit(endless)
    assert later.value.kind is GenerationErrorKind.UNAVAILABLE


async def test_calls_run_on_the_engine_thread_between_steps(engine: Engine) -> None:
    """Other torch work on the model (scoring) runs where the steps run, while requests go on."""
    endless = request(ids(10, 81), dataclasses.replace(PLAIN_GREEDY, max_new_tokens=300))
    handle = engine.submit(endless)
    await asyncio.to_thread(wait_until, lambda: engine.running == 1)

    def where() -> tuple[str, bool, int]:
        return threading.current_thread().name, torch.is_inference_mode_enabled(), engine.running

    assert await asyncio.wrap_future(engine.call(where)) == ("kobot-engine", True, 1)
    with pytest.raises(ZeroDivisionError):
        await asyncio.wrap_future(engine.call(lambda: 1 // 0))
    output = await asyncio.wrap_future(handle.future)
    assert len(output.ids) == 300  # a failing call fails only its caller


async def test_a_call_left_waiting_at_close_fails_and_later_calls_are_refused(
    model: GPT2LMHeadModel,
) -> None:
    closing = start(model)
    release = threading.Event()
    blocking = closing.call(release.wait)
    await asyncio.to_thread(wait_until, blocking.running)
    queued = closing.call(lambda: "never")
    abandoned = closing.call(lambda: "nobody waits")
    assert abandoned.cancel()

    def refuses_calls() -> bool:
        try:
            closing.call(lambda: None)
        except GenerationError:
            return True
        return False

    closer = asyncio.create_task(asyncio.to_thread(closing.close))
    await asyncio.to_thread(wait_until, refuses_calls)
    release.set()
    await closer
    assert blocking.result() is True
    with pytest.raises(GenerationError) as waiting:
        queued.result()
    assert waiting.value.kind is GenerationErrorKind.UNAVAILABLE
    with pytest.raises(GenerationError) as later:
        closing.call(lambda: "too late")
    assert later.value.kind is GenerationErrorKind.UNAVAILABLE


async def test_half_precision_keeps_the_kv_in_the_model_dtype(model: GPT2LMHeadModel) -> None:
    """The GPU path's dtype handling, on the CPU: bf16 weights, bf16 KV, float32 logits."""
    half = GPT2LMHeadModel(model.config)
    half.load_state_dict(model.state_dict())
    torch.nn.Module.to(half, dtype=torch.bfloat16)
    engine = Engine(GPT2Forward(half.eval()), EngineConfig(kv_budget_mb=4))
    try:
        assert engine.arena.buffer.dtype == torch.bfloat16
        assert engine.arena.bytes_per_token == 2 * 2 * 64 * 2  # layers × K/V × width × bytes
        output = await engine.generate(request(ids(30, 90), cache_key="half"))
        assert len(output.ids) == GREEDY.max_new_tokens
        again = await engine.generate(request(ids(30, 90) + output.ids[:-1], cache_key="half"))
        assert again.reused_tokens >= 30
    finally:
        engine.close()
