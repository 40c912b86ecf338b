"""Downloading user-controlled image URLs without becoming an SSRF proxy.

An image URL in a chat message is chosen by whoever wrote the message. Before any byte is
requested: the scheme must be http(s), the host must be on the operator's allowlist exactly,
and every address the host resolves to must be public (unless the operator listed the host as
an IP literal, or as `localhost` for loopback). The request then goes to the very address that
was checked, so a DNS answer that changes between check and connect (rebinding) cannot steer
it elsewhere. Redirects are followed by hand, each hop checked again; bodies are streamed and
cut at the byte cap; one deadline covers the whole download.

The byte cap counts what we keep, after any content decoding. httpx would inflate a gzip
body for us, but a whole network chunk at a time: 64 KiB of gzip is 64 MB of output before
any cap can look at it. So bodies are read raw, a `gzip`/`deflate` body (sent although we ask
for `identity`) is inflated here at most up to the cap, and any other encoding is refused.

Error params name the host at most, never the URL: QQ and Discord image links are signed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import zlib
from dataclasses import dataclass, field, replace
from typing import Final

import httpx

from bot.errors import ForbiddenURLError, ImageFetchError, ImageTooLargeError

log = logging.getLogger(__name__)

MB: Final = 1024 * 1024
_SCHEMES: Final = ("http", "https")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# NAT64 (RFC 6052) embeds an IPv4 address in the low 32 bits.
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
# Content codings we inflate ourselves, within the cap; 32 + MAX_WBITS reads a gzip or a zlib
# header, which covers `deflate` as RFC 9110 defines it (zlib-wrapped).
_INFLATED_ENCODINGS: Final = frozenset({"gzip", "x-gzip", "deflate"})
# Inflate in steps this big, so the body grows by small appends instead of one huge copy.
_INFLATE_STEP: Final = 256 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Where images may be downloaded from, and how much and how long.

    `allowed_hosts` holds host names, IP literals (`127.0.0.1`, `::1` or `[::1]`) or
    `localhost`; they are matched exactly, case-insensitively, ignoring a trailing dot.
    """

    allowed_hosts: tuple[str, ...]
    max_bytes: int
    timeout: float = 20.0
    max_redirects: int = 3

    def __post_init__(self) -> None:
        # Normalised once here so every check compares like with like.
        object.__setattr__(
            self, "allowed_hosts", tuple(dict.fromkeys(_host_key(h) for h in self.allowed_hosts))
        )


@dataclass(frozen=True, slots=True)
class UrlImage:
    """A reference image behind a URL (a QQ CDN link), fetched under a `FetchPolicy`.

    Implements `bot.chat.ImageSource`. The URL is kept out of `repr` because it may be signed.
    """

    url: str = field(repr=False)
    policy: FetchPolicy
    label: str = "image"
    # A shared client (connection reuse); None makes a short-lived one per fetch.
    client: httpx.AsyncClient | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        """The label given by the adapter (a file name), never the URL."""
        return self.label

    async def fetch(self, max_bytes: int) -> bytes:
        """Download under the policy, capped at the smaller of `max_bytes` and the policy's."""
        policy = replace(self.policy, max_bytes=min(max_bytes, self.policy.max_bytes))
        return await fetch_url(self.url, policy, client=self.client)


def check_url(url: str, policy: FetchPolicy) -> None:
    """Refuse a URL by its scheme and host alone (no DNS): raises `ForbiddenURLError`."""
    _checked(url, policy)


def is_public_address(address: str) -> bool:
    """True when `address` is a public unicast IP (not private, loopback, link-local,
    multicast, reserved, unspecified, shared, or an IPv6 form embedding one of those)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return _is_public(ip)


async def fetch_url(
    url: str, policy: FetchPolicy, *, client: httpx.AsyncClient | None = None
) -> bytes:
    """Download an image URL under `policy` and return its bytes.

    Raises `ForbiddenURLError` (scheme, host or address not allowed, also on any redirect
    hop), `ImageTooLargeError` (over `policy.max_bytes` on the wire or once inflated, params
    `size_mb`, `limit_mb`) or `ImageFetchError` (HTTP error status in `status`, connection
    failure, deadline, too many redirects, a content encoding other than identity, gzip or
    deflate, or a corrupt one; `reason` says which).
    """
    current = _checked(url, policy)
    own_client = client is None
    if client is None:
        # No proxies from the environment: the request must go to the address we checked.
        client = httpx.AsyncClient(timeout=policy.timeout, trust_env=False)
    try:
        async with asyncio.timeout(policy.timeout):
            for _ in range(policy.max_redirects + 1):
                result = await _fetch_hop(client, current, policy)
                if isinstance(result, bytes):
                    return result
                current = _checked(result, policy)
            raise ImageFetchError("too many redirects", host=current.host, reason="redirects")
    except TimeoutError as exc:
        raise ImageFetchError("deadline", host=current.host, reason="timeout") from exc
    finally:
        if own_client:
            await client.aclose()


# --- checks ---


@dataclass(frozen=True, slots=True)
class _Target:
    url: httpx.URL
    host: str  # the allowlist key: lower case, ASCII (punycode), no trailing dot
    literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None

    @property
    def port(self) -> int:
        return self.url.port or _DEFAULT_PORTS[self.url.scheme]


def _host_key(host: str) -> str:
    key = host.strip().lower().rstrip(".")
    if key.startswith("[") and key.endswith("]"):
        key = key[1:-1]
    try:
        return str(ipaddress.ip_address(key))
    except ValueError:
        return key


def _checked(url: str | httpx.URL, policy: FetchPolicy) -> _Target:
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        raw_host = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, TypeError, ValueError) as exc:
        raise ForbiddenURLError("invalid url", reason="url") from exc
    if parsed.scheme not in _SCHEMES:
        raise ForbiddenURLError(
            f"scheme {parsed.scheme}", reason="scheme", scheme=parsed.scheme[:16]
        )
    host = _host_key(raw_host)
    if parsed.userinfo:
        # `http://allowed@evil/` and friends: credentials in URLs only serve to confuse.
        raise ForbiddenURLError("userinfo in url", reason="userinfo", host=host)
    if not host or host not in policy.allowed_hosts:
        raise ForbiddenURLError(f"host {host} not allowed", reason="host", host=host)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    return _Target(url=parsed, host=host, literal=literal)


def _is_public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip.teredo is not None:
            embedded = ip.teredo[1]
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not _is_public(embedded):
            return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


async def _addresses(target: _Target) -> list[str]:
    """The addresses to connect to, each one checked."""
    if target.literal is not None:
        # The operator listed this exact IP: whatever it is, they meant it.
        return [str(target.literal)]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ImageFetchError("cannot resolve", host=target.host, reason="dns") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise ImageFetchError("no address", host=target.host, reason="dns")
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        allowed = ip.is_loopback if target.host == "localhost" else _is_public(ip)
        if not allowed:
            log.warning("refused image host %s: resolves to %s", target.host, address)
            raise ForbiddenURLError(
                f"{target.host} resolves to {address}", reason="address", host=target.host
            )
    return addresses


# --- downloading ---


async def _fetch_hop(
    client: httpx.AsyncClient, target: _Target, policy: FetchPolicy
) -> bytes | httpx.URL:
    """One request: the body, or the URL a redirect points to (not yet checked)."""
    addresses = await _addresses(target)
    failure: Exception | None = None
    # Try each checked address in turn: a host may publish an IPv6 address we cannot reach.
    for address in addresses:
        try:
            return await _get(client, target, address, policy)
        except httpx.ConnectError as exc:
            failure = exc
        except httpx.TimeoutException as exc:
            raise ImageFetchError("timeout", host=target.host, reason="timeout") from exc
        except httpx.HTTPError as exc:
            raise ImageFetchError(
                f"transport: {type(exc).__name__}", host=target.host, reason="connect"
            ) from exc
    raise ImageFetchError(
        f"connect failed: {type(failure).__name__}", host=target.host, reason="connect"
    ) from failure


async def _get(
    client: httpx.AsyncClient, target: _Target, address: str, policy: FetchPolicy
) -> bytes | httpx.URL:
    pinned = target.url.copy_with(host=address)
    headers = {
        "Host": target.url.netloc.decode("ascii"),
        "Accept": "image/*",
        # A compressed body could inflate far past the cap inside a single chunk.
        "Accept-Encoding": "identity",
    }
    extensions: dict[str, str] = {}
    if target.url.scheme == "https" and target.literal is None:
        # Certificate checked against the host name although we dial the address; and no
        # keep-alive, so a pooled TLS connection made for one name never serves another.
        extensions["sni_hostname"] = target.url.raw_host.decode("ascii")
        headers["Connection"] = "close"
    async with client.stream(
        "GET", pinned, headers=headers, extensions=extensions, follow_redirects=False
    ) as response:
        status = response.status_code
        if response.is_redirect:
            try:
                return target.url.join(response.headers["location"])
            except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
                raise ForbiddenURLError("bad redirect", reason="url", host=target.host) from exc
        if not 200 <= status < 300:
            raise ImageFetchError(
                f"http {status}", status=status, host=target.host, reason="status"
            )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > policy.max_bytes:
            raise _too_large(int(declared), policy, target)
        inflater = _inflater(response.headers.get("content-encoding", ""), target)
        body = bytearray()
        # Raw bytes: httpx's own decoding inflates a whole chunk at once, past any cap.
        async for chunk in response.aiter_raw():
            if inflater is None:
                body += chunk
            else:
                _inflate_into(body, inflater, chunk, policy, target)
            if len(body) > policy.max_bytes:
                raise _too_large(len(body), policy, target)
        if inflater is not None and not inflater.eof:
            raise ImageFetchError("truncated compressed body", host=target.host, reason="encoding")
        return bytes(body)


def _inflater(encoding: str, target: _Target) -> zlib._Decompress | None:
    """A decompressor for the response's content coding; None for none; refuses the rest."""
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _INFLATED_ENCODINGS:
        return zlib.decompressobj(32 + zlib.MAX_WBITS)
    # br, zstd, stacked codings...: nothing an image host needs, and more ways to inflate.
    raise ImageFetchError(
        f"content-encoding {encoding[:32]!r} refused", host=target.host, reason="encoding"
    )


def _inflate_into(
    body: bytearray,
    inflater: zlib._Decompress,
    chunk: bytes,
    policy: FetchPolicy,
    target: _Target,
) -> None:
    """Inflate `chunk` onto `body`, never producing more than one byte past the cap."""
    pending = chunk
    try:
        while True:
            if inflater.eof:
                if pending:
                    # Data after the end of the stream (a second gzip member, say).
                    raise ImageFetchError(
                        "data after the compressed body", host=target.host, reason="encoding"
                    )
                return
            # max_length bounds this call's output; input it had no room for is kept in
            # unconsumed_tail, and output zlib holds back comes with the next call.
            room = min(_INFLATE_STEP, policy.max_bytes + 1 - len(body))
            out = inflater.decompress(pending, room)
            body += out
            if len(body) > policy.max_bytes:
                raise _too_large(len(body), policy, target)
            pending = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
            if not pending and len(out) < room:
                return  # everything in this chunk is out: wait for the next one
    except zlib.error as exc:
        raise ImageFetchError(
            "corrupt compressed body", host=target.host, reason="encoding"
        ) from exc


def _too_large(size: int, policy: FetchPolicy, target: _Target) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{size} bytes from {target.host}",
        size_mb=round(size / MB, 1),
        limit_mb=round(policy.max_bytes / MB, 1),
        reason="bytes",
        host=target.host,
    )
