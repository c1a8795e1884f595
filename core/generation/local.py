"""The local backend: a Hugging Face GPT-2 (KoGPT2) run with torch on a dedicated worker thread.

One request goes: check the prompt fits → generate (stopping at a stop string, `</s>`, the
deadline or a cancel) → clean the reply → if it is empty or a repetition loop, try once more with
sampling and stronger penalties → else a friendly fallback. Every exception passes one error
boundary (`classify_error`) and leaves as a `GenerationError`.

Test seams (both documented on the methods): a subclass may override `_generate_ids`, the only
call into the model for one candidate, to return crafted ids or fail or be slow; or
`_logits_processors` to script what the real model generates, through the real `generate` loop
and stopping criteria.

Beyond `generate`: several candidates per attempt (`num_return_sequences`, each row stopped on
its own), `generate_stream` (the first candidate's cleaned text as it grows, reported by the
stopping criteria at each step) and `score` (continuation log-likelihoods in one forward pass).
Both run on the same worker thread as `generate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import re
import threading
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from core.generation.base import (
    BackendInfo,
    FinishReason,
    GenerationBackend,
    GenerationError,
    GenerationErrorKind,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StreamChunk,
)
from core.generation.scoring import continuation_log_probs
from core.generation.tokenizer import (
    DEFAULT_MODEL,
    KoGPT2Tokenizer,
    ModelLoadError,
    ModelSource,
    load_error,
    resolve_model_source,
    tokenizer_from_source,
)

__all__ = [
    "FALLBACK_REPLY",
    "LocalBackend",
    "ModelLoadError",
    "ReplyStoppingCriteria",
    "RunControl",
    "classify_error",
    "clean_reply",
    "compat_jamo",
    "find_stop",
    "generation_config",
    "is_degenerate",
    "is_empty_reply",
    "longest_loop",
    "partial_reply",
    "resolve_device",
    "resolve_dtype",
    "retry_plan",
    "split_reply",
]

logger = logging.getLogger(__name__)

FALLBACK_REPLY = "음… 어떻게 답해야 할지 잘 모르겠어요. 다르게 말씀해 주시겠어요?"
AI_PREFIX = "AI:"
_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_CUDA_PATTERN = re.compile(r"cuda(?::(\d+))?")


# --- device and dtype ------------------------------------------------------------------------


def resolve_device(requested: str, *, cuda_count: int, mps_available: bool) -> str:
    """`auto` → cuda:0, else mps, else cpu; an explicit device must exist (ModelLoadError)."""
    requested = requested.strip().lower()
    if requested == "auto":
        return "cuda:0" if cuda_count > 0 else "mps" if mps_available else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "mps":
        if not mps_available:
            raise ModelLoadError("KOBOT_DEVICE: mps is not available here; use auto or cpu")
        return "mps"
    match = _CUDA_PATTERN.fullmatch(requested)
    if match is None:
        raise ModelLoadError(
            f"KOBOT_DEVICE: must be auto, cpu, mps, cuda or cuda:N (got {requested!r})"
        )
    return _cuda_device(int(match.group(1) or 0), cuda_count)


def _cuda_device(index: int, cuda_count: int) -> str:
    if cuda_count == 0:
        raise ModelLoadError(
            "KOBOT_DEVICE: cuda was asked for but no CUDA GPU is available "
            "(torch.cuda.is_available() is False: no GPU, no driver, or a CPU-only torch build); "
            "use auto or cpu"
        )
    if index >= cuda_count:
        raise ModelLoadError(
            f"KOBOT_DEVICE: cuda:{index} does not exist ({cuda_count} CUDA GPU(s))"
        )
    return f"cuda:{index}"


def available_device(requested: str) -> str:
    """`resolve_device` against this machine's torch."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return resolve_device(
        requested, cuda_count=cuda_count, mps_available=torch.backends.mps.is_available()
    )


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    """`auto` → fp16 on a GPU (cuda, mps), fp32 on the CPU; fp32/fp16/bf16 are taken as given."""
    requested = requested.strip().lower()
    if requested == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    if requested not in _DTYPES:
        raise ModelLoadError(f"KOBOT_DTYPE: must be auto, fp32, fp16 or bf16 (got {requested!r})")
    return _DTYPES[requested]


def dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, known in _DTYPES.items() if known == dtype), str(dtype))


# --- reply text ------------------------------------------------------------------------------

_SPECIAL_TEXT = re.compile(r"</?(?:s|usr|sys|pad|unk|mask|d|unused\d+)>|<\|endoftext\|>")
_LEADING_AI = re.compile(r"^\s*(?:AI\s*:\s*)+")
_INVISIBLE = {
    "\u200e",
    "\u200f",
    "\ufeff",
    *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
}
_CHOSEONG_TO_COMPAT = dict(
    zip(map(chr, range(0x1100, 0x1113)), "ㄱㄲㄴㄷㄸㄹㅁㅂㅃㅅㅆㅇㅈㅉㅊㅋㅌㅍㅎ", strict=True)
)
_LONE_CHOSEONG = re.compile(r"[\u1100-\u1112](?![\u1161-\u1175])")
_LONE_JUNGSEONG = re.compile(r"(?<![\u1100-\u1112])[\u1161-\u1175]")


def stop_markers(stop_strings: Sequence[str]) -> tuple[str, ...]:
    """The strings that end a reply: the request's stop strings plus a stray `AI:`."""
    return tuple(dict.fromkeys(s for s in (*stop_strings, AI_PREFIX) if s))


def strip_leading_ai(text: str) -> str:
    """Drop leading whitespace and any `AI:` prefixes the model repeated from the prompt."""
    return _LEADING_AI.sub("", text)


def find_stop(text: str, markers: Sequence[str]) -> int:
    """Index of the first marker in `text`, or -1."""
    found = [i for i in (text.find(m) for m in markers) if i >= 0]
    return min(found, default=-1)


def remove_controls(text: str) -> str:
    """Drop control characters (line breaks and tabs become spaces), lone surrogates and bidi
    overrides; joiners (ZWJ) and variation selectors stay, so emoji sequences survive."""
    return "".join(" " if ch.isspace() else ch for ch in text if _visible(ch))


def _visible(ch: str) -> bool:
    category = unicodedata.category(ch)
    if category == "Cc":
        return ch.isspace()
    return category != "Cs" and ch not in _INVISIBLE


def compat_jamo(text: str) -> str:
    """Lone conjoining jamo (KoGPT2's NFKC turns ㅋ into ᄏ) back to the letters people type."""
    text = _LONE_CHOSEONG.sub(lambda m: _CHOSEONG_TO_COMPAT[m.group()], text)
    return _LONE_JUNGSEONG.sub(lambda m: chr(ord(m.group()) - 0x1161 + 0x314F), text)


def split_reply(text: str, stop_strings: Sequence[str] = ("User:",)) -> tuple[str, bool]:
    """The cleaned reply, and whether a stop marker cut it (see `clean_reply`)."""
    body = strip_leading_ai(remove_controls(_SPECIAL_TEXT.sub(" ", text)))
    cut = find_stop(body, stop_markers(stop_strings))
    if cut >= 0:
        body = body[:cut]
    return " ".join(compat_jamo(body).split()), cut >= 0


def clean_reply(text: str, stop_strings: Sequence[str] = ("User:",)) -> str:
    """Reply text fit to send: no special tokens or controls, no leading `AI:`, cut at the first
    stop string or stray `AI:`, whitespace collapsed to single spaces."""
    return split_reply(text, stop_strings)[0]


def partial_reply(text: str, stop_strings: Sequence[str] = ("User:",)) -> str:
    """A reply still being generated, cleaned like `clean_reply`, minus a trailing piece that
    may be the start of a stop marker (`Us` of `User:`), so a stream never shows it."""
    cleaned, stopped = split_reply(text, stop_strings)
    if stopped:
        return cleaned
    for marker in stop_markers(stop_strings):
        for n in range(min(len(marker), len(cleaned)), 0, -1):
            if cleaned.endswith(marker[:n]):
                return cleaned[:-n].rstrip()
    return cleaned


# --- degenerate replies ----------------------------------------------------------------------

LOOP_MIN_REPEATS = 3
LOOP_MIN_SPAN = 12
LOOP_MAX_NGRAM = 8
DISTINCT_MIN_TOKENS = 16
DISTINCT_MIN_RATIO = 0.3


def longest_loop(ids: Sequence[int], n: int) -> tuple[int, int]:
    """(repeats, span in tokens) of the longest back-to-back repetition of an `n`-gram."""
    best = run = 0
    for i in range(len(ids) - n):
        run = run + 1 if ids[i] == ids[i + n] else 0
        best = max(best, run)
    return best // n + 1, best + n


def is_degenerate(ids: Sequence[int]) -> bool:
    """A repetition loop: some n-gram (n ≤ 8) repeated back to back ≥ 3 times over ≥ 12 tokens
    (so 'ㅋㅋㅋㅋ' passes but a sentence said three times does not), or ≥ 16 tokens of which
    fewer than 30% are distinct."""
    for n in range(1, LOOP_MAX_NGRAM + 1):
        repeats, span = longest_loop(ids, n)
        if repeats >= LOOP_MIN_REPEATS and span >= LOOP_MIN_SPAN:
            return True
    return len(ids) >= DISTINCT_MIN_TOKENS and len(set(ids)) < DISTINCT_MIN_RATIO * len(ids)


def is_empty_reply(text: str) -> bool:
    """No letter, digit or symbol (emoji count): empty, whitespace or punctuation only."""
    return not any(ch.isalnum() or unicodedata.category(ch).startswith("S") for ch in text)


# --- retries ---------------------------------------------------------------------------------

MAX_ATTEMPTS = 2
RETRY_TEMPERATURE = 0.8
RETRY_REPETITION_PENALTY = 1.3


def is_greedy(params: SamplingParams) -> bool:
    return not params.do_sample or params.temperature <= 0


def retry_params(params: SamplingParams) -> SamplingParams:
    """The second try samples (a greedy retry would repeat itself) with stronger penalties."""
    return dataclasses.replace(
        params,
        do_sample=True,
        temperature=RETRY_TEMPERATURE if is_greedy(params) else params.temperature,
        repetition_penalty=max(params.repetition_penalty, RETRY_REPETITION_PENALTY),
        no_repeat_ngram_size=params.no_repeat_ngram_size or 3,
    )


def retry_seed(seed: int | None, greedy: bool) -> int | None:
    """A seeded request retries with seed + 1; a greedy one with seed 0 so it stays repeatable."""
    if seed is not None:
        return seed + 1
    return 0 if greedy else None


def retry_plan(params: SamplingParams, seed: int | None) -> list[tuple[SamplingParams, int | None]]:
    """(params, seed) for each attempt, first as asked."""
    return [(params, seed), (retry_params(params), retry_seed(seed, is_greedy(params)))]


def generation_config(params: SamplingParams, tokenizer: KoGPT2Tokenizer) -> GenerationConfig:
    """HF generation settings; temperature 0 (or do_sample False) means greedy."""
    options: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "repetition_penalty": params.repetition_penalty,
        "no_repeat_ngram_size": params.no_repeat_ngram_size,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "use_cache": True,
        "do_sample": not is_greedy(params),
    }
    if not is_greedy(params):
        options.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        options.update(num_return_sequences=max(1, params.num_return_sequences))
    return GenerationConfig(**options)


def finish_reason(stopped: bool, hit_eos: bool) -> FinishReason:
    if stopped:
        return FinishReason.STOP
    return FinishReason.EOS if hit_eos else FinishReason.LENGTH


# --- stopping --------------------------------------------------------------------------------


class RunControl:
    """The deadline and cancel flag of one request, shared by the event loop and the worker,
    and (for a streamed request) who hears about the first candidate's new ids at each step."""

    def __init__(self, timeout_s: float, on_ids: Callable[[list[int]], None] | None = None) -> None:
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self._cancelled = threading.Event()
        self.on_ids = on_ids

    def report(self, new_ids: list[int]) -> None:
        """Called on the worker thread with the new ids so far (streaming requests only)."""
        if self.on_ids is not None:
            self.on_ids(new_ids)

    def cancel(self) -> None:
        self._cancelled.set()

    def expired(self) -> bool:
        return self._cancelled.is_set() or time.monotonic() >= self.deadline

    def check(self) -> None:
        """Raise GenerationError(TIMEOUT) once the deadline passed or the request was cancelled."""
        if self.expired():
            raise GenerationError(GenerationErrorKind.TIMEOUT, timeout_detail(self.timeout_s))


def timeout_detail(timeout_s: float) -> str:
    return f"no reply within {timeout_s:g} s (KOBOT_GENERATION_TIMEOUT_S)"


StopReason = Literal["stop", "timeout"]


class ReplyStoppingCriteria(StoppingCriteria):
    """Stops row `row` of the batch at a stop string (or stray `AI:`) in its new text, or when
    `control` expires. Each step decodes only a short tail of the new tokens (the whole text
    during the first few tokens, where a leading `AI:` is not a stop). Row 0's criterion also
    reports the new ids to `control` (streaming)."""

    HEAD_TOKENS = 16

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        prompt_len: int,
        stop_strings: Sequence[str],
        control: RunControl,
        row: int = 0,
    ) -> None:
        self._decode = decode
        self._row = row
        self._prompt_len = prompt_len
        self._markers = stop_markers(stop_strings)
        self._overlap = max(map(len, self._markers)) + 8
        self._control = control
        self._checked = 0
        self.reason: StopReason | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        start = self._window_start()
        tail = input_ids[self._row, self._prompt_len + start :].tolist()
        done = self._should_stop(tail, start)
        if self._row == 0 and self._control.on_ids is not None:
            self._control.report(input_ids[0, self._prompt_len :].tolist())
        flags = torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)
        flags[self._row] = done
        return flags  # type: ignore[return-value]

    def _window_start(self) -> int:
        """Where the text to check starts: 0 at first, later a short overlap before the new ids."""
        start = self._checked - self._overlap
        return start if start >= self.HEAD_TOKENS else 0

    def _should_stop(self, tail: list[int], start: int) -> bool:
        if self._control.expired():
            self.reason = "timeout"
        elif self._has_stop(tail, start):
            self.reason = "stop"
        return self.reason is not None

    def _has_stop(self, tail: list[int], start: int) -> bool:
        self._checked = start + len(tail)
        text = self._decode(tail)
        return find_stop(strip_leading_ai(text) if start == 0 else text, self._markers) >= 0


# --- errors ----------------------------------------------------------------------------------

_DEVICE_WORDS = re.compile(
    r"\b(cuda|cudnn|cublas|cusolver|cusparse|cufft|nccl|hip|rocm|mps|metal|device|accelerator)",
    re.IGNORECASE,
)


def describe(error: BaseException) -> str:
    """`Type: first line of the message`, short, for logs and GenerationError.detail."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or (
        "out of memory" in str(error).lower()
    )


def is_device_error(error: BaseException) -> bool:
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(error, accelerator):
        return True
    return isinstance(error, RuntimeError) and _DEVICE_WORDS.search(str(error)) is not None


def classify_error(error: BaseException) -> GenerationError:
    """The error boundary: OOM → OUT_OF_MEMORY, CUDA/device → DEVICE, anything else INTERNAL."""
    if isinstance(error, GenerationError):
        return error
    if is_out_of_memory(error):
        return GenerationError(GenerationErrorKind.OUT_OF_MEMORY, describe(error))
    if is_device_error(error):
        return GenerationError(GenerationErrorKind.DEVICE, describe(error))
    return GenerationError(GenerationErrorKind.INTERNAL, describe(error))


def boundary_error(error: Exception, action: str) -> GenerationError:
    """`classify_error`, logging anything unexpected and freeing GPU memory after an OOM."""
    mapped = classify_error(error)
    if mapped is not error:
        logger.error("%s failed: %s", action, mapped, exc_info=error)
    if mapped.kind is GenerationErrorKind.OUT_OF_MEMORY:
        free_cuda_cache()
    return mapped


async def updates_until(
    future: asyncio.Future[Any], updates: asyncio.Queue[str], timeout_s: float
) -> AsyncIterator[str]:
    """The texts put in `updates` while `future` runs (only the newest of several waiting);
    GenerationError(TIMEOUT) when it runs longer than `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not future.done():
        getter = asyncio.ensure_future(updates.get())
        try:
            done, _ = await asyncio.wait(
                {future, getter},
                timeout=deadline - loop.time(),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            getter.cancel()
        if not done:
            raise GenerationError(GenerationErrorKind.TIMEOUT, timeout_detail(timeout_s))
        if getter in done and not future.done():
            text = getter.result()
            while not updates.empty():
                text = updates.get_nowait()
            yield text


def free_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- loading ---------------------------------------------------------------------------------


def load_model(source: ModelSource, device: str, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM from a hub id (downloaded with a progress bar) or a folder, ready to run."""
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            source.name, dtype=dtype, local_files_only=source.local_files_only
        )
    except Exception as error:
        raise load_error(source, error) from error
    try:
        loaded.to(device)  # type: ignore[arg-type]  # transformers' decorator hides the signature
    except Exception as error:
        raise ModelLoadError(
            f"KOBOT_DEVICE/KOBOT_DTYPE: could not place the model on {device} as "
            f"{dtype_name(dtype)} ({describe(error)})"
        ) from error
    loaded.eval()
    return loaded


def n_positions_of(config: Any) -> int:
    return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


@contextmanager
def seeded(seed: int | None, device: str) -> Iterator[None]:
    """Reproducible sampling for `seed`, without disturbing the process's global RNG state."""
    if seed is None:
        yield
        return
    place = torch.device(device)
    devices = [place.index or 0] if place.type in {"cuda", "mps"} else []
    with torch.random.fork_rng(devices=devices, device_type=place.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


# --- the backend -----------------------------------------------------------------------------


class LocalBackend(GenerationBackend):
    """KoGPT2 (or any GPT-2 folder in the same format) generating on this machine.

    Construction loads the tokenizer and the model (seconds; call it via `asyncio.to_thread`)
    and raises ModelLoadError with a KOBOT_* hint when that is impossible.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        generation_timeout_s: float = 120.0,
    ) -> None:
        self._model_name = model
        self._device = available_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        source = resolve_model_source(model)
        self._tokenizer = tokenizer_from_source(source)
        self._model: PreTrainedModel | None = load_model(source, self._device, self._dtype)
        self._n_positions = n_positions_of(self._model.config)
        self._vocab_size = int(self._model.config.vocab_size)
        self._check_vocabulary()
        self._timeout_s = generation_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kobot-generate")
        self._running: set[RunControl] = set()
        self._closed = False

    def _check_vocabulary(self) -> None:
        if self._tokenizer.vocab_size > self._vocab_size:
            raise ModelLoadError(
                f"KOBOT_MODEL: the tokenizer has {self._tokenizer.vocab_size} tokens but the model "
                f"only {self._vocab_size}; {self._model_name!r} is not a KoGPT2-format folder"
            )

    @property
    def tokenizer(self) -> KoGPT2Tokenizer:
        return self._tokenizer

    def info(self) -> BackendInfo:
        return BackendInfo(
            name="local",
            model=self._model_name,
            device=self._device,
            dtype=dtype_name(self._dtype),
            n_positions=self._n_positions,
        )

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run `request` on the worker thread; the event loop stays free meanwhile."""
        if self._closed:
            raise GenerationError(GenerationErrorKind.UNAVAILABLE, "the local backend is closed")
        control = RunControl(self._timeout_s)
        future = self._executor.submit(self._guarded_run, request, control)
        self._running.add(control)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self._timeout_s)
        except TimeoutError:
            control.cancel()
            raise GenerationError(
                GenerationErrorKind.TIMEOUT, timeout_detail(self._timeout_s)
            ) from None
        except asyncio.CancelledError:
            control.cancel()
            raise
        finally:
            self._running.discard(control)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """Like `generate` (same worker, retries, cleaning and result), yielding the first
        candidate's cleaned text whenever it changes (only the newest when several are waiting)."""
        if self._closed:
            raise GenerationError(GenerationErrorKind.UNAVAILABLE, "the local backend is closed")
        updates: asyncio.Queue[str] = asyncio.Queue()
        listener = self._stream_listener(request, asyncio.get_running_loop(), updates)
        control = RunControl(self._timeout_s, listener)
        future = asyncio.wrap_future(self._executor.submit(self._guarded_run, request, control))
        self._running.add(control)
        try:
            async for text in updates_until(future, updates, self._timeout_s):
                yield StreamChunk(text)
            result = future.result()
            yield StreamChunk(result.text, result)
        finally:
            if not future.done():
                control.cancel()
            self._running.discard(control)

    async def score(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[float]:
        """Summed log-probabilities of each continuation after its prompt: one forward pass of
        all the pairs, on the worker thread."""
        if self._closed:
            raise GenerationError(GenerationErrorKind.UNAVAILABLE, "the local backend is closed")
        pairs = [(list(p), list(c)) for p, c in zip(prompts, continuations, strict=True)]
        future = self._executor.submit(self._guarded_score, pairs)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self._timeout_s)
        except TimeoutError:
            raise GenerationError(
                GenerationErrorKind.TIMEOUT, timeout_detail(self._timeout_s)
            ) from None

    async def close(self) -> None:
        """Stop running work, shut the worker thread down and free the model."""
        if self._closed:
            return
        self._closed = True
        for control in list(self._running):
            control.cancel()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._model = None
        gc.collect()
        free_cuda_cache()

    # --- on the worker thread ---

    def _guarded_run(self, request: GenerationRequest, control: RunControl) -> GenerationResult:
        """The error boundary: whatever happens leaves as a GenerationError."""
        try:
            return self._run(request, control)
        except Exception as error:
            raise boundary_error(error, "generation") from error

    def _guarded_score(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        try:
            return self._score_pairs(pairs)
        except Exception as error:
            raise boundary_error(error, "scoring") from error

    def _run(self, request: GenerationRequest, control: RunControl) -> GenerationResult:
        prompt = self._checked_prompt(request)
        spent = 0
        for attempt, (params, seed) in enumerate(retry_plan(request.params, request.seed), 1):
            control.check()
            sequences = self._generate_sequences(
                prompt, params, seed, request.stop_strings, control
            )
            spent += sum(map(len, sequences))
            result = self._best_of(sequences, request)
            if result is not None:
                return result
            logger.info("attempt %d/%d gave an empty or looping reply", attempt, MAX_ATTEMPTS)
        return GenerationResult(FALLBACK_REPLY, spent, FinishReason.FALLBACK)

    def _best_of(
        self, sequences: list[list[int]], request: GenerationRequest
    ) -> GenerationResult | None:
        """The first good candidate as the result, the other good ones as its alternatives."""
        good = [
            (ids, result)
            for ids in sequences
            if (result := self._result_from(ids, request.stop_strings)) is not None
        ]
        if not good:
            return None
        texts = [self._spaced(request, ids, result.text) for ids, result in good]
        others = tuple(text for text in dict.fromkeys(texts[1:]) if text != texts[0])
        return dataclasses.replace(good[0][1], text=texts[0], alternatives=others)

    def _spaced(self, request: GenerationRequest, new_ids: Sequence[int], text: str) -> str:
        """For a continuation, the text with a leading space when the model began a new word."""
        if not (request.continuation and text):
            return text
        tail = list(request.prompt_ids[-4:])
        before = self._tokenizer.decode(tail)
        after = self._tokenizer.decode(tail + list(new_ids[:4]))
        starts_word = after.startswith(before) and after[len(before) : len(before) + 1].isspace()
        return f" {text}" if starts_word else text

    def _stream_listener(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        updates: asyncio.Queue[str],
    ) -> Callable[[list[int]], None]:
        """Runs on the worker at each step: the cleaned text so far, sent when it changed."""
        shown = [""]
        eos = self._tokenizer.eos_id

        def listen(new_ids: list[int]) -> None:
            ids = new_ids[: new_ids.index(eos)] if eos in new_ids else new_ids
            text = partial_reply(self._tokenizer.decode(ids), request.stop_strings)
            text = self._spaced(request, ids, text)
            if text != shown[0]:
                shown[0] = text
                with contextlib.suppress(RuntimeError):  # the loop is closing: nobody listens
                    loop.call_soon_threadsafe(updates.put_nowait, text)

        return listen

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        model = self._require_model()
        for prompt, continuation in pairs:
            self._check_scored(prompt, continuation)
        with torch.inference_mode():
            return continuation_log_probs(model, pairs, self._tokenizer.pad_id, self._device)

    def _check_scored(self, prompt: list[int], continuation: list[int]) -> None:
        """A pair to score: both parts non-empty, in the vocabulary, together within the window."""
        ids = prompt + continuation
        if not prompt or not continuation:
            raise GenerationError(GenerationErrorKind.INTERNAL, "empty prompt or continuation")
        if any(not 0 <= i < self._vocab_size for i in ids):
            raise GenerationError(
                GenerationErrorKind.INTERNAL, f"ids outside 0..{self._vocab_size - 1}"
            )
        if len(ids) > self._n_positions:
            raise GenerationError(
                GenerationErrorKind.INTERNAL,
                f"{len(ids)} tokens to score exceed the {self._n_positions}-token window",
            )

    def _checked_prompt(self, request: GenerationRequest) -> list[int]:
        """The prompt ids, refused (INTERNAL) when empty, out of the vocabulary or too long."""
        prompt = list(request.prompt_ids)
        needed = len(prompt) + request.params.max_new_tokens
        vocab = self._vocab_size
        if not prompt:
            raise GenerationError(GenerationErrorKind.INTERNAL, "empty prompt")
        if any(not 0 <= i < vocab for i in prompt):
            raise GenerationError(
                GenerationErrorKind.INTERNAL, f"prompt ids outside 0..{vocab - 1}"
            )
        if needed > self._n_positions:
            raise GenerationError(
                GenerationErrorKind.INTERNAL,
                f"prompt ({len(prompt)}) + max_new_tokens ({request.params.max_new_tokens}) "
                f"exceeds the {self._n_positions}-token window",
            )
        return prompt

    def _generate_sequences(
        self,
        prompt: list[int],
        params: SamplingParams,
        seed: int | None,
        stop_strings: Sequence[str],
        control: RunControl,
    ) -> list[list[int]]:
        """Every candidate of one attempt; a single one comes from `_generate_ids` (the seam)."""
        if is_greedy(params) or params.num_return_sequences <= 1:
            return [self._generate_ids(prompt, params, seed, stop_strings, control)]
        return self._model_sequences(prompt, params, seed, stop_strings, control)

    def _generate_ids(
        self,
        prompt: list[int],
        params: SamplingParams,
        seed: int | None,
        stop_strings: Sequence[str],
        control: RunControl,
    ) -> list[int]:
        """The new token ids the model generates after `prompt` (test seam: override me)."""
        single = dataclasses.replace(params, num_return_sequences=1)
        return self._model_sequences(prompt, single, seed, stop_strings, control)[0]

    def _model_sequences(
        self,
        prompt: list[int],
        params: SamplingParams,
        seed: int | None,
        stop_strings: Sequence[str],
        control: RunControl,
    ) -> list[list[int]]:
        """The new ids of each candidate (`model.generate`, each row stopped on its own)."""
        model = self._require_model()
        config = generation_config(params, self._tokenizer)
        rows = int(config.num_return_sequences or 1)
        criteria = [
            ReplyStoppingCriteria(self._tokenizer.decode, len(prompt), stop_strings, control, row)
            for row in range(rows)
        ]
        input_ids = torch.tensor([prompt], dtype=torch.long, device=self._device)
        with torch.inference_mode(), seeded(seed, self._device):
            output = model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList(criteria),
                logits_processor=self._logits_processors(),
            )
        if any(criterion.reason == "timeout" for criterion in criteria):
            control.check()
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        return [[int(i) for i in row[len(prompt) :].tolist()] for row in sequences]

    def _logits_processors(self) -> LogitsProcessorList | None:
        """Extra logits processors for each attempt: none (test seam to script the output)."""
        return None

    def _require_model(self) -> PreTrainedModel:
        if self._model is None:
            raise GenerationError(GenerationErrorKind.UNAVAILABLE, "the local backend is closed")
        return self._model

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
