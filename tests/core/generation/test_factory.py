"""Building the backend from the settings."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from core.generation.base import GenerationRequest, SamplingParams
from core.generation.cpu_features import cpu_flags, fast_bf16_cpu
from core.generation.engine.decoder import EngineDecoder
from core.generation.engine.kernels.top_k import torch_top_k
from core.generation.errors import ModelLoadError
from core.generation.factory import UnknownBackendError, build_backend
from core.settings import Settings


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def test_builds_the_engine_for_local_off_the_loop(tiny_model_dir: Path) -> None:
    backend = await asyncio.to_thread(
        build_backend, settings(model=str(tiny_model_dir), device="cpu", generation_timeout_s=9)
    )
    try:
        assert isinstance(backend.decoder, EngineDecoder)
        assert backend.policy.timeout_s == 9
        info = backend.info()
        assert (info.name, info.model, info.device, info.dtype) == (
            "local",
            str(tiny_model_dir),
            "cpu",
            "bf16" if fast_bf16_cpu() else "fp32",  # bf16 on a CPU with AMX or AVX-512 BF16
        )
    finally:
        await backend.close()


def test_unknown_backend_names_the_variable() -> None:
    bad = settings().model_copy(update={"backend": "vllm"})
    with pytest.raises(UnknownBackendError, match="KOBOT_BACKEND: unknown backend 'vllm'"):
        build_backend(bad)
    assert issubclass(UnknownBackendError, ModelLoadError)


def test_missing_model_folder_fails(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="KOBOT_MODEL"):
        build_backend(settings(model=str(tmp_path / "nothing"), device="cpu"))


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
async def test_the_engine_builds_its_kernels_into_the_configured_folder(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "kernels"
    chosen = settings(model=str(tiny_model_dir), device="cpu", engine_kernel_dir=str(folder))
    backend = await asyncio.to_thread(build_backend, chosen)
    try:
        assert isinstance(backend.decoder, EngineDecoder)
        assert backend.decoder.engine.forward.attention_kernel is not None
        assert backend.decoder.engine.forward.top_k is not torch_top_k
        panels = "avx512_bf16" in cpu_flags()  # the dense kernel: bf16 on AVX-512 BF16 only
        assert (backend.decoder.engine.forward.linear_kind == "panels") is panels
        built = sorted(path.name.split("-")[0] for path in folder.iterdir())
        assert built == ["attention", *(["dense"] if panels else []), "top_k"]
    finally:
        await backend.close()
    off = settings(model=str(tiny_model_dir), device="cpu", engine_kernels="off")
    backend = await asyncio.to_thread(build_backend, off)
    try:
        assert isinstance(backend.decoder, EngineDecoder)
        assert backend.decoder.engine.forward.attention_kernel is None
        assert backend.decoder.engine.forward.top_k is torch_top_k
        assert backend.decoder.engine.forward.linear_kind != "panels"
    finally:
        await backend.close()


async def test_static_decode_steps_are_configured_by_the_graphs_setting(
    tiny_model_dir: Path,
) -> None:
    chosen = settings(
        model=str(tiny_model_dir), device="cpu", engine_kernels="off", engine_graphs="static"
    )
    backend = await asyncio.to_thread(build_backend, chosen)
    try:
        assert isinstance(backend.decoder, EngineDecoder)
        graphs = backend.decoder.engine.forward.decode_graphs
        assert graphs is not None and not graphs.capture
        params = SamplingParams(max_new_tokens=6, temperature=0.0)
        reply = await backend.generate(GenerationRequest((5, 6, 7, 8), params))
        assert reply.new_tokens >= 2 and graphs.steps >= 1
        assert backend.stats()["decode_graph_steps_total"] == graphs.steps
    finally:
        await backend.close()


async def test_int8_runs_on_kobots_int8_panels_for_a_bf16_model_on_a_vnni_cpu(
    tiny_model_dir: Path,
) -> None:
    chosen = settings(model=str(tiny_model_dir), device="cpu", dtype="bf16", engine_quant="int8")
    backend = await asyncio.to_thread(build_backend, chosen)
    try:
        assert isinstance(backend.decoder, EngineDecoder)
        forward = backend.decoder.engine.forward
        on_panels = {"avx512_bf16", "avx512_vnni"} <= cpu_flags()
        assert (forward.panel_kernel == "int8") is on_panels
        assert forward.linear_kind == ("panels" if on_panels else "int8")
        params = SamplingParams(max_new_tokens=6, temperature=0.0)
        reply = await backend.generate(GenerationRequest((5, 6, 7, 8), params))
        assert reply.new_tokens >= 2
    finally:
        await backend.close()
