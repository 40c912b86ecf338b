"""What the bench scripts share: the machine they ran on, memory readings, and tables.

Not a public module: `bench/NAME.py` scripts import it by path (they are run as plain
scripts, so `bench/` is first on `sys.path`).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def add_repo_to_path() -> None:
    """Make `tests.*` importable: a script's own folder, not the repo root, is on the path."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def machine() -> str:
    """One line naming the hardware and Python the figures came from."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "? GB"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / MB:.1f} GB"
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPU ({cpu}), {ram} RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def loop_seconds(steps: int = 10_000_000, tries: int = 3) -> float:
    """Seconds an empty Python loop of `steps` takes here, the best of `tries`: the machine's
    speed for pure Python, to compare a CPU-bound figure across VMs (bench/README.md: 0.23 s
    on stop 22's VM, 0.26-0.59 s on later ones)."""
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        for _ in range(steps):
            pass
        best = min(best, time.perf_counter() - started)
    return best


# --- memory ---


def rss_bytes() -> int:
    """The process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """The process's peak resident set size: VmHWM from /proc, else `ru_maxrss`.

    `ru_maxrss` is also the high-water mark, but Linux carries the parent's peak into it
    across fork + exec, so a child started by a big parent reads the parent's figure; VmHWM
    is this process's own memory map only.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Lower the peak RSS mark to the current RSS (Linux >= 4.0); False if not possible.

    Without this, `ru_maxrss` only ever grows, so a warm-up that briefly used more memory than
    is resident now would hide what the measured call used.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


# --- reporting ---


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (0.5 = median) by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    """The median; NaN when empty."""
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def verdict(value: float, goal: float, *, below: bool = True) -> str:
    """'ok' when `value` meets the goal (<= goal, or >= with below=False), else 'MISSED'."""
    met = value <= goal if below else value >= goal
    return "ok" if met else "MISSED"
