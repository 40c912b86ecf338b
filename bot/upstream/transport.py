"""The image API's connections: httpx requests carried by aiohttp's client.

The upstream client speaks httpx (requests, streamed responses, its exceptions); this module
is the transport underneath, for direct connections. httpx's own (httpcore) costs ~1 ms of
CPU a request and walks every pooled connection whenever a request comes or goes, so its
cost grows with the square of the pool: at a provider concurrency of 50 a burst's waves of
requests spent more time in it than anywhere else in the bot. aiohttp, already here for the
chat platforms, parses HTTP in C and keeps idle connections in a queue per host: ~0.2 ms a
request, measured the same way (`bench/README.md`).

What the client relies on is kept: the body is streamed as httpx built it (its Content-Length,
the multipart of an /edit, the signal when its last byte is sent), responses come back raw
(httpx decodes gzip itself), a response read to its end leaves its connection for the next
request, and every failure is the httpx exception httpcore would raise, so retry and billing
decisions are unchanged: `ConnectError` / `ConnectTimeout` only when no connection was made
(nothing was sent: safe to retry), and read errors and timeouts otherwise.

Through a proxy (DRAWBRIDGE_UPSTREAM_PROXY, or HTTP(S)_PROXY / ALL_PROXY in the environment,
which httpx honours only when it builds its transports itself) the client keeps httpx's own.
"""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp
import httpx

# Idle connections are closed after this long (httpx's default keep-alive expiry).
KEEPALIVE_SECONDS: Final = 5.0


def upstream_http(proxy: str = "", *, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """The httpx client for the image API: aiohttp underneath when direct, httpx's own pool
    through a proxy (`proxy`, else the environment's: trust_env)."""
    return httpx.AsyncClient(
        transport=direct_transport(proxy),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=50),
        headers=headers,
        proxy=proxy or None,
    )


def direct_transport(proxy: str) -> AiohttpTransport | None:
    """aiohttp's transport for a client with no proxy to use; None: let httpx build its own."""
    if proxy or urllib.request.getproxies():
        return None
    return AiohttpTransport()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with one `aiohttp.ClientSession` (opened at the first request)."""

    def __init__(self) -> None:
        # Made now, not at the first request: loading the CA bundle takes ~20 ms, which the
        # first jobs of a burst would wait for.
        self._tls = httpx.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            # How many requests run at once is the job runner's (provider slots), not ours.
            limit=0,
            # The CA bundle httpx verifies with (certifi), not the system's.
            ssl=self._tls,
            keepalive_timeout=KEEPALIVE_SECONDS,
        )
        return aiohttp.ClientSession(
            connector=connector,
            # httpx decodes the body (it reads Content-Encoding itself) and sets every header.
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            self._session = self._open()
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers.raw
            # aiohttp writes Host from the URL (and would send a second one).
            if name.lower() != b"host"
        ]
        try:
            response = await self._session.request(
                request.method,
                str(request.url),
                headers=headers,
                data=_body(request) if _has_body(request) else None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=timeouts.get("connect"),
                    sock_read=timeouts.get("read"),
                ),
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _httpx_error(exc, request) from exc
        version = response.version or aiohttp.HttpVersion11
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_ResponseBody(response, request),
            extensions={
                "http_version": f"HTTP/{version.major}.{version.minor}".encode(),
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _has_body(request: httpx.Request) -> bool:
    return request.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in (
        request.headers
    )


async def _body(request: httpx.Request) -> AsyncIterator[bytes]:
    """The request's body as httpx built it (an /edit's multipart is never joined in memory)."""
    stream: Any = request.stream
    if isinstance(stream, httpx.AsyncByteStream):
        async for chunk in stream:
            yield chunk
    else:
        for chunk in stream:
            yield chunk


class _ResponseBody(httpx.AsyncByteStream):
    """An aiohttp response's body, raw, with aiohttp's errors as httpx's."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _httpx_error(exc, self._request) from exc

    async def aclose(self) -> None:
        # Read to its end, the connection goes back to the pool; otherwise it is closed.
        self._response.release()


def _httpx_error(exc: BaseException, request: httpx.Request) -> Exception:
    """The httpx exception httpcore raises for the same failure.

    Only a failure to connect is a `ConnectError` / `ConnectTimeout`: the client retries those
    as never having reached the upstream. Anything after the connection was made (the server
    closing it, a cut body, a read timeout) may have been billed and is not retried.
    """
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if isinstance(exc, TimeoutError):
        # aiohttp's sock_read (SocketTimeoutError; asyncio.TimeoutError is TimeoutError).
        return httpx.ReadTimeout(message, request=request)
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError) and not isinstance(
        exc, aiohttp.ServerDisconnectedError
    ):
        # A reset while sending or reading.
        return httpx.ReadError(message, request=request)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(message, request=request)
    # The server closing the connection, a body cut short or malformed, a bad status line.
    return httpx.RemoteProtocolError(message, request=request)
