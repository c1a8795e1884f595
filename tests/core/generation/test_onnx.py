"""The ONNX export and decoder on the tiny GPT-2: logits and greedy tokens match torch.

Tolerance: the last-position logits of ONNX Runtime and `GPT2LMHeadModel` agree within 1e-4
absolute (logits of magnitude ~1; typically ~3e-7 apart), over a prefill and cached decode steps.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bots.app import build_dialogue_manager
from bots.cli import main as cli_main
from core.generation.base import (
    Attempt,
    GenerationError,
    GenerationErrorKind,
    GenerationRequest,
    SamplingParams,
)
from core.generation.device import load_local_model
from core.generation.errors import ModelLoadError
from core.generation.factory import build_backend
from core.generation.hf_decoder import HFGenerateDecoder
from core.generation.onnx import export as onnx_export
from core.generation.onnx.decoder import (
    OnnxDecoder,
    OnnxSession,
    processed_scores,
    select_providers,
)
from core.generation.onnx.export import ExportReport, export_onnx
from core.generation.onnx.metadata import METADATA_FILE, MODEL_FILE
from core.generation.policy import ReplyBackend
from core.generation.stopping import RunControl
from core.messages import ConversationKey, ReplyKind, Role
from tests.support.dialogue import make_settings, message

pytest.importorskip("onnxruntime")

LOGIT_TOLERANCE = 1e-4
PROMPTS = [
    "다음은 친절한 AI 챗봇과 사용자의 대화입니다.\nUser: 안녕하세요\nAI:",
    "User: 오늘 날씨 어때? 비가 온다던데 우산 챙겨야 할까?\nAI:",
    "User: ㅋㅋ 😀 고마워요\nAI:",
]
PENALIZED = SamplingParams(max_new_tokens=24, temperature=0.0, do_sample=False)
PLAIN = SamplingParams(
    max_new_tokens=24,
    temperature=0.0,
    do_sample=False,
    repetition_penalty=1.0,
    no_repeat_ngram_size=0,
)


@pytest.fixture(scope="module")
def export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportReport:
    return export_onnx(str(tiny_model_dir), tmp_path_factory.mktemp("onnx") / "tiny")


@pytest.fixture(scope="module")
def onnx_backend(export: ExportReport, tiny_model_dir: Path) -> Iterator[OnnxDecoder]:
    decoder = OnnxDecoder(export.folder, model=str(tiny_model_dir), device="cpu")
    yield decoder
    asyncio.run(decoder.close())


@pytest.fixture(scope="module")
def local_backend(tiny_model_dir: Path) -> Iterator[HFGenerateDecoder]:
    """transformers' `generate` on the same model: the reference."""
    decoder = HFGenerateDecoder(load_local_model(str(tiny_model_dir), "cpu"))
    yield decoder
    asyncio.run(decoder.close())


def new_ids(
    decoder: OnnxDecoder | HFGenerateDecoder,
    prompt: list[int],
    params: SamplingParams,
    seed: int | None = None,
    stop_strings: tuple[str, ...] = ("User:",),
) -> tuple[tuple[int, ...] | None, int]:
    """One candidate's new ids (without the EOS) and token count, decoded on this thread."""
    attempt = Attempt(tuple(prompt), params, seed, stop_strings, RunControl(60))
    [candidate] = decoder.decode_now(attempt)
    return candidate.ids, candidate.new_tokens


def test_the_export_folder_is_self_contained(export: ExportReport, tiny_model_dir: Path) -> None:
    names = {p.name for p in export.folder.iterdir()}
    assert {MODEL_FILE, METADATA_FILE, "config.json", "tokenizer.json"} <= names
    meta = json.loads((export.folder / METADATA_FILE).read_text())
    assert (meta["n_layer"], meta["n_head"], meta["head_dim"], meta["n_positions"]) == (
        2,
        2,
        32,
        1024,
    )
    assert meta["source_model"] == str(tiny_model_dir)
    assert export.max_abs_diff is not None and export.max_abs_diff < LOGIT_TOLERANCE


def test_logits_match_torch_over_prefill_and_cached_decoding(
    export: ExportReport, tiny_model_dir: Path, onnx_backend: OnnxDecoder
) -> None:
    ids = onnx_backend.tokenizer.encode_text(PROMPTS[0] + " 반가워요! 오늘은 뭐 하고 지내세요?")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    decoder = OnnxSession(export.folder)
    split = len(ids) - 8
    logits, past = decoder.step(ids[:split], decoder.empty_past())
    got = [logits]
    for token in ids[split:-1]:
        logits, past = decoder.step([token], past)
        got.append(logits)
    assert past[0].shape == (1, 2, len(ids) - 1, 32)
    chunked, chunked_past = decoder.prefill(ids, chunk=7)  # as the backend prefills, in chunks
    got.append(chunked)
    assert chunked_past[-1].shape == (1, 2, len(ids), 32)
    difference = np.abs(np.stack(got) - expected[split - 1 :]).max()
    assert difference < LOGIT_TOLERANCE


@pytest.mark.parametrize("params", [PENALIZED, PLAIN], ids=["penalties", "plain"])
def test_greedy_tokens_are_identical_to_torch(
    onnx_backend: OnnxDecoder, local_backend: HFGenerateDecoder, params: SamplingParams
) -> None:
    for text in PROMPTS:
        prompt = onnx_backend.tokenizer.encode_text(text)
        expected = new_ids(local_backend, prompt, params)
        got = new_ids(onnx_backend, prompt, params)
        assert got == expected and got[1] > 0


def test_sampling_is_seeded_and_top_k_1_is_greedy(onnx_backend: OnnxDecoder) -> None:
    prompt = onnx_backend.tokenizer.encode_text(PROMPTS[1])
    sampled = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=0, top_p=1.0)
    runs = [new_ids(onnx_backend, prompt, sampled, seed, ()) for seed in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    top1 = SamplingParams(max_new_tokens=12, temperature=0.7, top_k=1)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, do_sample=False)
    assert new_ids(onnx_backend, prompt, top1, 5, ()) == new_ids(
        onnx_backend, prompt, greedy, None, ()
    )


@pytest.mark.parametrize(
    "params",
    [
        PENALIZED,
        SamplingParams(temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.3),
        SamplingParams(temperature=1.3, top_k=0, top_p=0.5, no_repeat_ngram_size=2),
        SamplingParams(temperature=1.0, top_k=7, top_p=1.0, repetition_penalty=1.0),
    ],
)
def test_the_numpy_processors_match_transformers(params: SamplingParams) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 51200, generator=generator) * 3
    ids = torch.randint(0, 300, (1, 200), generator=generator)
    ids[0, -2:] = ids[0, 10:12]  # the last bigram occurred before: its successor is banned
    expected = reference_processors(params)(ids, logits.clone())  # type: ignore[arg-type]
    got = processed_scores(logits[0].numpy(), ids[0].numpy(), params)
    assert np.array_equal(np.isinf(got), torch.isinf(expected[0]).numpy())
    finite = ~np.isinf(got)
    assert np.allclose(got[finite], expected[0].numpy()[finite], rtol=1e-6, atol=1e-6)


def reference_processors(params: SamplingParams) -> LogitsProcessorList:
    """What transformers' `generate` builds for `params` (order as in `_get_logits_processor`)."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if params.do_sample and params.temperature > 0:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors


async def test_a_chat_round_trip_matches_transformers_generate(
    export: ExportReport, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        tiny_model_dir, tmp_path, backend="onnx", onnx_dir=str(export.folder), max_new_tokens=16
    )
    backend = await asyncio.to_thread(build_backend, settings)
    assert isinstance(backend.decoder, OnnxDecoder)
    assert (backend.info().name, backend.info().device, backend.info().n_positions) == (
        "onnx",
        "cpu",
        1024,
    )
    manager = await build_dialogue_manager(settings, backend)
    reference = ReplyBackend(HFGenerateDecoder(load_local_model(str(tiny_model_dir), "cpu")))
    local_manager = await build_dialogue_manager(
        make_settings(tiny_model_dir, tmp_path / "local", max_new_tokens=16), reference
    )
    try:
        replies = [await manager.handle(message(t)) for t in ("안녕하세요", "뭐 해요?")]
        local = [await local_manager.handle(message(t)) for t in ("안녕하세요", "뭐 해요?")]
        turns = await manager.storage.recent(ConversationKey("test", "c1", "u1"), 10)
    finally:
        await manager.close()
        await local_manager.close()
    assert [r.kind for r in replies] == [ReplyKind.CHAT] * 2 and all(r.text for r in replies)
    assert [r.text for r in replies] == [r.text for r in local]
    assert [t.role for t in turns] == [Role.USER, Role.AI] * 2
    with pytest.raises(GenerationError) as closed:
        await backend.generate(GenerationRequest((1, 2, 3)))
    assert closed.value.kind is GenerationErrorKind.UNAVAILABLE


def test_a_folder_without_an_export_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"KOBOT_ONNX_DIR.*kobot export-onnx"):
        OnnxDecoder(tmp_path, device="cpu")


def test_cuda_must_exist_when_asked_for() -> None:
    assert select_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert select_providers("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == (
        "CUDAExecutionProvider",
        {"device_id": 1},
    )
    with pytest.raises(ModelLoadError, match="KOBOT_DEVICE"):
        select_providers("cuda", ["CPUExecutionProvider"])


def test_the_onnx_decoder_loads_no_torch() -> None:
    """Serving an export needs onnxruntime and numpy; only exporting needs torch."""
    code = "import sys, core.generation.onnx.decoder; print('torch' in sys.modules)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "False"


def test_the_cli_exports_kobot_model_to_the_folder_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[str, str]] = []

    def fake_export(model: str, out_dir: str) -> ExportReport:
        calls.append((model, out_dir))
        return ExportReport(Path(out_dir), 1.0, 1e-7)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    monkeypatch.setenv("KOBOT_MODEL", "/models/kogpt2")
    monkeypatch.setenv("KOBOT_ONNX_DIR", "from-settings")
    assert cli_main(["export-onnx", "--out", "exported"]) == 0
    assert cli_main(["export-onnx"]) == 0
    assert calls == [("/models/kogpt2", "exported"), ("/models/kogpt2", "from-settings")]
    assert "KOBOT_ONNX_DIR=exported" in capsys.readouterr().out
