"""The ONNX Runtime backend: KoGPT2 exported by `kobot export-onnx`, decoded with its KV cache.

One request goes as in the local backend: check the prompt fits → prefill the prompt in one
forward → decode token by token (the same logits processors as transformers' `generate`:
repetition penalty, no-repeat n-grams, then temperature, top-k and top-p when sampling) until a
stop string, `</s>`, `max_new_tokens` or the deadline → clean the reply → one retry on an empty or
looping reply → else the friendly fallback. Reply cleaning, stopping, retries and the error
boundary are the local backend's functions; only the forward pass differs.

The sampling step runs in numpy (see `processed_scores`), the forward in ONNX Runtime. Runs on the
CPU execution provider, or CUDA when onnxruntime-gpu provides it (the KV cache then
travels host ↔ device each step through numpy: correct, but not the fast path on a GPU).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.generation.base import (
    BackendInfo,
    FinishReason,
    GenerationBackend,
    GenerationError,
    GenerationErrorKind,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from core.generation.local import (
    FALLBACK_REPLY,
    MAX_ATTEMPTS,
    ReplyStoppingCriteria,
    RunControl,
    classify_error,
    finish_reason,
    is_degenerate,
    is_empty_reply,
    is_greedy,
    retry_plan,
    split_reply,
    timeout_detail,
)
from core.generation.onnx_export import (
    MODEL_FILE,
    OnnxMetadata,
    input_names,
    output_names,
    read_metadata,
)
from core.generation.tokenizer import KoGPT2Tokenizer, ModelLoadError, load_tokenizer

__all__ = [
    "OnnxBackend",
    "OnnxDecoder",
    "decode_ids",
    "pick_token",
    "processed_scores",
    "select_providers",
]

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 256
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
Past = list[np.ndarray]
Provider = str | tuple[str, dict[str, Any]]


def import_onnxruntime() -> Any:
    """The onnxruntime module, or ModelLoadError saying what to install."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ModelLoadError(
            "KOBOT_BACKEND=onnx needs onnxruntime: pip install onnxruntime "
            "(or onnxruntime-gpu for CUDA)"
        ) from error
    return onnxruntime


def select_providers(device: str, available: Sequence[str]) -> list[Provider]:
    """Execution providers for KOBOT_DEVICE: auto → CUDA when available, else the CPU."""
    device = device.strip().lower()
    if device in {"cpu", "mps"} or (device == "auto" and CUDA not in available):
        return [CPU]
    if CUDA not in available:
        raise ModelLoadError(
            f"KOBOT_DEVICE: {device} was asked for but onnxruntime has no CUDA execution "
            "provider here (install onnxruntime-gpu); use auto or cpu"
        )
    index = int(device.partition(":")[2] or 0)
    return [(CUDA, {"device_id": index}), CPU]


def provider_device(providers: Sequence[Provider]) -> str:
    first = providers[0]
    if isinstance(first, tuple):
        return f"cuda:{first[1].get('device_id', 0)}"
    return "cpu"


class OnnxDecoder:
    """An ONNX Runtime session over an export folder: `step` is one forward with the KV cache."""

    def __init__(
        self,
        folder: str | Path,
        providers: Sequence[Provider] = (CPU,),
        threads: int | None = None,
    ) -> None:
        ort = import_onnxruntime()
        self.meta: OnnxMetadata = read_metadata(folder)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads spin-wait by default, burning the cores between forwards that the
        # sampling step, the event loop and the rest of the bot need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(Path(folder) / MODEL_FILE), options, providers=list(providers)
        )
        self._past_names = input_names(self.meta.n_layer)[1:]
        self._outputs = output_names(self.meta.n_layer)

    def empty_past(self, batch: int = 1) -> Past:
        shape = (batch, self.meta.n_head, 0, self.meta.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self._past_names]

    def prefill(self, ids: Sequence[int], chunk: int = PREFILL_CHUNK) -> tuple[np.ndarray, Past]:
        """Logits after the prompt `ids` and its cache, computed `chunk` tokens at a time: the
        unfused attention then skips most of the masked half of the score matrix (900 tokens:
        ~20% faster than one forward on 2 cores)."""
        if not ids:
            raise ValueError("an empty prompt has no logits")
        past = self.empty_past()
        for start in range(0, len(ids), chunk):
            logits, past = self.step(ids[start : start + chunk], past)
        return logits, past

    def step(self, ids: Sequence[int], past: Past) -> tuple[np.ndarray, Past]:
        """Logits after `ids` (vocab,), and the cache extended by them."""
        feed: dict[str, np.ndarray] = {"input_ids": np.asarray([ids], dtype=np.int64)}
        feed.update(zip(self._past_names, past, strict=True))
        logits, *present = self.session.run(self._outputs, feed)
        return logits[0], present


# --- decoding --------------------------------------------------------------------------------
# The logits processors of transformers' `generate`, in its order, in numpy: small single-threaded
# array ops (torch's would hop through its thread pool for each 51,200-wide op between two ORT
# forwards, which costs milliseconds per token on a busy 2-core machine). Tested against
# transformers' own processors.


def repetition_penalty(scores: np.ndarray, ids: np.ndarray, penalty: float) -> None:
    """Seen tokens: positive logits divided by `penalty`, negative ones multiplied (in place)."""
    seen = np.unique(ids)
    picked = scores[seen]
    scores[seen] = np.where(picked < 0, picked * penalty, picked / penalty)


def ban_repeated_ngrams(scores: np.ndarray, ids: np.ndarray, size: int) -> None:
    """Tokens that would complete an n-gram already in `ids` get -inf (in place)."""
    if len(ids) < size:
        return
    windows = np.lib.stride_tricks.sliding_window_view(ids, size)
    prefix = ids[len(ids) + 1 - size :]
    matches = (windows[:, :-1] == prefix).all(axis=1)
    scores[windows[matches, -1]] = -np.inf


def top_k_filter(scores: np.ndarray, k: int) -> None:
    """Keep the `k` highest logits (ties with the k-th included)."""
    k = min(k, scores.size)
    kth = np.partition(scores, scores.size - k)[scores.size - k]
    scores[scores < kth] = -np.inf


def top_p_filter(scores: np.ndarray, top_p: float) -> None:
    """Keep the smallest set of top tokens whose probability reaches `top_p` (at least one)."""
    order = np.argsort(scores, kind="stable")
    probs = softmax(scores[order])
    remove = np.cumsum(probs) <= 1 - top_p
    remove[-1] = False
    scores[order[remove]] = -np.inf


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


def processed_scores(logits: np.ndarray, ids: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The next-token scores after the penalties and, when sampling, the warpers."""
    scores = np.array(logits, dtype=np.float32)
    if params.repetition_penalty != 1.0:
        repetition_penalty(scores, ids, params.repetition_penalty)
    if params.no_repeat_ngram_size > 0:
        ban_repeated_ngrams(scores, ids, params.no_repeat_ngram_size)
    if is_greedy(params):
        return scores
    if params.temperature != 1.0:
        scores /= np.float32(params.temperature)
    if params.top_k > 0:
        top_k_filter(scores, params.top_k)
    if params.top_p < 1.0:
        top_p_filter(scores, params.top_p)
    return scores


def pick_token(scores: np.ndarray, greedy: bool, rng: np.random.Generator) -> int:
    if greedy:
        return int(np.argmax(scores))
    cumulative = np.cumsum(softmax(scores.astype(np.float64)))
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(index, scores.size - 1)


def decode_ids(
    decoder: OnnxDecoder,
    prompt: Sequence[int],
    params: SamplingParams,
    stopper: ReplyStoppingCriteria,
    eos_id: int,
    seed: int | None = None,
) -> list[int]:
    """New token ids after `prompt`, ending with `</s>`, a stop, `max_new_tokens` or timeout."""
    rng = np.random.default_rng(seed)
    ids = np.empty(len(prompt) + params.max_new_tokens, dtype=np.int64)
    ids[: len(prompt)] = prompt
    length = len(prompt)
    logits, past = decoder.prefill(prompt)
    while True:
        token = pick_token(processed_scores(logits, ids[:length], params), is_greedy(params), rng)
        ids[length] = token
        length += 1
        done = length - len(prompt) >= params.max_new_tokens
        if token == eos_id or done or _stops(stopper, ids[:length]):
            return ids[len(prompt) : length].tolist()
        logits, past = decoder.step([token], past)


def _stops(stopper: ReplyStoppingCriteria, ids: np.ndarray) -> bool:
    return bool(stopper(torch.from_numpy(ids)[None], None)[0])  # type: ignore[arg-type]


# --- the backend -----------------------------------------------------------------------------


class OnnxBackend(GenerationBackend):
    """KoGPT2 exported to ONNX (`kobot export-onnx`), run with onnxruntime on a worker thread.

    Construction loads the session (seconds; call it via `asyncio.to_thread`) and raises
    ModelLoadError naming KOBOT_ONNX_DIR when the folder holds no export.
    """

    def __init__(
        self,
        onnx_dir: str | Path,
        *,
        model: str | None = None,
        device: str = "auto",
        generation_timeout_s: float = 120.0,
    ) -> None:
        ort = import_onnxruntime()
        self._folder = Path(onnx_dir)
        meta = read_metadata(self._folder)
        self._model_name = model or meta.source_model or str(self._folder)
        self._warn_if_other_model(model, meta)
        self._tokenizer = self._load_tokenizer(model)
        self._providers = select_providers(device, ort.get_available_providers())
        self._decoder: OnnxDecoder | None = OnnxDecoder(self._folder, self._providers)
        self._meta = meta
        self._check_vocabulary()
        self._timeout_s = generation_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kobot-onnx")
        self._running: set[RunControl] = set()
        self._closed = False

    def _load_tokenizer(self, model: str | None) -> KoGPT2Tokenizer:
        """The tokenizer saved with the export, else KOBOT_MODEL's."""
        if (self._folder / "tokenizer.json").is_file():
            return load_tokenizer(str(self._folder))
        return load_tokenizer(model or self._model_name)

    def _warn_if_other_model(self, model: str | None, meta: OnnxMetadata) -> None:
        if model and meta.source_model and model != meta.source_model:
            logger.warning(
                "KOBOT_ONNX_DIR %s was exported from %r, not KOBOT_MODEL %r",
                self._folder,
                meta.source_model,
                model,
            )

    def _check_vocabulary(self) -> None:
        if self._tokenizer.vocab_size > self._meta.vocab_size:
            raise ModelLoadError(
                f"KOBOT_ONNX_DIR: the tokenizer has {self._tokenizer.vocab_size} tokens but the "
                f"exported model only {self._meta.vocab_size}"
            )

    @property
    def tokenizer(self) -> KoGPT2Tokenizer:
        return self._tokenizer

    def info(self) -> BackendInfo:
        return BackendInfo(
            name="onnx",
            model=self._model_name,
            device=provider_device(self._providers),
            dtype="fp32",
            n_positions=self._meta.n_positions,
        )

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run `request` on the worker thread; the event loop stays free meanwhile."""
        if self._closed:
            raise GenerationError(GenerationErrorKind.UNAVAILABLE, "the onnx backend is closed")
        control = RunControl(self._timeout_s)
        future = self._executor.submit(self._guarded_run, request, control)
        self._running.add(control)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self._timeout_s)
        except TimeoutError:
            raise GenerationError(
                GenerationErrorKind.TIMEOUT, timeout_detail(self._timeout_s)
            ) from None
        finally:
            control.cancel()
            self._running.discard(control)

    async def close(self) -> None:
        """Stop running work, shut the worker thread down and drop the session."""
        if self._closed:
            return
        self._closed = True
        for control in list(self._running):
            control.cancel()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._decoder = None

    # --- on the worker thread ---

    def _guarded_run(self, request: GenerationRequest, control: RunControl) -> GenerationResult:
        try:
            return self._run(request, control)
        except Exception as error:
            mapped = classify_error(error)
            if mapped is not error:
                logger.error("onnx generation failed: %s", mapped, exc_info=error)
            raise mapped from error

    def _run(self, request: GenerationRequest, control: RunControl) -> GenerationResult:
        prompt = self._checked_prompt(request)
        spent = 0
        for attempt, (params, seed) in enumerate(retry_plan(request.params, request.seed), 1):
            control.check()
            new_ids = self.generate_ids(prompt, params, seed, request.stop_strings, control)
            spent += len(new_ids)
            result = self._result_from(new_ids, request.stop_strings)
            if result is not None:
                return result
            logger.info("attempt %d/%d gave an empty or looping reply", attempt, MAX_ATTEMPTS)
        return GenerationResult(FALLBACK_REPLY, spent, FinishReason.FALLBACK)

    def _checked_prompt(self, request: GenerationRequest) -> list[int]:
        """The prompt ids, refused (INTERNAL) when empty, out of the vocabulary or too long."""
        prompt = list(request.prompt_ids)
        vocab, window = self._meta.vocab_size, self._meta.n_positions
        if not prompt:
            raise GenerationError(GenerationErrorKind.INTERNAL, "empty prompt")
        if any(not 0 <= i < vocab for i in prompt):
            raise GenerationError(
                GenerationErrorKind.INTERNAL, f"prompt ids outside 0..{vocab - 1}"
            )
        if len(prompt) + request.params.max_new_tokens > window:
            raise GenerationError(
                GenerationErrorKind.INTERNAL,
                f"prompt ({len(prompt)}) + max_new_tokens ({request.params.max_new_tokens}) "
                f"exceeds the {window}-token window",
            )
        return prompt

    def generate_ids(
        self,
        prompt: list[int],
        params: SamplingParams,
        seed: int | None,
        stop_strings: Sequence[str],
        control: RunControl,
    ) -> list[int]:
        """The new token ids after `prompt` (what `LocalBackend._generate_ids` returns)."""
        if self._decoder is None:
            raise GenerationError(GenerationErrorKind.UNAVAILABLE, "the onnx backend is closed")
        stopper = ReplyStoppingCriteria(self._tokenizer.decode, len(prompt), stop_strings, control)
        new_ids = decode_ids(self._decoder, prompt, params, stopper, self._tokenizer.eos_id, seed)
        if stopper.reason == "timeout":
            control.check()
        return new_ids

    def _result_from(
        self, new_ids: list[int], stop_strings: Sequence[str]
    ) -> GenerationResult | None:
        """The cleaned result, or None when the reply is empty or degenerate."""
        eos = self._tokenizer.eos_id
        ids = new_ids[: new_ids.index(eos)] if eos in new_ids else new_ids
        text, stopped = split_reply(self._tokenizer.decode(ids), stop_strings)
        if is_empty_reply(text) or is_degenerate(self._tokenizer.encode_text(text)):
            return None
        return GenerationResult(text, len(new_ids), finish_reason(stopped, eos in new_ids))
