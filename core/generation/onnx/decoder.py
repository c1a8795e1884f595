"""The ONNX Runtime decoder: KoGPT2 exported by `kobot export-onnx`, decoded with its KV cache.

One attempt goes: prefill the prompt → decode token by token (the same logits processors as
transformers' `generate`: repetition penalty, no-repeat n-grams, then temperature, top-k and
top-p when sampling) until `</s>`, `max_new_tokens` or the shared `StopRule` (a stop string, the
deadline). The reply policy does the rest, as for every decoder. Attempts run one at a time on
one worker thread, awaited as futures.

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

from core.generation.base import (
    Attempt,
    BackendInfo,
    Candidate,
    ModelLimits,
    SamplingParams,
    is_greedy,
)
from core.generation.device import parse_device
from core.generation.errors import ModelLoadError
from core.generation.onnx.metadata import (
    MODEL_FILE,
    OnnxMetadata,
    input_names,
    output_names,
    read_metadata,
)
from core.generation.stopping import StopRule, stop_rules, stopped_candidates
from core.generation.tokenizer import KoGPT2Tokenizer, load_tokenizer

__all__ = [
    "OnnxDecoder",
    "OnnxSession",
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
    try:
        spec = parse_device(device)
    except ValueError as error:
        raise ModelLoadError(f"KOBOT_DEVICE: {error}") from None
    if spec.kind in {"cpu", "mps"} or (spec.kind == "auto" and CUDA not in available):
        return [CPU]
    if CUDA not in available:
        raise ModelLoadError(
            f"KOBOT_DEVICE: {device.strip().lower()} was asked for but onnxruntime has no CUDA "
            "execution provider here (install onnxruntime-gpu); use auto or cpu"
        )
    return [(CUDA, {"device_id": spec.index}), CPU]


def provider_device(providers: Sequence[Provider]) -> str:
    first = providers[0]
    if isinstance(first, tuple):
        return f"cuda:{first[1].get('device_id', 0)}"
    return "cpu"


class OnnxSession:
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
    decoder: OnnxSession,
    prompt: Sequence[int],
    params: SamplingParams,
    stopper: StopRule,
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
        if token == eos_id or done or stopper(ids[len(prompt) : length].tolist()):
            return ids[len(prompt) : length].tolist()
        logits, past = decoder.step([token], past)


# --- the decoder -----------------------------------------------------------------------------


class OnnxDecoder:
    """KoGPT2 exported to ONNX (`kobot export-onnx`), as a `Decoder` on one worker thread.

    Construction loads the session (seconds; call it off the loop) and raises ModelLoadError
    naming KOBOT_ONNX_DIR when the folder holds no export.
    """

    def __init__(
        self, onnx_dir: str | Path, *, model: str | None = None, device: str = "auto"
    ) -> None:
        ort = import_onnxruntime()
        self._folder = Path(onnx_dir)
        self._meta = read_metadata(self._folder)
        self._model_name = model or self._meta.source_model or str(self._folder)
        self._warn_if_other_model(model)
        self._tokenizer = self._load_tokenizer(model)
        self._providers = select_providers(device, ort.get_available_providers())
        self.session = OnnxSession(self._folder, self._providers)
        self._check_vocabulary()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kobot-onnx")

    def _load_tokenizer(self, model: str | None) -> KoGPT2Tokenizer:
        """The tokenizer saved with the export, else KOBOT_MODEL's."""
        if (self._folder / "tokenizer.json").is_file():
            return load_tokenizer(str(self._folder))
        return load_tokenizer(model or self._model_name)

    def _warn_if_other_model(self, model: str | None) -> None:
        source = self._meta.source_model
        if model and source and model != source:
            logger.warning(
                "KOBOT_ONNX_DIR %s was exported from %r, not KOBOT_MODEL %r",
                self._folder,
                source,
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

    def limits(self) -> ModelLimits:
        return ModelLimits(self._meta.n_positions, self._meta.vocab_size)

    def info(self) -> BackendInfo:
        return BackendInfo(
            name="onnx",
            model=self._model_name,
            device=provider_device(self._providers),
            dtype="fp32",
            n_positions=self._meta.n_positions,
        )

    async def decode(self, attempt: Attempt) -> list[Candidate]:
        """One candidate (ONNX decodes a single sequence per attempt)."""
        return await asyncio.wrap_future(self._executor.submit(self.decode_now, attempt))

    def decode_now(self, attempt: Attempt) -> list[Candidate]:
        """The candidate of `attempt`, on the calling thread."""
        tokenizer = self._tokenizer
        [stopper] = stop_rules(tokenizer.decode, attempt, 1)
        prompt, params = list(attempt.prompt_ids), attempt.params
        new_ids = decode_ids(self.session, prompt, params, stopper, tokenizer.eos_id, attempt.seed)
        return stopped_candidates(tokenizer, [new_ids], [stopper], attempt.control)

    def stats(self) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        """Stop the worker thread (the running attempt stops at its next token)."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
