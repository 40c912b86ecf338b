"""Redaction cost per log line against how many users' keys are known.

    python bench/redaction.py            # 20,000 lines per point
    python bench/redaction.py --quick    # 2,000 lines per point

Before issue 10 every `/token` argument became a literal, checked one by one on every line
(`for literal in literals: if literal in text`), so each line cost more as users typed more:
about 1 ms a line past 20,000 of them. Now users' keys are kept only once bound and used, at
most `MAX_BOUND_KEYS` of them, and found by a set lookup per key-like run of the line, so the
cost should stay flat. The baseline is the old `redact` (its loop and its patterns) over
the same keys. Exit 1 when our cost
at the cap is over three times our cost with no key at all.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, table

from bot import logs

LINES = (
    "2026-01-01 12:00:00 INFO aiogram.event: Update id=918273645 is handled. Duration 12 ms "
    "by bot id=7654321098",
    "2026-01-01 12:00:01 INFO bot.jobs: job 4711 done in 41.2s (1536x1024, 2 images) for "
    "user 100000000000000042 in chat -1001234567890",
    "2026-01-01 12:00:02 DEBUG discord.gateway: For Shard ID None: WebSocket Event: {'op': 0, "
    "'t': 'INTERACTION_CREATE', 'd': {'id': '1576763402221518879', 'token': '***'}}",
)


def per_line_us(redact: Callable[[str], str], lines: int) -> float:
    started = time.perf_counter()
    for index in range(lines):
        redact(LINES[index % len(LINES)])
    return (time.perf_counter() - started) / lines * 1e6


# bot/logs.py before issue 10: its patterns, after the loop over literals.
OLD_PATTERNS = (
    (re.compile(r"sk-[A-Za-z0-9_\-]{6,}"), "sk-***"),
    (re.compile(r"(?<!\d)\d{5,}:[A-Za-z0-9_\-]{30,}"), "***:***"),
    (re.compile(r"([/／]\s*(?:token|令牌)(?:@\w+)?)\s*[^\s*]\S*"), r"\1 ***"),
    (re.compile(r"(Bearer)\s+\S+", re.IGNORECASE), r"\1 ***"),
)


def old_redact(literals: tuple[str, ...]) -> Callable[[str], str]:
    def redact(text: str) -> str:
        for literal in literals:
            if literal in text:
                text = text.replace(literal, "***")
        for pattern, replacement in OLD_PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    return redact


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    lines = 2_000 if args.quick else 20_000
    print(machine())
    rows = []
    known: list[str] = []
    ours: dict[int, float] = {}
    for count in (0, 16, 256, logs.MAX_BOUND_KEYS, 20_000):
        while len(known) < count:
            key = f"sk-{secrets.token_urlsafe(24)}" if len(known) % 2 else secrets.token_hex(20)
            known.append(key)
            logs.add_secrets([key])
        ours[count] = per_line_us(logs.redact, lines)
        baseline = per_line_us(old_redact(tuple(sorted(known, key=len, reverse=True))), lines)
        rows.append(
            (count, min(count, logs.MAX_BOUND_KEYS), f"{ours[count]:.1f}", f"{baseline:.1f}")
        )
    print(table(("keys offered", "keys kept", "ours us/line", "old redact us/line"), rows))
    flat = ours[logs.MAX_BOUND_KEYS] <= 3 * max(ours[0], 1.0)
    print(f"cost at the cap vs no key: {ours[logs.MAX_BOUND_KEYS] / max(ours[0], 1.0):.2f}x")
    return 0 if flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
