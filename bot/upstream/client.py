"""One provider's calls: `/v1/images/generations` and `/v1/images/edits` over httpx.

`UpstreamClient` turns `b64_json` or `url` results into bytes at once, reports progress
(partial previews when streaming) and raises exactly one `UpstreamError` subclass per
failure. It learns what its relay can do (`CapabilityStore`) and adapts: a relay that
cannot stream is asked once more without streaming and never streamed to again (re-probed
once a day); a relay that cannot edit is marked so the chain routes edits elsewhere.

Billing decides the retry rules: a relay may charge every request that reached the model and
there is no idempotency key, so only requests that surely did not run are retried (connection
refused, 429 with a short `Retry-After`, 502/503 with an empty body and one-api's rewrap of
it), never a timeout. The one exception, asked for by operators and documented in
docs/billing.md: the single non-streamed retry after a relay broke on a stream.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

import httpx
from prometheus_client import CollectorRegistry, Counter

from bot.config import ProviderConfig
from bot.errors import (
    MalformedResponseError,
    NoReferenceImageError,
    NotSupportedError,
    RateLimitedError,
    RelayStreamError,
    ResultDownloadError,
    TooManyReferencesError,
    UnknownParameterError,
    UpstreamError,
    UpstreamSizeError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from bot.sizes import Size, fallback_size
from bot.upstream.capabilities import Capabilities, CapabilityStore
from bot.upstream.classify import ERROR_BODY_LIMIT, classify_error
from bot.upstream.readers import (
    Answer,
    JsonImageReader,
    SseMessage,
    SseReader,
    inspect_image,
    item_from,
    load_object,
    usage_of,
)
from bot.upstream.transport import upstream_http
from bot.upstream.values import (
    CODE_BAD_ENCODING,
    CODE_CONNECT_FAILED,
    CODE_CONNECTION_LOST,
    CODE_NO_DATA,
    CODE_NOT_JSON,
    CODE_STREAM_CUT,
    CODE_TIMEOUT,
    CODE_TOO_LARGE,
    USER_AGENT,
    GeneratedImage,
    ImageRequest,
    ImageResult,
    Progress,
    ProgressHandler,
)

log = logging.getLogger(__name__)

# A Retry-After longer than this is not worth holding a job slot for.
MAX_RETRY_AFTER: Final = 30.0
# Connect-error backoff: 0.5 s, 1 s, 2 s ...
BACKOFF_BASE: Final = 0.5
# A relay found unable to stream is tried with a stream again after this long (it may have
# been upgraded); each probe can cost one more billed image on a relay that still fails.
STREAM_RECHECK_SECONDS: Final = 24 * 3600.0
# After a stream's `[DONE]`, the rest of the body (its end) is read for this long, up to this
# many bytes, so the connection can be used again; past either, it is closed.
DRAIN_SECONDS: Final = 0.5
DRAIN_BYTES: Final = 64 * 1024

METRICS: Final = CollectorRegistry()
"""What this process counts as it happens (the console's /metrics serves it with the totals
it reads from the store)."""
UPSTREAM_REQUESTS: Final = Counter(
    "drawbridge_upstream_requests",
    "HTTP requests made to each provider's image API, by HTTP status, or error (no answer: "
    "connection refused or lost) or timeout",
    ["provider", "status"],
    registry=METRICS,
)


class _Retry(Exception):
    """An attempt failed in a way that surely did not run the request: try again."""

    def __init__(self, error: UpstreamError, delay: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.delay = delay


class _SentSignal(httpx.AsyncByteStream):
    """A request body that reports when its last byte has been handed to the connection."""

    def __init__(self, body: httpx.AsyncByteStream, on_sent: Callable[[], Awaitable[None]]) -> None:
        self._body = body
        self._on_sent = on_sent

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            yield chunk
        await self._on_sent()

    async def aclose(self) -> None:
        await self._body.aclose()


async def notify(on_progress: ProgressHandler | None, event: Progress) -> None:
    """Hand `event` to the progress handler, if any; its failures are logged, never raised."""
    if on_progress is None:
        return
    try:
        await on_progress(event)
    except Exception:
        # A failed preview must not fail (or re-bill) an image that is being made.
        log.warning("progress handler failed on %s", event.kind, exc_info=True)


def _parse_wxh(size: str | None) -> Size | None:
    width, sep, height = (size or "").lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        return None
    return Size(int(width), int(height))


def _cannot_stream(error: UpstreamError) -> bool:
    """Whether a streamed request's failure shows the relay cannot stream (issue 12's list)."""
    if isinstance(error, RelayStreamError):
        return True
    # A 200 whose body is neither an event stream nor JSON.
    return isinstance(error, MalformedResponseError) and error.code == CODE_NOT_JSON


DROPPABLE_FIELDS = frozenset({"stream", "partial_images", "user"})
"""Optional request fields we add ourselves and may leave out when a relay refuses them."""


class UpstreamClient:
    """The `ImageAPI` port over httpx, for ONE provider (base URL, key, model, limits).

    Pass a shared `http` client to pool connections; the client is then not closed by
    `aclose`. Per-provider concurrency is the job runner's business, not this class's.
    """

    def __init__(
        self,
        provider: ProviderConfig,
        *,
        http: httpx.AsyncClient | None = None,
        capabilities: CapabilityStore | None = None,
    ) -> None:
        self.provider = provider
        self._owns_http = http is None
        self.http = http or upstream_http(headers={"User-Agent": USER_AGENT})
        # Without a store, what is learned lasts as long as this client.
        self.capabilities = capabilities if capabilities is not None else CapabilityStore()
        self._timeout = httpx.Timeout(provider.timeout, connect=provider.connect_timeout)
        # Optional fields this provider answered `unknown_parameter` to: left out from now on.
        self._refused: set[str] = set()
        # One streaming re-probe at a time: concurrent jobs must not all pay for it.
        self._probe_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"UpstreamClient({self.provider.name!r}, {self.provider.api_base!r})"

    def with_key(self, api_key: str) -> UpstreamClient:
        """The same provider with another key (a user's own), sharing HTTP and what is learned."""
        return UpstreamClient(
            self.provider.with_key(api_key), http=self.http, capabilities=self.capabilities
        )

    async def learned(self) -> Capabilities:
        """What is known about this provider's relay."""
        return await self.capabilities.get(self.provider.name)

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this instance created it (what it learned is written)."""
        await self.capabilities.flush()
        if self._owns_http:
            await self.http.aclose()

    async def run(
        self, request: ImageRequest, on_progress: ProgressHandler | None = None
    ) -> ImageResult:
        """An edit if the request has references, else a generation."""
        if request.is_edit:
            return await self.edit(request, on_progress)
        return await self.generate(request, on_progress)

    async def generate(
        self, request: ImageRequest, on_progress: ProgressHandler | None = None
    ) -> ImageResult:
        """POST /v1/images/generations (references, if any, are ignored)."""
        return await self._call("generations", request, on_progress)

    async def edit(
        self, request: ImageRequest, on_progress: ProgressHandler | None = None
    ) -> ImageResult:
        """POST /v1/images/edits with one `image[]` part per reference."""
        if not request.references:
            raise NoReferenceImageError("an edit needs at least one reference")
        if len(request.references) > self.provider.max_references:
            raise TooManyReferencesError(
                count=len(request.references), limit=self.provider.max_references
            )
        return await self._call("edits", request, on_progress)

    # --- one call: size fallback around adapting to the relay around retries around attempts ---

    async def _call(
        self, endpoint: str, request: ImageRequest, on_progress: ProgressHandler | None
    ) -> ImageResult:
        started = time.monotonic()
        size = request.size
        fallback: str | None = None
        try:
            answer = await self._adapting(endpoint, request, size, on_progress)
        except UpstreamSizeError:
            fallback = self._fallback_for(size)
            if fallback is None:
                raise
            log.info("%s refused size %s; retrying at %s", self.provider.name, size, fallback)
            await notify(on_progress, Progress("retry", index=1, detail="size_fallback"))
            size = fallback
            answer = await self._adapting(endpoint, request, size, on_progress)
        self._learn_from(endpoint, answer, request.size, fallback)
        images = await self._materialize(answer, on_progress)
        return ImageResult(
            images=tuple(images),
            usage=answer.usage,
            provider=self.provider.name,
            model=self.provider.model,
            size=answer.size or size,
            revised_prompt=next((i.revised_prompt for i in images if i.revised_prompt), None),
            elapsed=time.monotonic() - started,
            fallback_size=fallback,
        )

    async def _adapting(
        self,
        endpoint: str,
        request: ImageRequest,
        size: str | None,
        on_progress: ProgressHandler | None,
    ) -> Answer:
        """Ask, and adapt to what the relay turns out unable to do (once each).

        - A field the relay refuses as unknown (`stream`, `partial_images`, `user`): an error
          answer was not billed, so ask again without it; the client leaves it out from then on.
        - A relay that broke on a stream (while this provider's streaming is learned, not set):
          record it, warn the operator once, and ask once more without streaming. The broken
          attempt was billed upstream; docs/billing.md says so.
        - A relay that cannot edit: record it, so the chain sends edits elsewhere.
        """
        stream = await self._stream_wanted()
        while True:
            try:
                answer = await self._with_retries(endpoint, request, size, on_progress, stream)
            except UnknownParameterError as error:
                param = str(error.params.get("param") or "")
                if param not in DROPPABLE_FIELDS or param in self._refused:
                    raise
                self._refused.add(param)
                log.warning("%s refuses %r; asking without it", self.provider.name, param)
                if param in ("stream", "partial_images"):
                    stream = False
                    if self.provider.stream is None:
                        # Refused before running (nothing billed); new clients need not ask.
                        await self._learn(stream=False, stream_checked_at=time.time())
                await notify(on_progress, Progress("retry", detail=f"without_{param}"))
                continue
            except (RelayStreamError, MalformedResponseError) as error:
                # Once: the retry does not stream, so it cannot land here again.
                if not (stream and self.provider.stream is None and _cannot_stream(error)):
                    raise
                await self._learn_cannot_stream(error)
                stream = False
                await notify(on_progress, Progress("retry", detail="without_stream"))
                continue
            except NotSupportedError:
                if endpoint == "edits":
                    log.warning(
                        "%s does not support image edits (its relay cannot parse them); "
                        "edits go to other providers",
                        self.provider.name,
                    )
                    await self._learn(edits=False)
                raise
            if stream and self.provider.stream is None:
                caps = self.capabilities.cached(self.provider.name)
                if caps.stream is not True:
                    self.capabilities.note(
                        self.provider.name, stream=True, stream_checked_at=time.time()
                    )
            return answer

    async def _stream_wanted(self) -> bool:
        """Whether to ask for a stream: the provider's setting, else what was learned.

        A relay found unable to stream is probed again once `STREAM_RECHECK_SECONDS` have
        passed; the probe is claimed in the store first so concurrent jobs (and processes
        that see the store) do not all probe.
        """
        if self.provider.stream is not None:
            return self.provider.stream
        name = self.provider.name
        if (await self.capabilities.get(name)).stream is not False:
            return True
        async with self._probe_lock:
            caps = await self.capabilities.get(name)
            if caps.stream is not False:
                return True
            checked = caps.stream_checked_at
            if checked is not None and time.time() - checked < STREAM_RECHECK_SECONDS:
                return False
            await self._learn(stream_checked_at=time.time())
        log.info("%s: probing again whether its relay can stream", name)
        return True

    async def _learn_cannot_stream(self, error: UpstreamError) -> None:
        await self._learn(stream=False, stream_checked_at=time.time())
        log.warning(
            "%s: the relay cannot stream images (%s). Asking once more without streaming; "
            'set "stream": false for this provider in DRAWBRIDGE_PROVIDERS (the failed '
            "streamed attempt is billed upstream, and streaming is probed again once a day).",
            self.provider.name,
            error.detail,
        )

    def _learn_from(
        self, endpoint: str, answer: Answer, asked: str | None, fallback: str | None
    ) -> None:
        """Record what a successful answer showed, when it differs from what is known."""
        caps = self.capabilities.cached(self.provider.name)
        changes: dict[str, Any] = {}
        if endpoint == "edits" and caps.edits is not True:
            changes["edits"] = True
        result = "url" if any(item.url for item in answer.items) else "b64"
        if answer.items and caps.result != result:
            changes["result"] = result
        parsed = _parse_wxh(asked)
        if parsed is not None and parsed.tier == "4k":
            four_k = fallback is None
            if caps.four_k is not four_k:
                changes["four_k"] = four_k
        if changes:
            # Written beside the answer, not in front of it (`CapabilityStore.note`).
            self.capabilities.note(self.provider.name, **changes)

    async def _learn(self, **changes: Any) -> None:
        try:
            await self.capabilities.learn(self.provider.name, **changes)
        except Exception:
            # What was learned is an optimisation: never fail (or re-bill) a job over it.
            log.warning("%s: cannot record %s", self.provider.name, changes, exc_info=True)

    def _fallback_for(self, size: str | None) -> str | None:
        parsed = _parse_wxh(size)
        if not self.provider.size_fallback or parsed is None:
            return None
        smaller = fallback_size(parsed, self.provider.model)
        return str(smaller) if smaller is not None else None

    async def _with_retries(
        self,
        endpoint: str,
        request: ImageRequest,
        size: str | None,
        on_progress: ProgressHandler | None,
        stream: bool,
    ) -> Answer:
        attempt = 0
        while True:
            try:
                return await self._attempt(endpoint, request, size, on_progress, stream)
            except _Retry as retry:
                if attempt >= self.provider.max_retries:
                    log.warning(
                        "%s %s failed after %d retries: %s",
                        self.provider.name,
                        endpoint,
                        attempt,
                        retry.error,
                    )
                    raise retry.error from retry.__cause__
                attempt += 1
                delay = (
                    retry.delay if retry.delay is not None else BACKOFF_BASE * 2 ** (attempt - 1)
                )
                log.warning(
                    "%s %s: %s; retry %d/%d in %.1fs",
                    self.provider.name,
                    endpoint,
                    retry.error,
                    attempt,
                    self.provider.max_retries,
                    delay,
                )
                await notify(on_progress, Progress("retry", index=attempt, detail=retry.error.kind))
                await asyncio.sleep(delay)
            except UpstreamError as error:
                log.warning(
                    "%s %s failed: %s (%s)", self.provider.name, endpoint, error.kind, error
                )
                raise

    async def _attempt(
        self,
        endpoint: str,
        request: ImageRequest,
        size: str | None,
        on_progress: ProgressHandler | None,
        stream: bool,
    ) -> Answer:
        stream = stream and not self._refused & {"stream", "partial_images"}
        http_request = self._build(endpoint, request, size, on_progress, stream)
        # Each request sent is counted once: by its status when one came back, else by why
        # none did. Retries, fail-overs and stream re-asks are requests of their own.
        answered = False
        try:
            async with asyncio.timeout(self.provider.timeout):
                if endpoint == "edits":
                    await notify(on_progress, Progress("uploading", index=len(request.references)))
                response = await self.http.send(http_request, stream=True)
                answered = True
                self._count(str(response.status_code))
                try:
                    if not response.is_success:
                        body = await _read_limited(response, ERROR_BODY_LIMIT)
                        raise self._error_answer(response, body, stream)
                    return await self._read_answer(response, request.n, on_progress)
                finally:
                    await response.aclose()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if not answered:
                self._count("timeout" if isinstance(exc, httpx.ConnectTimeout) else "error")
            error = UpstreamUnavailableError(
                f"cannot connect: {type(exc).__name__}", code=CODE_CONNECT_FAILED, unbilled=True
            )
            raise _Retry(error) from exc
        except (TimeoutError, httpx.TimeoutException) as exc:
            if not answered:
                self._count("timeout")
            # The request may be running upstream, and may be billed: never retried.
            raise UpstreamTimeoutError(
                f"no answer within {self.provider.timeout:g}s ({type(exc).__name__})",
                code=CODE_TIMEOUT,
            ) from exc
        except httpx.TransportError as exc:
            if not answered:
                self._count("error")
            raise UpstreamUnavailableError(
                f"connection lost: {type(exc).__name__}", code=CODE_CONNECTION_LOST
            ) from exc

    def _count(self, status: str) -> None:
        UPSTREAM_REQUESTS.labels(self.provider.name, status).inc()

    def _build(
        self,
        endpoint: str,
        request: ImageRequest,
        size: str | None,
        on_progress: ProgressHandler | None,
        stream: bool,
    ) -> httpx.Request:
        provider = self.provider
        fields: dict[str, Any] = {"model": provider.model, "prompt": request.prompt, "n": request.n}
        optional = {
            "size": size,
            "quality": request.quality,
            "background": request.background,
            "output_format": request.output_format,
            "output_compression": request.output_compression,
            "moderation": request.moderation,
            "user": None if "user" in self._refused else request.user,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        if stream:
            fields["stream"] = True
            fields["partial_images"] = provider.partial_images
        if provider.response_format:
            fields["response_format"] = provider.response_format
        headers = {
            "User-Agent": USER_AGENT,
            "Accept": "application/json, text/event-stream",
        }
        if provider.api_key:
            headers["Authorization"] = f"Bearer {provider.api_key}"
        url = f"{provider.api_base}/v1/images/{endpoint}"
        if endpoint == "edits":
            form = {k: _form_value(v) for k, v in fields.items()}
            files = [("image[]", (r.filename, r.data, r.mime)) for r in request.references]
            built = self.http.build_request(
                "POST", url, data=form, files=files, headers=headers, timeout=self._timeout
            )
            sent = Progress("waiting")
        else:
            built = self.http.build_request(
                "POST", url, json=fields, headers=headers, timeout=self._timeout
            )
            sent = Progress("request_sent")
        if on_progress is not None and isinstance(built.stream, httpx.AsyncByteStream):
            built.stream = _SentSignal(built.stream, lambda: notify(on_progress, sent))
        return built

    def _error_answer(self, response: httpx.Response, body: bytes, streamed: bool) -> Exception:
        error = classify_error(
            response.status_code,
            body,
            response.headers,
            streamed=streamed,
            secret=self.provider.api_key,
        )
        if isinstance(error, UpstreamUnavailableError) and error.unbilled:
            # A gateway answering with nothing (or one-api's rewrap of that) never reached
            # the model: asking this provider again is safe.
            return _Retry(error)
        if (
            isinstance(error, RateLimitedError)
            and error.retry_after is not None
            and error.retry_after <= MAX_RETRY_AFTER
        ):
            return _Retry(error, error.retry_after)
        return error

    async def _read_answer(
        self, response: httpx.Response, wanted: int, on_progress: ProgressHandler | None
    ) -> Answer:
        content_type = response.headers.get("content-type", "").lower()
        try:
            if content_type.startswith("text/event-stream"):
                return await self._read_events(response, wanted, on_progress)
            # Also the answer of relays that ignore `stream`.
            return await self._read_json(response)
        except httpx.TimeoutException:
            raise
        except httpx.TransportError as exc:
            # The upstream answered 200: it ran. Nothing to retry, nothing to fall back to.
            raise MalformedResponseError(
                f"response cut: {type(exc).__name__}", code=CODE_STREAM_CUT
            ) from exc

    async def _read_json(self, response: httpx.Response) -> Answer:
        reader = JsonImageReader(max_image_bytes=self.provider.max_result_bytes)
        async for chunk in response.aiter_bytes():
            reader.feed(chunk)
        obj = load_object(reader.finish(), "response")
        return self._answer_from(obj, reader.images)

    def _answer_from(self, obj: dict[str, Any], images: Sequence[bytes]) -> Answer:
        data = obj.get("data")
        if obj.get("error") and not data:
            # Some relays wrap failures in a 200.
            raise classify_error(200, obj, None, secret=self.provider.api_key)
        items = (
            [item_from(entry, images) for entry in data if isinstance(entry, dict)]
            if isinstance(data, list)
            else []
        )
        size = obj.get("size")
        return Answer(
            items=[i for i in items if i is not None],
            usage=usage_of(obj),
            size=size if isinstance(size, str) and size else None,
        )

    async def _read_events(
        self, response: httpx.Response, wanted: int, on_progress: ProgressHandler | None
    ) -> Answer:
        reader = SseReader(self.provider.max_result_bytes)
        answer = Answer()
        done = False
        chunks = response.aiter_bytes()
        try:
            async for chunk in chunks:
                for message in reader.feed(chunk):
                    done = await self._on_event(message, answer, on_progress)
                    if done:
                        break
                if done:
                    break
            else:
                for message in reader.finish():
                    await self._on_event(message, answer, on_progress)
        except httpx.TransportError:
            if not answer.items or len(answer.items) < wanted:
                raise
            log.info("%s: stream cut after all %d images", self.provider.name, wanted)
        if not answer.items:
            raise MalformedResponseError(
                "stream ended without a completed image", code=CODE_STREAM_CUT
            )
        if done:
            await _drain(chunks)
        return answer

    async def _on_event(
        self, message: SseMessage, answer: Answer, on_progress: ProgressHandler | None
    ) -> bool:
        """Apply one event to `answer`; True at `[DONE]`."""
        text = message.text.strip()
        if not text:
            return False
        if text == b"[DONE]":
            return True
        obj = load_object(text, "stream event")
        kind_value = obj.get("type")
        kind = kind_value if isinstance(kind_value, str) else ""
        if message.event == "error" or kind == "error" or obj.get("error"):
            raise classify_error(200, obj, None, secret=self.provider.api_key)
        if kind.endswith("partial_image"):
            found = item_from(obj, message.images)
            if found is not None and found.data is not None:
                index = obj.get("partial_image_index")
                await notify(
                    on_progress,
                    Progress("partial", data=found.data, index=index if type(index) is int else 0),
                )
        elif kind.endswith("completed"):
            found = item_from(obj, message.images)
            if found is not None:
                answer.items.append(found)
            # Relays repeat the whole request's usage on each completed event: keep the last.
            answer.usage = usage_of(obj) or answer.usage
            size = obj.get("size")
            if isinstance(size, str) and size:
                answer.size = size
        elif isinstance(obj.get("data"), list):
            # A whole non-streamed answer sent as one event.
            whole = self._answer_from(obj, message.images)
            answer.items.extend(whole.items)
            answer.usage = whole.usage or answer.usage
            answer.size = whole.size or answer.size
        return False

    # --- results ---

    async def _materialize(
        self, answer: Answer, on_progress: ProgressHandler | None
    ) -> list[GeneratedImage]:
        if not answer.items:
            raise MalformedResponseError("no image in the response", code=CODE_NO_DATA)
        images: list[GeneratedImage] = []
        for index, item in enumerate(answer.items):
            data = item.data
            if data is None and item.url is not None:
                await notify(on_progress, Progress("downloading", index=index))
                data = await self._download(item.url)
            if data is None:
                continue
            mime, width, height = await inspect_image(data)
            images.append(GeneratedImage(data, mime, width, height, item.revised_prompt))
        return images

    async def _download(self, url: str) -> bytes:
        """Fetch a result url at once (relay urls expire), capped at max_result_bytes."""
        limit = self.provider.max_result_bytes
        host = httpx.URL(url).host if url.startswith(("http://", "https://")) else ""
        if not host:
            raise ResultDownloadError("result url is not http(s)", code="bad_url")
        try:
            async with asyncio.timeout(self.provider.timeout):
                # No Authorization: the url may point at another host (a CDN).
                async with self.http.stream(
                    "GET",
                    url,
                    # Images need no content coding; httpx would inflate a whole chunk of
                    # one at once, far past the cap, so none is asked for or accepted.
                    headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                    timeout=self._timeout,
                    follow_redirects=True,
                ) as response:
                    if not response.is_success:
                        raise ResultDownloadError(
                            f"GET result on {host}: {response.status_code}",
                            status=response.status_code,
                        )
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise ResultDownloadError(
                            f"result on {host} is {declared} bytes", code=CODE_TOO_LARGE
                        )
                    coding = response.headers.get("content-encoding", "").strip().lower()
                    if coding not in ("", "identity"):
                        raise ResultDownloadError(
                            f"result on {host} sent content-encoding {coding[:32]!r}",
                            code=CODE_BAD_ENCODING,
                        )
                    buffer = io.BytesIO()
                    async for chunk in response.aiter_raw():
                        buffer.write(chunk)
                        if buffer.tell() > limit:
                            raise ResultDownloadError(
                                f"result on {host} exceeds {limit} bytes", code=CODE_TOO_LARGE
                            )
                    return buffer.getvalue()
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise ResultDownloadError(f"GET result on {host} timed out", code=CODE_TIMEOUT) from exc
        except httpx.HTTPError as exc:
            raise ResultDownloadError(
                f"GET result on {host}: {type(exc).__name__}", code=CODE_CONNECTION_LOST
            ) from exc


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows `[DONE]` (the body's end) so the connection goes back to the pool.

    A response closed before its last byte is read closes its connection: every streamed job
    then paid a new TCP (and, with real relays, TLS) handshake. What a relay sends after
    `[DONE]` is nothing or a few bytes; one that keeps the stream open, or sends more than a
    little, is not waited for (the connection is closed instead, as before).
    """
    left = DRAIN_BYTES
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for chunk in chunks:
                left -= len(chunk)
                if left < 0:
                    return
    except (TimeoutError, httpx.TransportError):
        return


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])
