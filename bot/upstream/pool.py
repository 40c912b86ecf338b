"""Connections to the image API: httpx's pool, split in shards so it stays cheap when large.

httpcore's connection pool walks every connection it holds each time a request is added or
removed, and for each idle one it also counts them all and polls its socket: the work of one
request grows with the square of the pool's size. At a provider concurrency of 50 that was
most of what a burst of jobs spent on the event loop between waves (`bench/load.py`: a wave
of 50 answers and 50 new requests took ~0.3 s of CPU in the pool alone). Several small pools
of up to `SHARD_SIZE` connections each, with each request sent to the least busy one, keep
every pool's walk short. Each shard is an ordinary `httpx.AsyncHTTPTransport`: keep-alive,
timeouts and errors are httpx's own.

Only direct connections are sharded. Through a proxy (DRAWBRIDGE_UPSTREAM_PROXY, or
HTTP(S)_PROXY / ALL_PROXY in the environment, which httpx honours only when it builds its
transports itself) the client keeps httpx's own pool.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import AsyncIterator
from typing import Final

import httpx

# Connections per shard: the pool's walk is ~SHARD_SIZE² steps per request at most.
SHARD_SIZE: Final = 8


def direct_transport(connections: int, proxy: str) -> ShardedTransport | None:
    """The sharded pool for a client with no proxy to use; None: let httpx build its own."""
    if proxy or urllib.request.getproxies():
        return None
    return ShardedTransport(connections)


class ShardedTransport(httpx.AsyncBaseTransport):
    """Sends each request through the least busy of several connection pools."""

    def __init__(self, connections: int, *, keepalive_expiry: float = 5.0) -> None:
        shards = max(1, math.ceil(connections / SHARD_SIZE))
        per_shard = math.ceil(connections / shards)
        limits = httpx.Limits(
            max_connections=None,
            max_keepalive_connections=per_shard,
            keepalive_expiry=keepalive_expiry,
        )
        # One TLS context for all (each of its own would load the CA bundle again: ~20 ms).
        tls = httpx.create_ssl_context()
        self._shards = [httpx.AsyncHTTPTransport(verify=tls, limits=limits) for _ in range(shards)]
        self._busy = [0] * shards

    @property
    def shards(self) -> int:
        return len(self._shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = min(range(len(self._busy)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            response = await self._shards[index].handle_async_request(request)
        except BaseException:
            self._busy[index] -= 1
            raise
        response.stream = _Counted(response.stream, self._busy, index)
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class _Counted(httpx.AsyncByteStream):
    """A response body that frees its shard's count once, when closed."""

    def __init__(
        self, stream: httpx.AsyncByteStream | httpx.SyncByteStream, busy: list[int], index: int
    ) -> None:
        self._stream = stream
        self._busy = busy
        self._index = index
        self._open = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert isinstance(self._stream, httpx.AsyncByteStream)
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._busy[self._index] -= 1
        assert isinstance(self._stream, httpx.AsyncByteStream)
        await self._stream.aclose()
