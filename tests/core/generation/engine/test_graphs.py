"""Decode steps at static shapes (what a CUDA graph captures): padded batches over every pool
slot give Hugging Face's logits while sequences join, leave and grow; the engine's replies are
unchanged; on a GPU the steps are captured and replayed."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.generation.base import SamplingParams
from core.generation.engine.forward import GPT2Forward, SeqChunk
from core.generation.engine.graphs import DecodeGraphs, batch_bucket, graph_capture
from core.generation.engine.kv import KVArena
from core.generation.engine.scheduler import Engine, EngineConfig, EngineRequest

GREEDY = SamplingParams(
    max_new_tokens=10, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0
)


@pytest.fixture(scope="module")
def hf() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300)).eval()


def reference(hf: GPT2LMHeadModel, prefix: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([prefix])).logits[0, -1]


def static_forward(hf: GPT2LMHeadModel) -> GPT2Forward:
    forward = GPT2Forward(hf, kernels="off", graphs="static")
    forward.decode_slots.max_bytes = 1 << 26
    return forward


def graphs_of(forward: GPT2Forward) -> DecodeGraphs:
    assert forward.decode_graphs is not None
    return forward.decode_graphs


def one_block(forward: GPT2Forward) -> tuple[KVArena, torch.Tensor]:
    """An arena with one 64-token block, and the block's view."""
    arena = KVArena(forward.dims, 1 << 22, "cpu", torch.float32)
    block = arena.allocate(64)
    assert block is not None
    return arena, arena.view(block)


def test_batches_pad_to_powers_of_two() -> None:
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 17, 32, 33)] == [1, 2, 4, 4, 8, 32, 32, 64]


def test_graphs_are_captured_on_cuda_only_and_bad_modes_refused() -> None:
    assert graph_capture("auto", torch.device("cuda", 0)) is True
    assert graph_capture("auto", torch.device("cpu")) is None
    assert graph_capture("off", torch.device("cuda", 0)) is None
    assert graph_capture("static", torch.device("cpu")) is False
    with pytest.raises(ValueError, match="KOBOT_ENGINE_GRAPHS"):
        graph_capture("always", torch.device("cpu"))  # type: ignore[arg-type]


def test_with_the_cpu_kernel_no_static_steps_are_kept(hf: GPT2LMHeadModel) -> None:
    assert GPT2Forward(hf, kernels="off").decode_graphs is None  # auto on a CPU
    assert static_forward(hf).decode_graphs is not None


def test_padded_static_steps_match_hugging_face_as_sequences_join_and_leave(
    hf: GPT2LMHeadModel,
) -> None:
    forward = static_forward(hf)
    graphs = graphs_of(forward)
    arena = KVArena(forward.dims, 1 << 22, "cpu", torch.float32)
    blocks = []
    for _ in range(6):
        block = arena.allocate(96)
        assert block is not None
        blocks.append(arena.view(block))
    ids = torch.randint(5, 300, (90,), generator=torch.Generator().manual_seed(3)).tolist()
    lengths = [10, 21, 33, 40, 47, 5]
    forward.logits([SeqChunk(blocks[i], 0, ids[: lengths[i]]) for i in range(5)], arena.buffer)

    def step(active: list[int]) -> None:
        chunks = [SeqChunk(blocks[i], lengths[i], ids[lengths[i] : lengths[i] + 1]) for i in active]
        logits = forward.logits(chunks, arena.buffer)
        for row, index in enumerate(active):
            lengths[index] += 1
            expected = reference(hf, ids[: lengths[index]])
            torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=0)

    for _ in range(2):
        step([0, 1, 2])  # 3 rows padded to 4: one pads into a free slot
    assert graphs.held == 1
    for _ in range(2):
        step([4, 0, 3, 1, 2])  # 5 rows padded to 8, in another order than their slots
    for index in (1, 3):
        forward.retire(blocks[index], arena.buffer)
    forward.logits([SeqChunk(blocks[5], 0, ids[: lengths[5]])], arena.buffer)
    for _ in range(3):
        step([5, 0, 2, 4])  # a new sequence in a slot padding rows wrote into
    assert graphs.steps == 7 and graphs.captured == 0  # eager on a CPU: nothing captured


def test_a_pool_relayout_drops_the_static_steps(hf: GPT2LMHeadModel) -> None:
    forward = static_forward(hf)
    graphs = graphs_of(forward)
    arena, view = one_block(forward)
    ids = list(range(10, 50))
    forward.logits([SeqChunk(view, 0, ids[:14])], arena.buffer)
    for position in range(14, 16):
        forward.logits([SeqChunk(view, position, ids[position : position + 1])], arena.buffer)
    assert graphs.held == 1 and forward.decode_slots.length == 16
    grown = forward.logits([SeqChunk(view, 16, ids[16:17])], arena.buffer)  # 17 keys: 32 long
    assert forward.decode_slots.length == 32 and graphs.held == 1
    torch.testing.assert_close(grown[0], reference(hf, ids[:17]), atol=1e-4, rtol=0)


def test_padding_rows_go_to_a_free_slot_or_the_step_is_left_to_the_eager_path() -> None:
    seen: list[torch.Tensor] = []

    def step(inputs: torch.Tensor, span: int) -> torch.Tensor:
        seen.append(inputs.clone())
        return inputs.T.float()

    graphs = DecodeGraphs(step, torch.device("cpu"), capture=False)
    pool = torch.zeros(1, 2, 4, 1, 16, 8)
    assert graphs.run(pool, [7, 8, 9], [1, 2, 3], [2, 0, 1], None, 16) is None
    out = graphs.run(pool, [7, 8, 9], [1, 2, 3], [2, 0, 1], 3, 16)
    assert out is not None and out.tolist() == [[7, 1, 2], [8, 2, 0], [9, 3, 1]]
    assert seen[-1][:, 3].tolist() == [0, 0, 3]  # token 0 at position 0 of the free slot


def test_a_static_step_that_fails_is_logged_once_and_every_step_then_stays_eager(
    hf: GPT2LMHeadModel, caplog: pytest.LogCaptureFixture
) -> None:
    forward = static_forward(hf)
    graphs = graphs_of(forward)

    def uncapturable(inputs: torch.Tensor, span: int) -> torch.Tensor:
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs.step = uncapturable
    arena, view = one_block(forward)
    ids = list(range(10, 40))
    forward.logits([SeqChunk(view, 0, ids[:20])], arena.buffer)
    with caplog.at_level(logging.WARNING):
        for position in range(20, 23):
            step = forward.logits(
                [SeqChunk(view, position, ids[position : position + 1])], arena.buffer
            )
            torch.testing.assert_close(
                step[0], reference(hf, ids[: position + 1]), atol=1e-4, rtol=0
            )
    warnings = [r for r in caplog.records if "static shapes failed" in r.getMessage()]
    assert len(warnings) == 1 and "stream is capturing" in warnings[0].getMessage()
    assert graphs.failed and graphs.steps == 0 and graphs.held == 0


def hf_greedy(hf: GPT2LMHeadModel, prompt: tuple[int, ...], device: str = "cpu") -> tuple[int, ...]:
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=10,
            min_new_tokens=10,
        )  # fmt: skip
    return tuple(out[0, len(prompt) :].tolist())


def engine_replies(forward: GPT2Forward) -> list[tuple[int, ...]]:
    engine = Engine(forward, EngineConfig(kv_budget_mb=4, decode_pool="on"))
    try:
        prompts = [tuple(range(5 + i, 5 + i + n)) for i, n in enumerate((12, 30, 7))]
        requests = [EngineRequest(p, GREEDY, cache_key=f"c{i}") for i, p in enumerate(prompts)]
        first = [engine.submit(r) for r in requests[:2]]
        late = engine.submit(requests[2])  # joins while the others decode
        return [h.future.result(timeout=120).ids for h in [*first, late]]
    finally:
        engine.close()


def test_the_engine_on_static_steps_gives_hugging_face_greedy_replies(
    hf: GPT2LMHeadModel,
) -> None:
    forward = GPT2Forward(hf, kernels="off", graphs="static")
    replies = engine_replies(forward)
    prompts = [tuple(range(5 + i, 5 + i + n)) for i, n in enumerate((12, 30, 7))]
    assert replies == [hf_greedy(hf, p) for p in prompts]
    assert forward.decode_graphs is not None and forward.decode_graphs.steps >= 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_on_a_gpu_decode_steps_are_captured_and_replies_unchanged(hf: GPT2LMHeadModel) -> None:
    on_gpu = GPT2LMHeadModel(hf.config).eval()
    on_gpu.load_state_dict(hf.state_dict())
    on_gpu = on_gpu.to("cuda")
    captured = GPT2Forward(on_gpu)  # auto: captured on CUDA
    eager = GPT2Forward(on_gpu, graphs="off")
    assert engine_replies(captured) == engine_replies(eager)
    assert captured.decode_graphs is not None and captured.decode_graphs.captured >= 1
