"""Health checks for `/healthz`: each one a timed probe that passes or says why not.

A check answers within CHECK_TIMEOUT_S or fails; any exception is a failed check, described in
one line. The adapter implements `PlatformProbe` so the platform check can ask it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

CHECK_TIMEOUT_S = 3.0


@runtime_checkable
class PlatformProbe(Protocol):
    """What an adapter implements so `/healthz` can tell whether it is connected."""

    def is_connected(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    detail: str = ""
    ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"ok": self.ok, "ms": round(self.ms, 1)}
        if self.detail:
            shown["detail"] = self.detail
        return shown


def describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text[:300]


async def timed_check(probe: Callable[[], Awaitable[str]], timeout_s: float) -> Check:
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(probe(), timeout_s)
    except TimeoutError:
        return Check(False, f"no answer within {timeout_s:g} s", _ms_since(started))
    except Exception as error:  # any failure is a failed check
        return Check(False, describe(error), _ms_since(started))
    return Check(True, detail, _ms_since(started))


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
