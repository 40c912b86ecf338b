"""An offline OpenAI-compatible image API, for demos, tests and benchmarks.

It speaks the wire format of `/v1/images/generations` and `/v1/images/edits` the way a
new-api style reseller in front of gpt-image-2 does (see the project's upstream API notes,
`upstream-api.md`): b64 or url results, relay extra fields, server-sent
event streams with partial previews, and every failure a real relay produces, injected by
`MockOptions.fail` or by a `[fail:KIND]` marker in the prompt. Result images are real
PNG/JPEG/WebP files of exactly the requested size, showing the prompt, so a demo looks alive.

The error *messages* below imitate what upstreams really send (Chinese from new-api/one-api,
English from OpenAI): they are wire data for the client to classify, never text we show users.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import re
import secrets
import textwrap
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import BodyPartReader, web
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from bot.startup import listen_error

__all__ = [
    "FAIL_KINDS",
    "MockOptions",
    "MockUpstream",
    "RecordedFile",
    "RecordedRequest",
    "add_cli_arguments",
    "build_parser",
    "run_from_args",
    "serve",
]

log = logging.getLogger(__name__)

FAIL_KINDS: Final[Mapping[str, str]] = {
    "invalid_key": "401 new-api 无效的令牌 (type new_api_error, code '')",
    "invalid_key_en": "401 new-api English variant: 'Invalid token'",
    "token_expired": "401 one-api 该令牌已过期",
    "token_exhausted": "401 one-api 该令牌额度已用尽",
    "quota": "403 new-api insufficient_user_quota 用户额度不足",
    "openai_quota": "429 OpenAI insufficient_quota, no Retry-After",
    "no_channel": "503 new-api model_not_found 分组 default 下模型 X 无可用渠道",
    "group_denied": "403 new-api 无权访问 vip 分组",
    "moderation": "400 gpt-image moderation_blocked (image_generation_user_error)",
    "content_policy": "400 DALL-E style content_policy_violation",
    "sensitive_words": "400 relay filter sensitive_words_detected 敏感词检测失败",
    "invalid_size": "400 invalid size naming the requested size",
    "unknown_parameter": "400 unknown_parameter, param response_format",
    "rate_limit": "429 rate_limit_exceeded with Retry-After: 1",
    "too_large": "413 nginx HTML page",
    "upstream_banned": "500 relay-wrapped upstream account ban (GPT封号, type upstream_error)",
    "server_error": "500 OpenAI generic server_error with a JSON body",
    "bad_gateway": "502 with an empty body (did not run: safe to retry)",
    "html_502": "502 with a Cloudflare-like HTML body (a body: may have run)",
    "unavailable": "503 with an empty body (did not run: safe to retry)",
    "not_implemented": "501 one-api api_not_implemented",
    "timeout": "sleeps 3600 s before answering (the client times out; stop() cancels it)",
    "malformed": "200, Content-Type application/json, an HTML body (relay SPA page)",
    "no_data": '200 {"created":1,"data":[]}',
    "truncated_b64": "200 with each b64_json cut in the middle (not valid base64, not a PNG)",
    "expired_url": "200 url answer (even in b64 mode) whose url already 404s",
    "stream_cut": "a partial event, then the connection closes mid-event (plain: body cut)",
    "stream_error": "event: error with code moderation_blocked (plain: 200 with an error body)",
    "flaky_N": "the first N requests per distinct prompt get 503 with an empty body, then ok",
}
"""Every failure kind `MockOptions.fail` or a `[fail:KIND]` prompt marker can inject."""

_MARKER = re.compile(r"\[fail:([A-Za-z0-9_]+)\]")
_FLAKY = re.compile(r"flaky_(\d+)")
# Kinds that change a successful answer instead of replacing it, so they run after validation.
_LATE_KINDS: Final = frozenset({"truncated_b64", "expired_url", "stream_cut", "stream_error"})

GENERATIONS_PATH: Final = "/v1/images/generations"
EDITS_PATH: Final = "/v1/images/edits"

_MAX_PROMPT = 32_000
_MAX_IMAGES = 16
_MAX_IMAGE_BYTES = 50 * 1024 * 1024
_MIN_AREA = 655_360
_MAX_AREA = 8_294_400
_MAX_EDGE = 3840
_EDGE_4K = 2560
_LEGACY_SIZES: Final = frozenset({(1024, 1024), (1536, 1024), (1024, 1536)})
# gpt-image-1 family output tokens from OpenAI's price table (auto counts as medium).
_LEGACY_TOKENS: Final[Mapping[str, Mapping[tuple[int, int], int]]] = {
    "low": {(1024, 1024): 272, (1024, 1536): 408, (1536, 1024): 400},
    "medium": {(1024, 1024): 1056, (1024, 1536): 1584, (1536, 1024): 1568},
    "high": {(1024, 1024): 4160, (1024, 1536): 6240, (1536, 1024): 6208},
}
_QUALITY_FACTOR: Final[Mapping[str, int]] = {"low": 16, "medium": 48, "high": 96}
_EXTENSION_FORMATS: Final[Mapping[str, str]] = {
    "png": "PNG",
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "webp": "WEBP",
}
_MIME: Final[Mapping[str, str]] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PARTIAL_EDGE = 256
_RENDER_CACHE_SIZE = 8
_MODELS: Final = ("gpt-image-2", "gpt-image-1.5", "gpt-image-1", "gpt-image-1-mini")
BILLING_KINDS: Final = ("new-api", "one-api", "none")
TOKEN_USAGE_PATH: Final = "/api/usage/token"
SUBSCRIPTION_PATH: Final = "/v1/dashboard/billing/subscription"
USAGE_PATH: Final = "/v1/dashboard/billing/usage"
# new-api's and one-api's default QuotaPerUnit: raw quota per USD.
_QUOTA_PER_UNIT: Final = 500_000
_UNLIMITED_AMOUNT: Final = 100_000_000.0
# gpt-image-2 list prices, USD per token (upstream-api.md "Cost").
_PRICE_OUTPUT: Final = 30 / 1_000_000
_PRICE_IMAGE_INPUT: Final = 8 / 1_000_000
_PRICE_TEXT_INPUT: Final = 5 / 1_000_000


@dataclass
class MockOptions:
    """How the mock behaves; `MockUpstream.options` may be changed between requests."""

    mode: str = "b64"  # "b64" | "url": which field carries results
    latency: float = 0.0  # seconds before answering (streams: spread over the events)
    stream: bool = True  # False: answer streamed requests with plain JSON, like some relays
    url_ttl: float = 1800.0  # seconds a result url stays downloadable
    fail: str | None = None  # inject this FAIL_KINDS kind into every image request
    api_key: str | None = None  # if set, any other bearer gets new-api's 401
    extra_fields: bool = True  # relay fields: id, gen_id, source_account_id, url "" next to b64
    reject_4k: bool = False  # long edge > 2560 -> invalid size, like groups without 4K
    accept_response_format: bool = False  # else `response_format` -> 400 unknown_parameter
    fast_images: bool = False  # single-colour PNGs (still the real size) for benchmarks
    # Photo-like grain so PNGs weigh what real results do (~25 MB at 3840x2160), for benchmarks.
    noisy_images: bool = False
    # Request fields answered with 400 unknown_parameter, like relays that reject `stream`.
    refuse_fields: tuple[str, ...] = ()
    # What `GET /v1/models` lists; leave gpt-image-2 out to imitate a key whose group lacks it.
    models: tuple[str, ...] = _MODELS
    # Which relay's balance endpoints to imitate: "new-api" (token usage endpoint plus the
    # billing pair, subscription = left + used), "one-api" (billing pair only, subscription =
    # left) or "none" (404, like litellm or a bare upstream).
    billing: str = "new-api"
    # The key's balance in USD; every request that passes validation spends its list price.
    balance: float = 25.0
    unlimited: bool = False  # an unlimited token (both relays report 100000000)
    # False: /v1/images/edits answers like one-api, which has no edits (503, empty model name).
    edits: bool = True


@dataclass(frozen=True, slots=True)
class RecordedFile:
    """One uploaded file part of an edit request, as the mock received it."""

    field: str
    filename: str
    content_type: str
    size: int
    width: int  # 0 when the bytes are not an image Pillow can open
    height: int


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One image request, recorded before any validation so tests see even rejected ones."""

    path: str
    fields: dict[str, str]
    files: list[RecordedFile]
    authorization: str
    stream: bool  # whether the request asked for a stream
    mask: RecordedFile | None = None
    # The client's address and port: requests that share one are on one kept-alive connection.
    peer: str = ""


class MockUpstream:
    """An aiohttp server imitating a new-api reseller in front of gpt-image-2."""

    def __init__(self, options: MockOptions | None = None) -> None:
        self.options: MockOptions = options or MockOptions()
        self.requests: list[RecordedRequest] = []
        # Image requests being answered now, and the most there ever were at once (a
        # provider's `concurrency` across every process is checked against this).
        self.in_flight = 0
        self.max_in_flight = 0
        self.base_url: str = ""
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._files: dict[str, _StoredFile] = {}
        self._flaky: Counter[str] = Counter()
        self._renders: OrderedDict[_RenderSpec, _Rendered] = OrderedDict()
        self._wildcard_host = False
        # USD spent by requests that passed validation, for the balance endpoints.
        self.spent: float = 0.0

    async def __aenter__(self) -> MockUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind and serve; returns the base URL (`http://127.0.0.1:PORT`, without `/v1`)."""
        if self._runner is not None:
            raise RuntimeError("mock upstream already started")
        app = web.Application(
            # Edits carry up to 16 images of up to 50 MB; the multipart reader is not capped by
            # this, but JSON bodies are read whole.
            client_max_size=64 * 1024 * 1024,
            middlewares=[self._track_handler],
        )
        app.router.add_post(GENERATIONS_PATH, self._generations)
        app.router.add_post(EDITS_PATH, self._edits)
        app.router.add_get("/v1/models", self._models)
        # Both relays serve the billing pair with and without the /v1 prefix; new-api's token
        # endpoint is registered with a trailing slash (gin redirects the bare path).
        for path in (SUBSCRIPTION_PATH, SUBSCRIPTION_PATH.removeprefix("/v1")):
            app.router.add_get(path, self._subscription)
        for path in (USAGE_PATH, USAGE_PATH.removeprefix("/v1")):
            app.router.add_get(path, self._usage)
        app.router.add_get(TOKEN_USAGE_PATH + "/", self._token_usage)
        app.router.add_get(TOKEN_USAGE_PATH, self._token_usage)
        app.router.add_get("/files/{name}", self._download)
        # A short shutdown timeout: stop() cancels handlers itself and must never hang.
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        self._wildcard_host = host in ("0.0.0.0", "::", "")
        public_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, host)
        if ":" in public_host and not public_host.startswith("["):
            public_host = f"[{public_host}]"
        self.base_url = f"http://{public_host}:{bound_port}"
        log.info("mock upstream listening on %s", self.base_url)
        return self.base_url

    async def stop(self) -> None:
        """Stop serving; cancels sleeping requests and open streams so it returns promptly."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        pending = [task for task in self._handlers if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        await runner.cleanup()
        self._files.clear()
        self._renders.clear()

    # --- plumbing ---

    @web.middleware
    async def _track_handler(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # Handlers are remembered so stop() can cancel a `timeout` sleep or an open stream.
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            return await handler(request)
        finally:
            if task is not None:
                self._handlers.discard(task)

    def _origin(self, request: web.Request) -> str:
        # Bound to a wildcard address, the Host the client used is the one it can reach.
        if self._wildcard_host and request.host:
            return f"{request.scheme}://{request.host}"
        return self.base_url

    # --- routes ---

    async def _generations(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, edit=False)

    async def _edits(self, request: web.Request) -> web.StreamResponse:
        if not self.options.edits:
            # one-api does not parse the model out of a multipart body (relays.md).
            self.requests.append(
                RecordedRequest(
                    request.path, {}, [], request.headers.get("Authorization", ""), False
                )
            )
            return _error_response(503, "当前分组 default 下对于模型  无可用渠道", "one_api_error")
        return await self._counted(request, edit=True)

    async def _counted(self, request: web.Request, *, edit: bool) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._image_request(request, edit=edit)
        finally:
            self.in_flight -= 1

    async def _models(self, request: web.Request) -> web.StreamResponse:
        rejected = self._check_auth(request.headers.get("Authorization", ""))
        if rejected is not None:
            return rejected
        created = 1_745_000_000
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "openai",
                "supported_endpoint_types": ["image-generation"],
            }
            for name in self.options.models
        ]
        return web.json_response({"object": "list", "data": data, "success": True})

    # --- balance endpoints (shapes from new-api's and one-api's controller/billing.go) ---

    def _left(self) -> float:
        return max(0.0, self.options.balance - self.spent)

    async def _subscription(self, request: web.Request) -> web.StreamResponse:
        options = self.options
        if options.billing not in ("new-api", "one-api"):
            return web.Response(status=404, text="404 page not found")
        rejected = self._check_auth(request.headers.get("Authorization", ""))
        if rejected is not None:
            return rejected
        if options.unlimited:
            amount = _UNLIMITED_AMOUNT
        elif options.billing == "new-api":
            amount = self._left() + self.spent  # new-api: remain + used
        else:
            amount = self._left()  # one-api: what is left
        return web.json_response(
            {
                "object": "billing_subscription",
                "has_payment_method": True,
                "soft_limit_usd": amount,
                "hard_limit_usd": amount,
                "system_hard_limit_usd": amount,
                "access_until": 0,
            }
        )

    async def _usage(self, request: web.Request) -> web.StreamResponse:
        if self.options.billing not in ("new-api", "one-api"):
            return web.Response(status=404, text="404 page not found")
        rejected = self._check_auth(request.headers.get("Authorization", ""))
        if rejected is not None:
            return rejected
        # Hundredths of the display unit, like OpenAI's cents.
        return web.json_response({"object": "list", "total_usage": self.spent * 100})

    async def _token_usage(self, request: web.Request) -> web.StreamResponse:
        if self.options.billing != "new-api":
            return web.Response(status=404, text="404 page not found")
        authorization = request.headers.get("Authorization", "")
        if not authorization:
            return web.json_response(
                {"success": False, "message": "No Authorization header"}, status=401
            )
        rejected = self._check_auth(authorization)
        if rejected is not None:
            return rejected
        left = round(self._left() * _QUOTA_PER_UNIT)
        used = round(self.spent * _QUOTA_PER_UNIT)
        return web.json_response(
            {
                "code": True,
                "message": "ok",
                "data": {
                    "object": "token_usage",
                    "name": "drawbridge",
                    "total_granted": left + used,
                    "total_used": used,
                    "total_available": left,
                    "unlimited_quota": self.options.unlimited,
                    "model_limits": {},
                    "model_limits_enabled": False,
                    "expires_at": 0,
                },
            }
        )

    async def _download(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["name"].rsplit(".", 1)[0]
        stored = self._files.get(token)
        if stored is None or stored.expires_at <= time.monotonic():
            self._files.pop(token, None)
            return web.Response(status=404, text="file not found or expired\n")
        return web.Response(body=stored.data, content_type=stored.mime)

    async def _image_request(self, request: web.Request, *, edit: bool) -> web.StreamResponse:
        options = self.options
        authorization = request.headers.get("Authorization", "")
        try:
            parsed = await (_read_edit(request) if edit else _read_generation(request))
        except _Rejected as rejected:
            self.requests.append(RecordedRequest(request.path, {}, [], authorization, False))
            return rejected.response
        requested_stream = _truthy(parsed.raw.get("stream"))
        self.requests.append(
            RecordedRequest(
                path=request.path,
                fields={key: str(value) for key, value in parsed.raw.items()},
                files=[upload.record for upload in parsed.images],
                authorization=authorization,
                stream=requested_stream,
                mask=parsed.mask.record if parsed.mask is not None else None,
                peer=_peer(request),
            )
        )
        rejected_auth = self._check_auth(authorization)
        if rejected_auth is not None:
            return rejected_auth

        prompt = parsed.raw.get("prompt")
        prompt_text = prompt if isinstance(prompt, str) else ""
        kind = self._fail_kind(prompt_text)
        try:
            if kind is not None and kind not in _LATE_KINDS:
                early = await self._early_failure(kind, prompt_text, parsed, options)
                if early is not None:
                    return early
                kind = None  # a flaky request past its failures, or a finished timeout
            params = _validate(parsed, options, edit=edit)
        except _Rejected as rejected:
            await self._sleep(options.latency)
            return rejected.response
        # Relays charge once a request reaches the model, whatever happens to the answer.
        self.spent += _price(_usage(params))

        stream = params.stream and options.stream
        if stream:
            return await self._answer_stream(request, params, options, kind)
        await self._sleep(options.latency)
        return await self._answer_json(request, params, options, kind)

    # --- auth and injected failures ---

    def _check_auth(self, authorization: str) -> web.Response | None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            token = authorization.strip()
        token = token.strip()
        if not token:
            return _error_response(401, "未提供令牌", "new_api_error", "", "")
        if self.options.api_key is not None and token != self.options.api_key:
            return _error_response(401, "无效的令牌", "new_api_error", "", "")
        return None

    def _fail_kind(self, prompt: str) -> str | None:
        # The prompt marker wins so one test can send a single failing request on a shared mock.
        match = _MARKER.search(prompt)
        if match is not None:
            return match.group(1).lower()
        return self.options.fail

    async def _early_failure(
        self, kind: str, prompt: str, parsed: _Parsed, options: MockOptions
    ) -> web.StreamResponse | None:
        flaky = _FLAKY.fullmatch(kind)
        if flaky is not None:
            self._flaky[prompt] += 1
            if self._flaky[prompt] <= int(flaky.group(1)):
                await self._sleep(options.latency)
                return web.Response(status=503)
            return None
        if kind == "timeout":
            await asyncio.sleep(3600)
            return None
        await self._sleep(options.latency)
        model = str(parsed.raw.get("model") or "gpt-image-2")
        size = str(parsed.raw.get("size") or "1024x1024")
        return _failure_response(kind, model=model, size=size)

    # --- answers ---

    async def _render(self, spec: _RenderSpec) -> _Rendered:
        cached = self._renders.get(spec)
        if cached is not None:
            self._renders.move_to_end(spec)
            return cached
        rendered = await asyncio.to_thread(_draw, spec)
        self._renders[spec] = rendered
        while len(self._renders) > _RENDER_CACHE_SIZE:
            self._renders.popitem(last=False)
        return rendered

    async def _render_all(self, params: _Params, options: MockOptions) -> list[_Rendered]:
        return [await self._render(_spec(params, index, options)) for index in range(params.n)]

    def _store_file(self, rendered: _Rendered, ttl: float) -> str:
        now = time.monotonic()
        for token in [t for t, f in self._files.items() if f.expires_at <= now]:
            del self._files[token]
        token = secrets.token_urlsafe(18)
        self._files[token] = _StoredFile(rendered.data, rendered.mime, now + ttl)
        return token

    def _result_url(
        self, request: web.Request, rendered: _Rendered, kind: str | None, options: MockOptions
    ) -> str:
        ext = rendered.mime.rsplit("/", 1)[1]
        if kind == "expired_url":
            token = secrets.token_urlsafe(18)  # never stored: 404 like a link past its 30 min
        else:
            token = self._store_file(rendered, options.url_ttl)
        return f"{self._origin(request)}/files/{token}.{ext}"

    def _blob(self, rendered: _Rendered, kind: str | None) -> bytes:
        if kind != "truncated_b64":
            return rendered.b64
        cut = len(rendered.b64) // 2
        if cut % 4 == 0:
            cut -= 1  # a length that is not a multiple of 4 is invalid base64 for sure
        return rendered.b64[:cut]

    async def _answer_json(
        self, request: web.Request, params: _Params, options: MockOptions, kind: str | None
    ) -> web.StreamResponse:
        if kind == "stream_error":
            return web.json_response(_error_body(*_STREAM_ERROR), status=200, dumps=_dumps)
        rendered = await self._render_all(params, options)
        use_url = (params.mode == "url" or kind == "expired_url") and kind != "truncated_b64"
        created = int(time.time())
        items: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for index, image in enumerate(rendered):
            item: dict[str, Any] = {}
            if use_url:
                item["url"] = self._result_url(request, image, kind, options)
            else:
                item["b64_json"] = _blob_marker(len(blobs))
                blobs.append(self._blob(image, kind))
                if options.extra_fields:
                    item["url"] = ""
            item["revised_prompt"] = _revised_prompt(params.prompt)
            if options.extra_fields:
                item.update(_relay_fields(params.edit, created, index))
            items.append(item)
        doc: dict[str, Any] = {"created": created, "data": items}
        doc.update(_echo(params))
        doc["model"] = params.model
        doc["usage"] = _usage(params)
        body = b"".join(_encode_with_blobs(doc, blobs))
        if kind == "stream_cut":
            return await _cut_response(request, body, "application/json")
        return web.Response(body=body, content_type="application/json")

    async def _answer_stream(
        self, request: web.Request, params: _Params, options: MockOptions, kind: str | None
    ) -> web.StreamResponse:
        prefix = "image_edit" if params.edit else "image_generation"
        partials = params.partial_images
        if kind == "stream_cut":
            partials = max(partials, 1)
        # The latency is spread over the events, as a real stream trickles in. Each event is
        # due at its share of the latency after the start, not after the event before it: a
        # timer wakes a little late (3-6 ms per 333 ms sleep on a Firecracker VM), and chained
        # sleeps would add that up into a latency the client never asked the mock for.
        pause = options.latency / (params.n * (partials + 1))
        due = asyncio.get_running_loop().time()
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await response.prepare(request)
        if kind == "stream_error":
            await self._sleep(pause)
            await response.write(
                _sse("error", {"type": "error", **_error_body(*_STREAM_ERROR)}, ())
            )
            await response.write_eof()
            return response
        rendered = await self._render_all(params, options)
        usage = _usage(params)
        for image in rendered:
            for index in range(partials):
                due += pause
                await self._sleep_until(due)
                event = {
                    "type": f"{prefix}.partial_image",
                    "b64_json": _blob_marker(0),
                    "partial_image_index": index,
                    "created_at": int(time.time()),
                    **_echo(params),
                }
                preview = image.partials[min(index, len(image.partials) - 1)]
                await response.write(_sse(event["type"], event, (preview,)))
            due += pause
            await self._sleep_until(due)
            completed: dict[str, Any] = {"type": f"{prefix}.completed"}
            blobs: tuple[bytes, ...] = ()
            if params.mode == "url" or kind == "expired_url":
                completed["url"] = self._result_url(request, image, kind, options)
            else:
                completed["b64_json"] = _blob_marker(0)
                blobs = (self._blob(image, kind),)
            completed.update(created_at=int(time.time()), **_echo(params), usage=usage)
            message = _sse(completed["type"], completed, blobs)
            if kind == "stream_cut":
                await response.write(message[: len(message) // 2])
                _drop_connection(request)
                return response
            await response.write(message)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await self._sleep_until(asyncio.get_running_loop().time() + seconds)

    async def _sleep_until(self, due: float) -> None:
        """Until the loop's clock reads `due` (at once if it already does).

        A timer wakes late in proportion to its length (1.5-2 % on a Firecracker VM: 6 ms of
        a 333 ms sleep), so a long wait is taken in shrinking steps and ends within about a
        millisecond of `due`: the latency asked for is the latency served.
        """
        loop = asyncio.get_running_loop()
        left = due - loop.time()
        while left > 0.002:
            await asyncio.sleep(left * 0.95)
            left = due - loop.time()
        if left > 0:
            await asyncio.sleep(left)


# --- request parsing and validation ---


class _Rejected(Exception):
    """Carries the error answer out of deep validation code."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


@dataclass(frozen=True, slots=True)
class _Upload:
    record: RecordedFile
    image_format: str | None  # Pillow's format name, None when not an image


@dataclass(frozen=True, slots=True)
class _Parsed:
    raw: dict[str, Any]
    form: bool  # values are strings from a multipart form
    images: tuple[_Upload, ...] = ()
    mask: _Upload | None = None


@dataclass(frozen=True, slots=True)
class _Params:
    edit: bool
    prompt: str
    model: str
    n: int
    width: int
    height: int
    quality: str
    background: str
    output_format: str
    output_compression: int | None
    stream: bool
    partial_images: int
    mode: str
    references: tuple[RecordedFile, ...]


async def _read_generation(request: web.Request) -> _Parsed:
    body = await request.read()
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _Rejected(
            _error_response(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly.)",
                "invalid_request_error",
                None,
                None,
            )
        ) from None
    if not isinstance(raw, dict):
        raise _Rejected(
            _error_response(
                400, "Invalid request body: expected a JSON object.", "invalid_request_error"
            )
        )
    return _Parsed(raw=raw, form=False)


async def _read_edit(request: web.Request) -> _Parsed:
    if not request.content_type.startswith("multipart/"):
        raise _Rejected(
            _error_response(
                400,
                "Invalid Content-Type header "
                f"({request.content_type}), expected multipart/form-data.",
                "invalid_request_error",
            )
        )
    reader = await request.multipart()
    raw: dict[str, Any] = {}
    images: list[_Upload] = []
    mask: _Upload | None = None
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):  # nested multipart: no OpenAI client sends it
            continue
        name = part.name or ""
        is_file = name in ("image[]", "image", "mask") or part.filename is not None
        if not is_file:
            raw[name] = await part.text()
            continue
        data = bytes(await part.read())
        upload = await asyncio.to_thread(
            _inspect_upload,
            name,
            part.filename or "",
            part.headers.get("Content-Type", ""),
            data,
        )
        if name == "mask":
            mask = upload
        elif name in ("image[]", "image"):
            images.append(upload)
    return _Parsed(raw=raw, form=True, images=tuple(images), mask=mask)


def _inspect_upload(name: str, filename: str, content_type: str, data: bytes) -> _Upload:
    width = height = 0
    image_format: str | None = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image_format = image.format
            image.verify()
    except Exception:  # any decoder error means "not a usable image"
        image_format = None
    record = RecordedFile(name, filename, content_type, len(data), width, height)
    return _Upload(record, image_format)


def _truthy(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return isinstance(value, str) and value.strip().lower() in ("true", "1")


def _validate(parsed: _Parsed, options: MockOptions, *, edit: bool) -> _Params:
    raw = parsed.raw
    mode = options.mode
    for name in options.refuse_fields:
        if name in raw:
            raise _Rejected(
                _error_response(
                    400,
                    f"Unknown parameter: '{name}'.",
                    "invalid_request_error",
                    "unknown_parameter",
                    name,
                )
            )
    if "response_format" in raw:
        if not options.accept_response_format:
            raise _Rejected(
                _error_response(
                    400,
                    "Unknown parameter: 'response_format'.",
                    "invalid_request_error",
                    "unknown_parameter",
                    "response_format",
                )
            )
        mode = "url" if _enum(raw, "response_format", ("url", "b64_json"), "") == "url" else "b64"

    prompt = raw.get("prompt")
    if prompt is None:
        raise _Rejected(_missing("prompt"))
    if not isinstance(prompt, str):
        raise _Rejected(_bad_type("prompt", "a string", prompt))
    if not prompt.strip():
        raise _Rejected(
            _error_response(
                400,
                "Invalid 'prompt': empty string. Expected a string with minimum length 1, "
                "but got an empty string instead.",
                "invalid_request_error",
                "empty_string",
                "prompt",
            )
        )
    if len(prompt) > _MAX_PROMPT:
        raise _Rejected(
            _error_response(
                400,
                f"Invalid 'prompt': string too long. Expected a string with maximum length "
                f"{_MAX_PROMPT}, but got a string with length {len(prompt)} instead.",
                "invalid_request_error",
                "string_above_max_length",
                "prompt",
            )
        )
    model = str(raw.get("model") or "gpt-image-2")
    n = _integer(raw, "n", 1, 1, 10, parsed.form)
    width, height = _size(str(raw.get("size") or "auto"), model, options.reject_4k)
    quality = _enum(raw, "quality", ("low", "medium", "high", "auto"), "auto")
    background = _enum(raw, "background", ("transparent", "opaque", "auto"), "auto")
    output_format = _enum(raw, "output_format", ("png", "jpeg", "webp"), "png")
    _enum(raw, "moderation", ("low", "auto"), "auto")
    compression: int | None = None
    if "output_compression" in raw:
        compression = _integer(raw, "output_compression", 100, 0, 100, parsed.form)
    stream = _boolean(raw, "stream", parsed.form)
    partial_images = _integer(raw, "partial_images", 0, 0, 3, parsed.form)
    if edit:
        _check_images(parsed)
    return _Params(
        edit=edit,
        prompt=prompt,
        model=model,
        n=n,
        width=width,
        height=height,
        quality=quality,
        background=background,
        output_format=output_format,
        output_compression=compression,
        stream=stream,
        partial_images=partial_images,
        mode=mode,
        references=tuple(upload.record for upload in parsed.images),
    )


def _missing(param: str) -> web.Response:
    return _error_response(
        400,
        f"Missing required parameter: '{param}'.",
        "invalid_request_error",
        "missing_required_parameter",
        param,
    )


def _bad_type(param: str, expected: str, value: Any) -> web.Response:
    got = {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string"}.get(
        type(value), "an object"
    )
    return _error_response(
        400,
        f"Invalid type for '{param}': expected {expected}, but got {got} instead.",
        "invalid_request_error",
        "invalid_type",
        param,
    )


def _integer(
    raw: Mapping[str, Any], param: str, default: int, low: int, high: int, form: bool
) -> int:
    value = raw.get(param)
    if value is None or value == "":
        return default
    if form and isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise _Rejected(_bad_type(param, "an integer", value)) from None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise _Rejected(_bad_type(param, "an integer", value))
    if number < low:
        raise _Rejected(
            _error_response(
                400,
                f"Invalid '{param}': integer below minimum value. Expected a value >= {low}, "
                f"but got {number} instead.",
                "invalid_request_error",
                "integer_below_min_value",
                param,
            )
        )
    if number > high:
        raise _Rejected(
            _error_response(
                400,
                f"Invalid '{param}': integer above maximum value. Expected a value <= {high}, "
                f"but got {number} instead.",
                "invalid_request_error",
                "integer_above_max_value",
                param,
            )
        )
    return number


def _boolean(raw: Mapping[str, Any], param: str, form: bool) -> bool:
    value = raw.get(param)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if form and isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise _Rejected(_bad_type(param, "a boolean", value))


def _enum(raw: Mapping[str, Any], param: str, allowed: Sequence[str], default: str) -> str:
    value = raw.get(param)
    if value is None:
        return default
    if isinstance(value, str) and value in allowed:
        return value
    listed = ", ".join(f"'{choice}'" for choice in allowed[:-1]) + f", and '{allowed[-1]}'"
    raise _Rejected(
        _error_response(
            400,
            f"Invalid value: '{value}'. Supported values are: {listed}.",
            "invalid_request_error",
            "invalid_value",
            param,
        )
    )


def _size_error(text: str, reason: str) -> _Rejected:
    return _Rejected(
        _error_response(
            400,
            f"Invalid size '{text}'. {reason}",
            "invalid_request_error",
            "invalid_value",
            "size",
        )
    )


def _size(text: str, model: str, reject_4k: bool) -> tuple[int, int]:
    """The pixel size to draw, or a 400 worded like OpenAI's for the rule that failed."""
    if text == "auto":
        return 1024, 1024
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", text)
    if match is None:
        raise _size_error(text, "Size must be 'auto' or of the form WIDTHxHEIGHT.")
    width, height = int(match.group(1)), int(match.group(2))
    if model.startswith("gpt-image-1"):
        if (width, height) not in _LEGACY_SIZES:
            raise _size_error(
                text, "Supported sizes are 1024x1024, 1024x1536, 1536x1024, and auto."
            )
        return width, height
    long_edge, short_edge = max(width, height), min(width, height)
    if width % 16 or height % 16:
        raise _size_error(text, "Width and height must both be divisible by 16.")
    if short_edge == 0 or long_edge > 3 * short_edge:
        raise _size_error(text, "The aspect ratio (long edge to short edge) must be at most 3:1.")
    if long_edge > _MAX_EDGE:
        raise _size_error(text, f"The longest edge must be at most {_MAX_EDGE} pixels.")
    if not _MIN_AREA <= width * height <= _MAX_AREA:
        raise _size_error(
            text,
            f"The total number of pixels must be between {_MIN_AREA} and {_MAX_AREA}.",
        )
    if reject_4k and long_edge > _EDGE_4K:
        raise _size_error(
            text, f"This group supports at most {_EDGE_4K} pixels on the longest edge."
        )
    return width, height


def _check_images(parsed: _Parsed) -> None:
    if not parsed.images:
        raise _Rejected(_missing("image"))
    if len(parsed.images) > _MAX_IMAGES:
        raise _Rejected(
            _error_response(
                400,
                f"Invalid 'image': array too long. Expected an array with maximum length "
                f"{_MAX_IMAGES}, but got an array with length {len(parsed.images)} instead.",
                "invalid_request_error",
                "array_above_max_length",
                "image",
            )
        )
    for upload in parsed.images:
        _check_upload(upload)
    if parsed.mask is not None:
        _check_upload(parsed.mask)
        first = parsed.images[0].record
        mask = parsed.mask.record
        if parsed.mask.image_format != "PNG" or (mask.width, mask.height) != (
            first.width,
            first.height,
        ):
            raise _Rejected(
                _error_response(
                    400,
                    "Invalid mask image: it must be a PNG with the same dimensions as the image.",
                    "invalid_request_error",
                    "invalid_value",
                    "mask",
                )
            )


def _check_upload(upload: _Upload) -> None:
    record = upload.record
    if record.size > _MAX_IMAGE_BYTES:
        raise _Rejected(
            _error_response(
                400,
                f"Invalid file '{record.field}': the file is larger than 50 MB.",
                "invalid_request_error",
                "file_too_large",
                record.field,
            )
        )
    if upload.image_format is None:
        raise _Rejected(
            _error_response(
                400,
                f"Invalid image file '{record.filename}': the file could not be read as an image.",
                "invalid_request_error",
                "invalid_image_file",
                record.field,
            )
        )
    # new-api takes the MIME type from the file name's extension, so a wrong or missing one
    # breaks the upload even when the bytes are a fine image.
    extension = record.filename.rsplit(".", 1)[-1].lower() if "." in record.filename else ""
    if _EXTENSION_FORMATS.get(extension) != upload.image_format:
        guessed = f"image/{extension}" if extension else "application/octet-stream"
        raise _Rejected(
            _error_response(
                400,
                f"Invalid file '{record.field}': unsupported file type ('{guessed}'). "
                "Supported file formats are 'image/jpeg', 'image/png', and 'image/webp'.",
                "invalid_request_error",
                "unsupported_file_mimetype",
                record.field,
            )
        )


# --- error answers ---


@dataclass(frozen=True, slots=True)
class _Failure:
    status: int
    message: str  # may hold {model} and {size}
    type: str
    code: str | None
    param: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


_FAILURES: Final[Mapping[str, _Failure]] = {
    "invalid_key": _Failure(401, "无效的令牌", "new_api_error", ""),
    "invalid_key_en": _Failure(401, "Invalid token", "new_api_error", ""),
    "token_expired": _Failure(401, "该令牌已过期", "one_api_error", ""),
    "token_exhausted": _Failure(401, "该令牌额度已用尽", "one_api_error", ""),
    "quota": _Failure(
        403, "用户额度不足, 剩余额度: ＄0.000000", "new_api_error", "insufficient_user_quota"
    ),
    "openai_quota": _Failure(
        429,
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: "
        "https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        "insufficient_quota",
    ),
    "no_channel": _Failure(
        503,
        "分组 default 下模型 {model} 无可用渠道（distributor）",
        "new_api_error",
        "model_not_found",
    ),
    "group_denied": _Failure(403, "无权访问 vip 分组", "new_api_error", ""),
    "moderation": _Failure(
        400,
        "Your request was rejected by the safety system. If you believe this is an error, "
        "contact us at help.openai.com and include the request ID req_mock. "
        "safety_violations=[sexual].",
        "image_generation_user_error",
        "moderation_blocked",
    ),
    "content_policy": _Failure(
        400,
        "Your request was rejected as a result of our safety system. Your prompt may contain "
        "text that is not allowed by our safety system.",
        "invalid_request_error",
        "content_policy_violation",
    ),
    "sensitive_words": _Failure(400, "敏感词检测失败", "new_api_error", "sensitive_words_detected"),
    "invalid_size": _Failure(
        400,
        "Invalid size '{size}'. Width and height must both be divisible by 16.",
        "invalid_request_error",
        "invalid_value",
        "size",
    ),
    "unknown_parameter": _Failure(
        400,
        "Unknown parameter: 'response_format'.",
        "invalid_request_error",
        "unknown_parameter",
        "response_format",
    ),
    "rate_limit": _Failure(
        429,
        "Rate limit reached for {model} in organization org-mock on images per min (IPM): "
        "Limit 5, Used 5, Requested 1. Please try again in 1s.",
        "requests",
        "rate_limit_exceeded",
        headers={"Retry-After": "1"},
    ),
    "upstream_banned": _Failure(
        500,
        "上游账号异常（GPT封号）: Your OpenAI account has been deactivated, please check your "
        "email for more information.",
        "upstream_error",
        "account_deactivated",
    ),
    "server_error": _Failure(
        500,
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    "not_implemented": _Failure(501, "API not implemented", "one_api_error", "api_not_implemented"),
}

_STREAM_ERROR: Final = (
    "Your request was rejected by the safety system. safety_violations=[violence].",
    "image_generation_user_error",
    "moderation_blocked",
    None,
)

_NGINX_413 = (
    b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
    b"<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_CLOUDFLARE_502 = (
    b"<!DOCTYPE html>\n<html><head><title>api.example.com | 502: Bad gateway</title></head>"
    b"<body><h1>Bad gateway</h1><p>Error code 502</p><p>Cloudflare</p></body></html>\n"
)
# What a new-api deployment answers when the base URL misses the API: its web UI.
_SPA_PAGE = (
    b'<!doctype html><html lang="zh"><head><meta charset="utf-8"/><title>New API</title>'
    b'</head><body><div id="root"></div></body></html>'
)


def _failure_response(kind: str, *, model: str, size: str) -> web.StreamResponse:
    if kind == "too_large":
        return web.Response(status=413, body=_NGINX_413, content_type="text/html")
    if kind == "bad_gateway":
        return web.Response(status=502)
    if kind == "unavailable":
        return web.Response(status=503)
    if kind == "html_502":
        return web.Response(status=502, body=_CLOUDFLARE_502, content_type="text/html")
    if kind == "malformed":
        return web.Response(status=200, body=_SPA_PAGE, content_type="application/json")
    if kind == "no_data":
        return web.Response(body=b'{"created":1,"data":[]}', content_type="application/json")
    failure = _FAILURES.get(kind)
    if failure is None:
        # A typo in a test's fail kind must be loud, not a silent success.
        return _error_response(400, f"mock upstream: unknown fail kind '{kind}'", "mock_error")
    message = failure.message.format(model=model, size=size)
    return _error_response(
        failure.status, message, failure.type, failure.code, failure.param, failure.headers
    )


def _request_id() -> str:
    # new-api ids: a timestamp and random digits.
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    return stamp + "".join(secrets.choice("0123456789") for _ in range(12))


def _error_body(
    message: str, error_type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    if error_type in ("new_api_error", "one_api_error"):
        # Go relays have string fields: "" where OpenAI sends null.
        param, code = param or "", code or ""
    return {
        "error": {
            "message": f"{message} (request id: {_request_id()})",
            "type": error_type,
            "param": param,
            "code": code,
        }
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _error_response(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = _error_body(message, error_type, code, param)
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


async def _cut_response(request: web.Request, body: bytes, content_type: str) -> web.StreamResponse:
    """Promise the whole body, send half, drop the connection (a relay dying mid-answer)."""
    response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    _drop_connection(request)
    return response


def _drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


# --- response bodies ---


def _blob_marker(index: int) -> str:
    # json.dumps escapes NUL, so this exact JSON string can come only from our own marker.
    return f"\x00mock-blob-{index}\x00"


def _encode_with_blobs(doc: Any, blobs: Sequence[bytes]) -> list[bytes]:
    """JSON-encode `doc`, splicing base64 blobs in place of their markers without copying them."""
    text = _dumps(doc).encode()
    parts: list[bytes] = []
    for index, blob in enumerate(blobs):
        head, found, text = text.partition(_dumps(_blob_marker(index)).encode())
        if not found:
            raise AssertionError(f"blob marker {index} missing")
        parts += [head, b'"', blob, b'"']
    parts.append(text)
    return parts


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if peer else ""


def _sse(event_type: str, data: Any, blobs: Sequence[bytes]) -> bytes:
    payload = b"".join(_encode_with_blobs(data, blobs))
    return b"event: " + event_type.encode() + b"\ndata: " + payload + b"\n\n"


def _echo(params: _Params) -> dict[str, Any]:
    return {
        "background": params.background,
        "output_format": params.output_format,
        "quality": params.quality,
        "size": f"{params.width}x{params.height}",
    }


def _relay_fields(edit: bool, created: int, index: int) -> dict[str, Any]:
    verb = "edit" if edit else "generate"
    return {
        "conversation_id": "",
        "file_id": "",
        "gen_id": "",
        "id": f"compat-{verb}-{created}{secrets.randbelow(10**9):09d}-{index}",
        "parent_message_id": "",
        "source_account_id": secrets.token_hex(8),
    }


def _revised_prompt(prompt: str) -> str:
    clean = " ".join(_MARKER.sub("", prompt).split())
    return f"A detailed illustration: {clean[:300]}"


def _output_tokens(model: str, quality: str, width: int, height: int) -> int:
    """Image output tokens of one image, by OpenAI's calculator formula (auto counts as medium)."""
    level = quality if quality in _QUALITY_FACTOR else "medium"
    legacy = _LEGACY_TOKENS[level].get((width, height))
    if model.startswith("gpt-image-1") and legacy is not None:
        return legacy
    factor = _QUALITY_FACTOR[level]
    long_edge, short_edge = max(width, height), min(width, height)
    units = (2 * factor * short_edge + long_edge) // (2 * long_edge)
    return -(-factor * units * (2_000_000 + width * height) // 4_000_000)


def _reference_tokens(reference: RecordedFile) -> int:
    # The vision tile formula: fit in 2048, short side to 768, 170 per 512 tile plus 85.
    width, height = float(max(reference.width, 1)), float(max(reference.height, 1))
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    return 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)


def _usage(params: _Params) -> dict[str, Any]:
    text_tokens = max(1, math.ceil(len(_MARKER.sub("", params.prompt).encode()) / 4))
    image_tokens = sum(_reference_tokens(ref) for ref in params.references)
    output = params.n * _output_tokens(params.model, params.quality, params.width, params.height)
    input_tokens = text_tokens + image_tokens
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"image_tokens": image_tokens, "text_tokens": text_tokens},
        "output_tokens": output,
        "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
        "total_tokens": input_tokens + output,
    }


def _price(usage: Mapping[str, Any]) -> float:
    """USD at gpt-image-2 list prices for one request's usage."""
    details = usage.get("input_tokens_details") or {}
    return float(
        usage.get("output_tokens", 0) * _PRICE_OUTPUT
        + details.get("image_tokens", 0) * _PRICE_IMAGE_INPUT
        + details.get("text_tokens", 0) * _PRICE_TEXT_INPUT
    )


# --- drawing ---


@dataclass(frozen=True, slots=True)
class _RenderSpec:
    prompt: str
    width: int
    height: int
    index: int
    references: int
    output_format: str
    compression: int | None
    transparent: bool
    fast: bool
    noisy: bool = False


@dataclass(frozen=True, slots=True)
class _Rendered:
    data: bytes
    b64: bytes  # encoded once: a 4K answer is written many times in benchmarks
    mime: str
    partials: tuple[bytes, ...]  # base64 of small blurred PNG previews, coarsest first


@dataclass(frozen=True, slots=True)
class _StoredFile:
    data: bytes
    mime: str
    expires_at: float  # time.monotonic()


def _spec(params: _Params, index: int, options: MockOptions) -> _RenderSpec:
    return _RenderSpec(
        prompt=params.prompt,
        width=params.width,
        height=params.height,
        index=index,
        references=len(params.references),
        output_format=params.output_format,
        compression=params.output_compression,
        transparent=params.background == "transparent" and params.output_format != "jpeg",
        fast=options.fast_images,
        noisy=options.noisy_images,
    )


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: a fixed bitmap font
        return ImageFont.load_default()


def _colours(prompt: str) -> list[tuple[int, int, int]]:
    digest = hashlib.sha256(prompt.encode()).digest()
    return [(digest[i], digest[i + 1], digest[i + 2]) for i in range(0, 12, 3)]


def _draw(spec: _RenderSpec) -> _Rendered:
    """Draw one result image; runs in a thread (a 4K image takes ~0.2 s)."""
    size = (spec.width, spec.height)
    colours = _colours(spec.prompt)
    if spec.fast:
        image = Image.new("RGB", size, colours[0])
    elif spec.noisy:
        # Independent grain per channel: PNG cannot compress it, like a real photo's detail.
        image = Image.merge("RGB", [Image.effect_noise(size, 64) for _ in range(3)])
        _draw_text(image, spec)
    else:
        # A 2x2 image stretched bilinearly is a cheap full-size gradient.
        corners = Image.new("RGB", (2, 2))
        corners.putdata(colours)
        image = corners.resize(size, Image.Resampling.BILINEAR)
        if spec.transparent:
            image.putalpha(96)
        _draw_text(image, spec)
    buffer = io.BytesIO()
    if spec.output_format == "jpeg":
        image.convert("RGB").save(buffer, "JPEG", quality=spec.compression or 90)
    elif spec.output_format == "webp":
        image.save(buffer, "WEBP", quality=spec.compression or 80, method=0)
    else:
        image.save(buffer, "PNG", compress_level=1)
    data = buffer.getvalue()
    return _Rendered(
        data=data,
        b64=base64.b64encode(data),
        mime=_MIME[spec.output_format],
        partials=_previews(image),
    )


def _draw_text(image: Image.Image, spec: _RenderSpec) -> None:
    width, height = image.size
    font_size = max(12, min(width, height) // 16)
    font = _font(font_size)
    margin = width // 20
    per_line = max(8, int((width - 2 * margin) / (font_size * 0.55)))
    prompt = " ".join(spec.prompt.split())[:200]
    lines = textwrap.wrap(prompt, per_line)[:8]
    lines += ["", f"refs: {spec.references}", f"#{spec.index}", f"{width}x{height}"]
    draw = ImageDraw.Draw(image)
    step = int(font_size * 1.25)
    top = max(margin // 2, (height - step * len(lines)) // 2)
    stroke = max(1, font_size // 16)
    for number, line in enumerate(lines):
        draw.text(
            (margin, top + number * step),
            line,
            font=font,
            fill=(255, 255, 255, 255),
            stroke_width=stroke,
            stroke_fill=(0, 0, 0, 255),
        )


def _previews(image: Image.Image) -> tuple[bytes, ...]:
    small = image.copy()
    small.thumbnail((_PARTIAL_EDGE, _PARTIAL_EDGE), Image.Resampling.BILINEAR)
    previews = []
    for radius in (8, 4, 2):  # each partial sharper than the one before
        buffer = io.BytesIO()
        small.filter(ImageFilter.GaussianBlur(radius)).save(buffer, "PNG", compress_level=1)
        previews.append(base64.b64encode(buffer.getvalue()))
    return tuple(previews)


# --- command line ---


def _fail_kind_arg(value: str) -> str:
    if (value in FAIL_KINDS and value != "flaky_N") or _FLAKY.fullmatch(value):
        return value
    raise argparse.ArgumentTypeError(f"unknown fail kind {value!r}; one of {', '.join(FAIL_KINDS)}")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `drawbridge mock-upstream` options to `parser`."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (8000; 0 = any)")
    parser.add_argument("--mode", choices=("b64", "url"), default="b64", help="result field")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    parser.add_argument(
        "--no-stream", dest="stream", action="store_false", help="answer streams with plain JSON"
    )
    parser.add_argument("--url-ttl", type=float, default=1800.0, help="seconds a url lives")
    parser.add_argument(
        "--fail", type=_fail_kind_arg, default=None, metavar="KIND", help="inject a failure"
    )
    parser.add_argument("--api-key", default=None, help="accept only this bearer token")
    parser.add_argument(
        "--no-extra-fields", dest="extra_fields", action="store_false", help="no relay fields"
    )
    parser.add_argument("--reject-4k", action="store_true", help="reject long edges > 2560")
    parser.add_argument(
        "--accept-response-format", action="store_true", help="honour response_format"
    )
    parser.add_argument("--fast-images", action="store_true", help="single-colour images")
    parser.add_argument(
        "--refuse-field",
        action="append",
        default=[],
        metavar="NAME",
        help="answer requests carrying this field with 400 unknown_parameter (repeatable)",
    )
    parser.add_argument(
        "--models",
        default=",".join(_MODELS),
        help="comma-separated model ids GET /v1/models lists (leave one out to test)",
    )
    parser.add_argument(
        "--billing",
        choices=BILLING_KINDS,
        default="new-api",
        help="which relay's balance endpoints to imitate (none: 404)",
    )
    parser.add_argument("--balance", type=float, default=25.0, help="the key's balance in USD")
    parser.add_argument(
        "--no-edits", dest="edits", action="store_false", help="answer edits like one-api (503)"
    )
    parser.add_argument(
        "--noisy-images",
        action="store_true",
        help="photo-like grain, so PNGs are as large as real results (benchmarks)",
    )


def build_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the `mock-upstream` subcommand on an argparse subparsers object."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "mock-upstream", help="run an offline OpenAI-compatible image API"
    )
    add_cli_arguments(parser)
    return parser


def _options_from_args(args: argparse.Namespace) -> MockOptions:
    return MockOptions(
        mode=args.mode,
        latency=args.latency,
        stream=args.stream,
        url_ttl=args.url_ttl,
        fail=args.fail,
        api_key=args.api_key,
        extra_fields=getattr(args, "extra_fields", True),
        reject_4k=args.reject_4k,
        accept_response_format=args.accept_response_format,
        fast_images=args.fast_images,
        noisy_images=args.noisy_images,
        refuse_fields=tuple(args.refuse_field),
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        billing=args.billing,
        balance=args.balance,
        edits=getattr(args, "edits", True),
    )


async def serve(host: str, port: int, options: MockOptions) -> None:
    """Serve until cancelled, printing the base URL (without /v1) on its own line first."""
    mock = MockUpstream(options)
    try:
        await mock.start(host, port)
    except OSError as exc:
        raise listen_error(
            "mock-upstream", host, port, exc, host_name="--host", port_name="--port"
        ) from None
    try:
        print(mock.base_url, flush=True)
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await mock.stop()


async def run_from_args(args: argparse.Namespace) -> None:
    """Run `drawbridge mock-upstream` with parsed arguments until cancelled."""
    await serve(args.host, args.port, _options_from_args(args))
