"""The remote decoder: an OpenAI-compatible `/v1/completions` server (`vllm serve
skt/kogpt2-base-v2`), shared by several bot workers: the scale-out path past one GPU.

Trimming stays exact: the prompt is tokenized here with KOBOT_MODEL's tokenizer and sent as token
ids (`"prompt": [ids]`, which vLLM accepts), so the server sees exactly the counted tokens. vLLM's
extra sampling parameters (`top_k`, `repetition_penalty`, `skip_special_tokens`…) ride in the same
body; `no_repeat_ngram_size` has no vLLM equivalent and is not sent. The reply policy cleans,
judges and retries the text as for every decoder. Imports no torch (the tokenizer is loaded with
`tokenizers`/`transformers` only when the factory builds it).

Failures: each HTTP try has a timeout (KOBOT_BACKEND_TIMEOUT_S); connection errors, timeouts,
5xx and 429 are retried (KOBOT_BACKEND_RETRIES) with exponential backoff and jitter, honouring
Retry-After, all within KOBOT_GENERATION_TIMEOUT_S. A circuit breaker opens after
KOBOT_BACKEND_BREAKER_FAILURES consecutive failed tries: for KOBOT_BACKEND_BREAKER_COOLDOWN_S
requests fail at once with GenerationError(UNAVAILABLE) (the dialogue manager answers politely),
then one trial request decides whether it closes again. The breaker is per process: it only saves
this worker from waiting on a dead server, nothing depends on it being shared.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
from pydantic import SecretStr
from yarl import URL

from core.generation.base import (
    Attempt,
    BackendInfo,
    Candidate,
    Control,
    FinishReason,
    GenerationError,
    GenerationErrorKind,
    ModelLimits,
    ReplyTokenizer,
    SamplingParams,
    is_greedy,
)
from core.generation.device import model_window
from core.generation.errors import ModelLoadError, timeout_error

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "OpenAICompletionsDecoder",
    "RetryPolicy",
    "completion_body",
    "completions_url",
    "parse_retry_after",
]

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


# --- the request -----------------------------------------------------------------------------


def completions_url(base: str) -> str:
    """`http://host:8000`, `…/v1` or `…/v1/completions` → the completions endpoint."""
    url = base.strip().rstrip("/")
    if url.endswith("/completions"):
        return url
    return f"{url}/completions" if url.endswith("/v1") else f"{url}/v1/completions"


def completion_body(
    model: str,
    prompt: Sequence[int],
    params: SamplingParams,
    stop_strings: Sequence[str],
    seed: int | None = None,
) -> dict[str, Any]:
    """The JSON body: OpenAI's fields plus vLLM's extra sampling parameters.

    Special tokens are kept in the text (KoGPT2 flags its emoji as special, and vLLM's default
    `skip_special_tokens` would drop them); `clean_reply` removes the control tokens' text.
    """
    greedy = is_greedy(params)
    body: dict[str, Any] = {
        "model": model,
        "prompt": [int(i) for i in prompt],
        "max_tokens": params.max_new_tokens,
        "temperature": 0.0 if greedy else params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "n": 1,
        "stream": False,
        "stop": [s for s in stop_strings if s],
        "repetition_penalty": params.repetition_penalty,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
    }
    if not greedy and params.top_k > 0:
        body["top_k"] = params.top_k
    if seed is not None:
        body["seed"] = seed
    return body


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    completion_tokens: int | None


def parse_completion(data: Any) -> Completion:
    """The first choice of a completions response; ValueError when it is not one."""
    try:
        choice = data["choices"][0]
        text = choice["text"]
        usage = data.get("usage") or {}
    except (KeyError, IndexError, TypeError, AttributeError) as error:
        raise ValueError(f"not a completions response ({describe_json(data)})") from error
    if not isinstance(text, str):
        raise ValueError("the completion's text is not a string")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return Completion(
        text,
        choice.get("finish_reason"),
        choice.get("stop_reason"),
        tokens if isinstance(tokens, int) else None,
    )


def describe_json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)[:200] if data is not None else "empty"


def finish_of(completion: Completion) -> FinishReason:
    """`stop` with a stop string → STOP; `stop` at `</s>` → EOS; else LENGTH."""
    if completion.finish_reason == "stop" and completion.stop_reason is not None:
        return FinishReason.STOP
    return FinishReason.EOS if completion.finish_reason == "stop" else FinishReason.LENGTH


# --- retries ---------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter: try n waits between half and all of base × 2ⁿ (capped);
    a server's Retry-After wins when longer."""

    retries: int = 2
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        ceiling = min(self.max_delay_s, self.base_delay_s * 2**retry)
        backoff = ceiling / 2 * (1 + random.random())
        return max(backoff, retry_after) if retry_after is not None else backoff


# --- the circuit breaker ---------------------------------------------------------------------


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `cooldown_s` lets one trial through
    (half-open): its success closes the breaker, its failure opens it for another cool-down."""

    def __init__(self, failures: int, cooldown_s: float, clock: Clock = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        cooled = self._clock() - self._opened_at >= self.cooldown_s
        return BreakerState.HALF_OPEN if cooled else BreakerState.OPEN

    def retry_in(self) -> float:
        """Seconds until the next trial is allowed (0 when closed)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - self._clock())

    def admit(self) -> bool:
        """Whether a try may go out now; a half-open breaker admits one trial at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._trial:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial = False

    def failure(self) -> None:
        self._failures += 1
        reopen = self._trial or (self._opened_at is None and self._failures >= self.threshold)
        self._trial = False
        if reopen:
            self._opened_at = self._clock()
            logger.warning(
                "circuit breaker open for %g s after %d failures", self.cooldown_s, self._failures
            )

    def abandon(self) -> None:
        """A try ended without an answer either way (cancelled): free the trial slot."""
        self._trial = False


# --- failures --------------------------------------------------------------------------------


class TryFailed(Exception):
    """One HTTP try failed in a way worth retrying (connection, timeout, 5xx, 429)."""

    def __init__(self, detail: str, *, timeout: bool = False, retry_after: float | None = None):
        super().__init__(detail)
        self.detail = detail
        self.timeout = timeout
        self.retry_after = retry_after


def status_error(status: int, body: str, retry_after: float | None) -> Exception:
    """A non-200 answer: retryable (TryFailed) or a GenerationError that retrying won't fix."""
    detail = f"HTTP {status} from the generation server: {body[:200]}"
    if status in RETRYABLE_STATUS or status >= 500:
        return TryFailed(detail, retry_after=retry_after)
    if status in {401, 403}:
        detail += " (check KOBOT_BACKEND_API_KEY)"
    elif status == 404:
        detail += " (check KOBOT_BACKEND_URL and KOBOT_BACKEND_MODEL)"
    return GenerationError(GenerationErrorKind.INTERNAL, detail)


def final_error(failure: TryFailed, tries: int) -> GenerationError:
    kind = GenerationErrorKind.TIMEOUT if failure.timeout else GenerationErrorKind.UNAVAILABLE
    return GenerationError(kind, f"{failure.detail} (after {tries} tries)")


# --- the backend -----------------------------------------------------------------------------


class OpenAICompletionsDecoder:
    """Decoding on an OpenAI-compatible completions server (vLLM), tokenized here.

    Construction never contacts the server. `sleep` and `clock` are test seams (backoff waits,
    the breaker's clock).
    """

    def __init__(
        self,
        url: str,
        *,
        model: str,
        tokenizer: ReplyTokenizer,
        served_model: str | None = None,
        api_key: SecretStr | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        n_positions: int | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._url = completions_url(check_url(url))
        self._where = server_name(self._url)
        self._served_model = served_model or model
        self._headers = auth_headers(api_key)
        self._timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.breaker = breaker or CircuitBreaker(failures=5, cooldown_s=30.0)
        self._tokenizer = tokenizer
        self._n_positions = model_window(model, n_positions)
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    @property
    def tokenizer(self) -> ReplyTokenizer:
        return self._tokenizer

    def limits(self) -> ModelLimits:
        return ModelLimits(self._n_positions, None)

    def info(self) -> BackendInfo:
        return BackendInfo(
            name="openai",
            model=self._served_model,
            device=self._where,
            dtype="remote",
            n_positions=self._n_positions,
        )

    def stats(self) -> dict[str, float]:
        return {"breaker_open": float(self.breaker.state is not BreakerState.CLOSED)}

    async def close(self) -> None:
        """Close the HTTP connections."""
        if self._session is not None and self._session_loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None

    async def decode(self, attempt: Attempt) -> list[Candidate]:
        """One completion from the server (HTTP retries and the breaker included)."""
        body = completion_body(
            self._served_model,
            attempt.prompt_ids,
            attempt.params,
            attempt.stop_strings,
            attempt.seed,
        )
        completion = parse_or_fail(await self._complete(body, attempt.control))
        tokens = completion.completion_tokens
        if tokens is None:
            tokens = len(self._tokenizer.encode_text(completion.text))
        return [Candidate(completion.text, tokens, finish_of(completion))]

    # --- HTTP with retries and the breaker ---

    async def _complete(self, body: dict[str, Any], control: Control) -> Any:
        """The server's JSON answer, after retries; GenerationError when there is none."""
        deadline = control.deadline
        retry = 0
        while True:
            if time.monotonic() >= deadline:
                raise timeout_error(control.timeout_s)
            self._admit()
            try:
                return await self._try(body, deadline)
            except TryFailed as failure:
                if retry >= self.retry.retries:
                    raise final_error(failure, retry + 1) from None
                await self._back_off(retry, failure, deadline)
            retry += 1

    def _admit(self) -> None:
        if not self.breaker.admit():
            raise GenerationError(
                GenerationErrorKind.UNAVAILABLE,
                f"the generation server {self._where} is unavailable (circuit open, next try in "
                f"{self.breaker.retry_in():.0f} s)",
            )

    async def _back_off(self, retry: int, failure: TryFailed, deadline: float) -> None:
        """Wait before the next try, or give up when the wait would pass the deadline."""
        delay = self.retry.delay(retry, failure.retry_after)
        if time.monotonic() + delay >= deadline:
            raise final_error(failure, retry + 1)
        await self._sleep(delay)

    async def _try(self, body: dict[str, Any], deadline: float) -> Any:
        """One POST, reported to the breaker: an answer (even a 4xx) means the server is up."""
        try:
            data = await self._post(body, deadline)
        except TryFailed as failure:
            logger.warning("generation server try failed: %s", failure.detail)
            self.breaker.failure()
            raise
        except GenerationError:
            self.breaker.success()
            raise
        except BaseException:
            self.breaker.abandon()
            raise
        self.breaker.success()
        return data

    async def _post(self, body: dict[str, Any], deadline: float) -> Any:
        remaining = max(0.001, deadline - time.monotonic())
        timeout = aiohttp.ClientTimeout(total=min(self._timeout_s, remaining))
        try:
            async with self._client().post(
                self._url, json=body, headers=self._headers, timeout=timeout
            ) as response:
                return await read_answer(response)
        except TimeoutError:
            raise TryFailed(
                f"no answer from {self._where} within {timeout.total:g} s "
                "(KOBOT_BACKEND_TIMEOUT_S)",
                timeout=True,
            ) from None
        except aiohttp.ClientError as error:
            raise TryFailed(f"{type(error).__name__} talking to {self._where}") from None

    def _client(self) -> aiohttp.ClientSession:
        """One pooled session per event loop (a session cannot cross loops)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession()
            self._session_loop = loop
        return self._session


async def read_answer(response: aiohttp.ClientResponse) -> Any:
    """The JSON of a 200 answer; TryFailed or GenerationError for any other status."""
    if response.status != 200:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise status_error(response.status, await response.text(errors="replace"), retry_after)
    try:
        return await response.json(content_type=None)
    except ValueError as error:
        raise GenerationError(
            GenerationErrorKind.INTERNAL, f"the generation server sent invalid JSON ({error})"
        ) from None


def parse_or_fail(data: Any) -> Completion:
    try:
        return parse_completion(data)
    except ValueError as error:
        raise GenerationError(GenerationErrorKind.INTERNAL, str(error)) from None


def auth_headers(api_key: SecretStr | None) -> Mapping[str, str]:
    if api_key is None or not api_key.get_secret_value():
        return {}
    return {"Authorization": f"Bearer {api_key.get_secret_value()}"}


def server_name(url: str) -> str:
    """`scheme://host:port` of `url`, without credentials or path, for logs and messages."""
    parsed = URL(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port}"


def check_url(url: str) -> str:
    """A usable http(s) URL, else ModelLoadError naming KOBOT_BACKEND_URL."""
    parsed = URL(url.strip())
    if parsed.scheme not in {"http", "https"} or not parsed.host:
        raise ModelLoadError(
            "KOBOT_BACKEND_URL: must be an http:// or https:// URL of an OpenAI-compatible "
            f"server, e.g. http://127.0.0.1:8000/v1 (got {server_name(url)!r})"
        )
    return url
