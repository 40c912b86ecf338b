"""Console sessions: signed cookies, CSRF tokens, and the failed-login limit per address."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass

COOKIE = "drawbridge_console"
SESSION_SECONDS = 12 * 3600
FAILED_LOGINS = 5
"""Failed logins one address may make per `FAILED_WINDOW` before it is refused (429)."""
FAILED_WINDOW = 600.0


@dataclass(frozen=True, slots=True)
class Session:
    """Who is logged in ("" before login) and the CSRF token their forms carry."""

    who: str
    csrf: str
    expires: float

    @property
    def logged_in(self) -> bool:
        return bool(self.who)


class Signer:
    """Signs and checks session cookies with a key made at start (a restart logs everyone out)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def new(self, who: str = "") -> Session:
        """A fresh session (a new CSRF token too: login must not keep the anonymous one)."""
        return Session(who, secrets.token_urlsafe(24), time.time() + SESSION_SECONDS)

    def dump(self, session: Session) -> str:
        body = base64.urlsafe_b64encode(
            json.dumps([session.who, session.csrf, session.expires]).encode()
        ).decode()
        return f"{body}.{self._sign(body)}"

    def load(self, cookie: str | None) -> Session | None:
        """The session in a cookie, or None if absent, forged or expired."""
        if not cookie or "." not in cookie:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            who, csrf, expires = json.loads(base64.urlsafe_b64decode(body))
            session = Session(str(who), str(csrf), float(expires))
        except (ValueError, TypeError):
            return None
        return session if session.expires > time.time() else None

    def _sign(self, body: str) -> str:
        digest = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


class LoginLimiter:
    """Counts failed logins per client address in a sliding window."""

    def __init__(self, limit: int = FAILED_LOGINS, window: float = FAILED_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str) -> deque[float]:
        now = time.monotonic()
        failures = self._failures.setdefault(address, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return deque()
        return failures

    def blocked(self, address: str) -> float:
        """Seconds until `address` may try again (0: it may now)."""
        failures = self._recent(address)
        if len(failures) < self.limit:
            return 0.0
        return max(1.0, failures[0] + self.window - time.monotonic())

    def failed(self, address: str) -> None:
        self._recent(address)
        self._failures.setdefault(address, deque()).append(time.monotonic())

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


def password_matches(given: str, expected: str) -> bool:
    """Constant-time comparison, so the answer time says nothing of the password."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())
