"""The engine's batched common paths: tie-safe top-k candidates, batched draws, fresh KV slots,
and the batch bound the KV budget gives."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.generation.base import SamplingParams
from core.generation.engine.forward import GPT2Forward, SeqChunk, dims_of
from core.generation.engine.kv import KVArena
from core.generation.engine.sampling import (
    SamplerState,
    choose_tokens,
    draw_rows,
    full_distribution,
    tied_candidates,
    top_candidates,
)
from core.generation.engine.scheduler import (
    DECODE_POOL_SHARE,
    MAX_BATCH,
    REQUEST_TOKENS,
    Engine,
    EngineConfig,
    EngineRequest,
    auto_max_batch,
)

VOCAB = 1000


def bf16_like_logits(rows: int, seed: int) -> torch.Tensor:
    """Scores rounded to bf16, as the engine's bf16 LM head gives them: many exact ties."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, VOCAB, generator=generator) * 3).bfloat16().float()


def test_ties_at_the_kth_score_are_widened_not_dropped() -> None:
    logits = bf16_like_logits(6, seed=1)
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.95)] * 6
    _, _, ties = top_candidates(logits, params, width=51)
    assert ties  # bf16 rounding ties the 50th score with the 51st in some rows
    probs, ids = tied_candidates(logits[ties], [params[i] for i in ties])
    for position, row in enumerate(ties):
        ours = torch.zeros(VOCAB).index_add_(0, ids[position], probs[position])
        expected = full_distribution(logits[row], params[row])
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
        assert int((ours > 0).sum()) > 50 or params[row].top_p < 1.0


def test_batched_draws_follow_the_distribution_and_skip_zero_columns() -> None:
    probs = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.25, 0.25, 0.5, 0.0]])
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    counts = torch.zeros(2, 4)
    for _ in range(2000):
        for row, column in enumerate(draw_rows(probs, generators)):
            counts[row, column] += 1
    assert counts[0, 2:].sum() == 0 and counts[1, 3] == 0
    torch.testing.assert_close(counts / 2000, probs, atol=0.05, rtol=0)


def test_seeded_rows_draw_the_same_alone_or_batched_with_ties() -> None:
    logits = bf16_like_logits(3, seed=2)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95)

    def state(seed: int) -> SamplerState:
        return SamplerState(params, [7, 8], 2, generator=torch.Generator().manual_seed(seed))

    alone = [choose_tokens(logits[i : i + 1].clone(), [state(10 + i)])[0] for i in range(3)]
    batched = choose_tokens(logits.clone(), [state(10 + i) for i in range(3)])
    assert batched == alone


def test_slots_are_zeroed_the_first_time_they_are_handed_out() -> None:
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)
    arena = KVArena(dims_of(config), 64 * 1024, "cpu", torch.float32)
    arena.buffer.fill_(float("nan"))  # whatever fresh memory held
    first = arena.allocate(20)
    assert first is not None and torch.count_nonzero(arena.view(first)) == 0
    arena.view(first).fill_(2.0)
    arena.free(first)
    again = arena.allocate(20)  # used before: its values are finite, not zeroed again
    assert again is not None and torch.all(arena.view(again) == 2.0)


def test_the_default_batch_bound_is_what_the_kv_budget_holds() -> None:
    assert auto_max_batch(REQUEST_TOKENS * 40 + 5) == 40
    assert auto_max_batch(3) == 1
    assert auto_max_batch(10**9) == MAX_BATCH
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100)
    engine = Engine(
        GPT2Forward(GPT2LMHeadModel(config).eval(), kernels="off"), EngineConfig(kv_budget_mb=16)
    )
    try:
        assert engine.max_batch == auto_max_batch(engine.arena.capacity) > 1
    finally:
        engine.close()
    explicit = Engine(
        GPT2Forward(GPT2LMHeadModel(config).eval()), EngineConfig(max_batch=3, kv_budget_mb=16)
    )
    try:
        assert explicit.max_batch == 3
    finally:
        explicit.close()


def test_the_arena_and_the_decode_pool_share_the_kv_budget() -> None:
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100)
    budget = 16 * 1024 * 1024
    pooled = Engine(
        GPT2Forward(GPT2LMHeadModel(config).eval(), kernels="off"), EngineConfig(kv_budget_mb=16)
    )
    alone = Engine(
        GPT2Forward(GPT2LMHeadModel(config).eval()),
        EngineConfig(kv_budget_mb=16, decode_pool="off"),
    )
    try:
        pool_bound = pooled.forward.decode_slots.max_bytes
        assert pool_bound == int(budget * DECODE_POOL_SHARE) > 0
        assert pooled.arena.budget_bytes + pool_bound <= budget
        assert alone.arena.budget_bytes == budget and alone.forward.decode_slots.max_bytes == 0
    finally:
        pooled.close()
        alone.close()


# --- batched decode attention over the KV pool --------------------------------------------------


def pooled_forward(hf: GPT2LMHeadModel) -> GPT2Forward:
    forward = GPT2Forward(hf, kernels="off")
    forward.decode_slots.max_bytes = 1 << 26
    return forward


def test_decode_pool_logits_match_hugging_face_in_any_chunk_order() -> None:
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300)).eval()
    forward = pooled_forward(hf)
    arena = KVArena(forward.dims, 1 << 22, "cpu", torch.float32)
    blocks = [arena.allocate(cap) for cap in (80, 48, 96)]
    a, b, c = (arena.view(block) for block in blocks if block is not None)
    ids = torch.randint(5, 300, (70,), generator=torch.Generator().manual_seed(1)).tolist()

    def reference(prefix: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return hf(torch.tensor([prefix])).logits[0, -1]

    forward.logits([SeqChunk(a, 0, ids[:40]), SeqChunk(b, 0, ids[:9])], arena.buffer)
    first = forward.logits([SeqChunk(a, 40, ids[40:41]), SeqChunk(b, 9, ids[9:10])], arena.buffer)
    torch.testing.assert_close(first[0], reference(ids[:41]), atol=1e-4, rtol=0)
    assert forward.decode_slots.slots >= 2
    mixed = forward.logits(  # a prompt chunk first, then the two decoding sequences
        [SeqChunk(c, 0, ids[3:30]), SeqChunk(b, 10, ids[10:11]), SeqChunk(a, 41, ids[41:42])],
        arena.buffer,
    )
    torch.testing.assert_close(mixed[0], reference(ids[3:30]), atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[1], reference(ids[:11]), atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[2], reference(ids[:42]), atol=1e-4, rtol=0)
    prefill_only = forward.logits([SeqChunk(c, 27, ids[30:35])], arena.buffer)
    torch.testing.assert_close(prefill_only[0], reference(ids[3:35]), atol=1e-4, rtol=0)
    assert forward.decode_slots.slot_of == {}  # no sequence decoded: every slot released


def test_decoded_kv_lives_in_the_pool_until_the_block_is_retired() -> None:
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300)).eval()
    pooled = pooled_forward(hf)
    plain = GPT2Forward(hf, kernels="off")  # every write into the arena
    arenas = [KVArena(pooled.dims, 1 << 22, "cpu", torch.float32) for _ in range(2)]
    ids = list(range(10, 40))
    views = []
    for forward, arena in zip((pooled, plain), arenas, strict=True):
        block = arena.allocate(48)
        assert block is not None
        view = arena.view(block)
        forward.logits([SeqChunk(view, 0, ids[:20])], arena.buffer)
        for position in range(20, 30):
            forward.logits([SeqChunk(view, position, ids[position : position + 1])], arena.buffer)
        views.append(view)
    pooled_view, plain_view = views
    assert torch.count_nonzero(pooled_view[:, :, :, 20:30]) == 0  # only in the pool so far
    pooled.retire(pooled_view, arenas[0].buffer)
    assert pooled.decode_slots.slot_of == {}
    torch.testing.assert_close(pooled_view[:, :, :, :30], plain_view[:, :, :, :30])


def test_a_pool_too_small_falls_back_to_per_sequence_attention() -> None:
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300)).eval()
    forward = GPT2Forward(hf, kernels="off")
    forward.decode_slots.max_bytes = 1024  # holds no slot
    arena = KVArena(forward.dims, 1 << 22, "cpu", torch.float32)
    block = arena.allocate(64)
    assert block is not None
    ids = list(range(10, 30))
    forward.logits([SeqChunk(arena.view(block), 0, ids[:19])], arena.buffer)
    step = forward.logits([SeqChunk(arena.view(block), 19, ids[19:20])], arena.buffer)
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(step[0], expected, atol=1e-4, rtol=0)
    assert forward.decode_slots.pool is None


async def test_the_engine_on_the_decode_pool_gives_hugging_face_greedy_replies() -> None:
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300)).eval()
    greedy = SamplingParams(
        max_new_tokens=10, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0
    )

    def hf_greedy(prompt: tuple[int, ...]) -> tuple[int, ...]:
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=10, min_new_tokens=10
            )
        return tuple(out[0, len(prompt) :].tolist())

    engine = Engine(GPT2Forward(hf, kernels="off"), EngineConfig(kv_budget_mb=4, decode_pool="on"))
    try:
        prompts = [tuple(range(5 + i, 5 + i + n)) for i, n in enumerate((12, 30, 7))]
        requests = [EngineRequest(p, greedy, cache_key=f"c{i}") for i, p in enumerate(prompts)]
        first = [engine.submit(r) for r in requests[:2]]
        late = engine.submit(requests[2])  # joins while the others decode
        outputs = [h.future.result(timeout=60) for h in [*first, late]]
        assert [o.ids for o in outputs] == [hf_greedy(p) for p in prompts]
        assert engine.forward.decode_slots.pool is not None
        follow = prompts[1] + outputs[1].ids + (40, 41)
        again = await engine.generate(EngineRequest(follow, greedy, cache_key="c1"))
        assert again.reused_tokens >= len(prompts[1]) and again.ids == hf_greedy(follow)
    finally:
        engine.close()


def test_on_a_cpu_the_pool_is_the_attended_span_growing_and_shrinking() -> None:
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300)).eval()
    forward = pooled_forward(hf)
    arena = KVArena(forward.dims, 1 << 22, "cpu", torch.float32)
    short_block, long_block = (arena.allocate(cap) for cap in (64, 96))
    assert short_block is not None and long_block is not None
    short, long = arena.view(short_block), arena.view(long_block)
    ids = torch.randint(5, 300, (80,), generator=torch.Generator().manual_seed(2)).tolist()

    def reference(prefix: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return hf(torch.tensor([prefix])).logits[0, -1]

    forward.logits([SeqChunk(short, 0, ids[:20]), SeqChunk(long, 0, ids[:70])], arena.buffer)
    both = forward.logits(
        [SeqChunk(short, 20, ids[20:21]), SeqChunk(long, 70, ids[70:71])], arena.buffer
    )
    assert forward.decode_slots.length == 80  # 71 keys, rounded up to 16
    assert forward.decode_slots.pool is not None
    first_storage = forward.decode_slots.pool.data_ptr()
    torch.testing.assert_close(both[0], reference(ids[:21]), atol=1e-4, rtol=0)
    torch.testing.assert_close(both[1], reference(ids[:71]), atol=1e-4, rtol=0)
    alone = forward.logits([SeqChunk(short, 21, ids[21:22])], arena.buffer)
    assert forward.decode_slots.length == 32  # the long one left: the pool shrank to 22 keys
    torch.testing.assert_close(alone[0], reference(ids[:22]), atol=1e-4, rtol=0)
    back = forward.logits(
        [SeqChunk(short, 22, ids[22:23]), SeqChunk(long, 71, ids[71:72])], arena.buffer
    )
    torch.testing.assert_close(back[0], reference(ids[:23]), atol=1e-4, rtol=0)
    torch.testing.assert_close(back[1], reference(ids[:72]), atol=1e-4, rtol=0)
    assert forward.decode_slots.pool is not None  # grown back into the first pool's storage
    assert forward.decode_slots.pool.data_ptr() == first_storage
