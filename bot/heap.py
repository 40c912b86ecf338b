"""The cyclic garbage collector, set for a bot that runs for weeks (`drawbridge run`).

Measured in a burst of 500 commands (bench/load.py, bench/README.md §5): with Python's
default thresholds a full collection ran in the middle of the burst, stopping the loop for
~30 ms to scan every object, startup's included, and ~60 young collections added ~10 ms more.
Once the bot is up, what startup made (modules, settings, clients, platform connections) lives
as long as the process: `gc.freeze()` takes it out of every later collection. A larger first
threshold lets a command's short-lived objects die by reference count before a collection
looks at them, so fewer reach the older generations that full collections scan.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

THRESHOLDS = (50_000, 20, 100)
"""`gc.set_threshold`: young collections every 50,000 new objects instead of 700; the older
generations as often relative to it as before, or less."""


def settle() -> None:
    """Collect startup's garbage, freeze what is left, and set the thresholds (once, when
    the bot is ready: frozen objects are never collected, even if they become garbage)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    log.info(
        "memory: %d startup objects frozen, collector thresholds %s",
        gc.get_freeze_count(),
        "/".join(map(str, THRESHOLDS)),
    )
