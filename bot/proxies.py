"""Outgoing proxies: `TELEGRAM_PROXY`, `DISCORD_PROXY` and `DRAWBRIDGE_UPSTREAM_PROXY`.

Each takes an `http://`, `https://` or `socks5://` URL, with `user:password@` if the proxy
wants it. The settings are checked at start (a typo must not surface as a connect error
minutes later) and normalised to carry an explicit port, so every library reads them alike.

Reference downloads (images users post in chats) never use a proxy: they must reach the very
address the SSRF check resolved (see `bot.fetch`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    from aiohttp_socks import ProxyConnector

DEFAULT_PORTS: Final = {"http": 80, "https": 443, "socks5": 1080}
"""The accepted schemes, and the port each means when the URL names none."""

PROXY_FORM: Final = (
    "must be an http://, https:// or socks5:// URL with a host, such as "
    "socks5://user:pass@127.0.0.1:1080 or http://127.0.0.1:7890"
)


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """One proxy: scheme, host, port and the optional credentials (kept out of `repr`)."""

    scheme: str
    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)

    @classmethod
    def parse(cls, url: str) -> ProxyURL:
        """Read a proxy URL; raises `ValueError` (without echoing it: it may hold a password)."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            raise ValueError(PROXY_FORM) from None
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        if scheme not in DEFAULT_PORTS or not host or parts.path not in ("", "/"):
            raise ValueError(PROXY_FORM)
        if parts.query or parts.fragment:
            raise ValueError(PROXY_FORM)
        return cls(
            scheme=scheme,
            host=host,
            port=port or DEFAULT_PORTS[scheme],
            username=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
        )

    @property
    def address(self) -> str:
        """`scheme://host:port`, without credentials: what a log line may show."""
        return f"{self.scheme}://{self._netloc()}"

    @property
    def url(self) -> str:
        """The full URL, credentials percent-encoded (for httpx and aiohttp-socks)."""
        return self._with_scheme(self.scheme)

    def _with_scheme(self, scheme: str) -> str:
        userinfo = ""
        if self.username or self.password:
            userinfo = quote(self.username, safe="")
            if self.password:
                userinfo += ":" + quote(self.password, safe="")
            userinfo += "@"
        return f"{scheme}://{userinfo}{self._netloc()}"

    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def tunnel_url(self) -> str:
        """The URL aiohttp-socks understands: an https proxy is an http proxy spoken over
        TLS (`tunnel_tls` says so), and aiohttp-socks knows only the `http` scheme for it."""
        return self._with_scheme("http" if self.scheme == "https" else self.scheme)

    def tunnel_tls(self) -> ssl.SSLContext | None:
        """TLS to the proxy itself: a verifying context for an https proxy, else None."""
        return ssl.create_default_context() if self.scheme == "https" else None


def proxy_setting(value: str) -> str:
    """Validate and normalise a proxy setting; empty stays empty (no proxy)."""
    if not value.strip():
        return ""
    return ProxyURL.parse(value).url


def proxy_from_setting(value: str) -> ProxyURL | None:
    """The proxy a (validated) setting names, or None when it is empty."""
    return ProxyURL.parse(value) if value.strip() else None


def aiohttp_connector(proxy: ProxyURL, **kwargs: Any) -> ProxyConnector:
    """An aiohttp connector that opens every connection through `proxy`.

    Every connection, plain HTTP and WebSocket alike, becomes a tunnel (HTTP CONNECT or
    SOCKS5 with remote DNS), so it works for REST and gateway traffic alike. Must be made
    inside the running event loop. `kwargs` go to aiohttp's `TCPConnector`.
    """
    from aiohttp_socks import ProxyConnector, ProxyType

    kinds = {"http": ProxyType.HTTP, "https": ProxyType.HTTP, "socks5": ProxyType.SOCKS5}
    return ProxyConnector(
        host=proxy.host,
        port=proxy.port,
        proxy_type=kinds[proxy.scheme],
        username=proxy.username or None,
        password=proxy.password or None,
        rdns=True,
        proxy_ssl=proxy.tunnel_tls(),
        **kwargs,
    )
