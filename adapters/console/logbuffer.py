"""The last log lines, for the console's log page: redacted exactly as the log files are."""

from __future__ import annotations

import logging
import threading
from collections import deque

from bot.logs import RedactingFilter, RedactingFormatter

# The same shape as bot.logs.setup_logging's lines.
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_LINES = 2000


class LogBuffer(logging.Handler):
    """A ring buffer of formatted, redacted log lines, attached to the root logger."""

    def __init__(self, capacity: int = MAX_LINES) -> None:
        super().__init__()
        self.lines: deque[tuple[int, int, str]] = deque(maxlen=capacity)
        self._seq = 0
        self._guard = threading.Lock()
        # The same filter and formatter as the files: nothing here a log file would not show.
        self.setFormatter(RedactingFormatter(_FORMAT))
        self.addFilter(RedactingFilter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self._guard:
            self._seq += 1
            self.lines.append((self._seq, record.levelno, line))

    def tail(self, min_level: int = logging.NOTSET, limit: int = MAX_LINES) -> list[str]:
        """The newest `limit` lines at `min_level` or above, oldest first."""
        with self._guard:
            lines = [line for _, level, line in self.lines if level >= min_level]
        return lines[-limit:]

    def attach(self) -> None:
        """Start collecting from the root logger."""
        root = logging.getLogger()
        if self not in root.handlers:
            root.addHandler(self)

    def detach(self) -> None:
        """Stop collecting."""
        logging.getLogger().removeHandler(self)
