"""Start-up failures the operator can act on: one line, an exit code, no traceback.

`bot/` never imports an adapter, so adapters raise `StartupError` with the line to print
(naming the setting to check) and `drawbridge run` turns it into that line and the code.

Exit codes, as `deploy/drawbridge.service` reads them (`RestartPreventExitStatus=2`):
- `SETTINGS` (2): a setting must change before a restart can help (a refused token).
- `RETRY` (1): the world may change by itself (a port another process holds, a network or
  proxy that is down), so a supervisor's restart may succeed.
"""

from __future__ import annotations

import errno
from typing import Final

SETTINGS: Final = 2
RETRY: Final = 1


class StartupError(Exception):
    """A platform could not start; `str(error)` is the one line to print, naming what to check.

    The message must not hold a secret: it is printed as is.
    """

    def __init__(self, message: str, *, exit_code: int = RETRY) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def listen_error(
    what: str, host: str, port: int, error: OSError, *, host_name: str, port_name: str
) -> StartupError:
    """The error for a listening socket that could not be bound, naming the two settings.

    A port in use may free itself (an old instance still stopping): `RETRY`. Anything else
    (an address not on this machine, a port below 1024 without the right) is the settings.
    """
    reason = error.strerror or type(error).__name__
    if error.errno == errno.EADDRINUSE:
        return StartupError(
            f"{what} cannot listen on {host}:{port}: the port is in use by another process; "
            f"stop it or set another {port_name} (or {host_name})",
            exit_code=RETRY,
        )
    return StartupError(
        f"{what} cannot listen on {host}:{port} ({reason}): check {host_name} and {port_name}",
        exit_code=SETTINGS,
    )
