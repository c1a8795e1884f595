"""Peak resident memory of this process, resettable between the arms of a benchmark (Linux)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # Linux: reset VmHWM, the peak RSS
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
