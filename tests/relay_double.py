"""one-api and litellm as measured (relays.md), in front of the project's mock upstream.

A real HTTP server on 127.0.0.1: it forwards image requests to the upstream the way each relay
did, and answers the way each relay answered, byte for byte where relays.md has the bytes:

- one-api forwards `stream`, then cannot parse the event stream: 500
  `unmarshal_response_body_failed` ("invalid character 'e' ..."), after the upstream made the
  image. Any upstream body it cannot parse becomes that 500 (an empty 502 becomes
  "unexpected end of JSON input", an HTML page "invalid character '<'"); JSON error bodies
  pass through verbatim with their status and Retry-After. It does not parse multipart
  edits: 503 "当前分组 default 下对于模型  无可用渠道", and the upstream never sees them. Its own
  refusals: 401 无效的令牌 / 未提供令牌, 503 no channel for a model it does not serve.
- litellm answers a streamed request 500 "'str' object has no attribute 'model_dump'" after
  the upstream ran; wraps every upstream error as
  `litellm.<Name>Error: <Name>Error: OpenAIException - <message>\\n\\nLiteLLM: ...` with the
  status as a string `code`; refuses a model it has no group for with "Invalid model name";
  forwards edits with every file part renamed `image.png`.

`billed` counts the images the upstream made (its 200 answers), whatever the relay then said.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import BodyPartReader, web

ONE_API = "one-api"
LITELLM = "litellm"

_LITELLM_NAMES = {
    400: ("BadRequestError", "invalid_request_error"),
    401: ("AuthenticationError", "authentication_error"),
    403: ("APIError", "permission_error"),
    404: ("NotFoundError", "not_found_error"),
    429: ("RateLimitError", "throttling_error"),
}


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the relay received it."""

    path: str
    streamed: bool
    forwarded: bool


@dataclass
class RelayDouble:
    """A relay of `family` in front of the upstream at `upstream_base`."""

    upstream_base: str
    family: str = ONE_API
    # Models the relay has a channel (one-api) or a model group (litellm) for.
    models: tuple[str, ...] = ("gpt-image-2",)
    # Tokens one-api accepts; None: any non-empty one.
    tokens: frozenset[str] | None = None
    upstream_key: str = "sk-relay-to-upstream-0000"
    received: list[Received] = field(default_factory=list)
    billed: int = 0
    base_url: str = ""
    _runner: web.AppRunner | None = None
    _http: httpx.AsyncClient | None = None

    async def start(self) -> str:
        """Serve on 127.0.0.1, a free port; returns the base URL."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/images/generations", self._generations)
        app.router.add_post("/v1/images/edits", self._edits)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self._http = httpx.AsyncClient(timeout=30.0)
        self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return self.base_url

    async def stop(self) -> None:
        """Stop serving."""
        if self._http is not None:
            await self._http.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None

    def streamed_flags(self) -> list[bool]:
        """Whether each received request asked for a stream, in order."""
        return [r.streamed for r in self.received]

    # --- routes ---

    async def _generations(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            fields = json.loads(body)
        except ValueError:
            fields = {}
        streamed = fields.get("stream") is True
        model = str(fields.get("model") or "")
        refused = self._refuse(request, model)
        if refused is not None:
            self.received.append(Received(request.path, streamed, False))
            return refused
        self.received.append(Received(request.path, streamed, True))
        upstream = await self._forward(request.path, body, request.content_type)
        return self._answer(upstream, streamed, model)

    async def _edits(self, request: web.Request) -> web.StreamResponse:
        if self.family == ONE_API:
            # one-api reads the model from a JSON body only: for multipart it finds none.
            self.received.append(Received(request.path, False, False))
            return self._one_api_error(503, "当前分组 default 下对于模型  无可用渠道")
        reader = await request.multipart()
        form: dict[str, str] = {}
        files: list[tuple[str, tuple[str, bytes, str]]] = []
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            data = await part.read()
            if part.filename is not None:
                # litellm renames every file part, whatever its type.
                content_type = part.headers.get("Content-Type", "application/octet-stream")
                files.append((part.name, ("image.png", bytes(data), content_type)))
            else:
                form[part.name] = bytes(data).decode()
        streamed = form.get("stream") == "true"
        model = form.get("model", "")
        refused = self._refuse(request, model)
        if refused is not None:
            self.received.append(Received(request.path, streamed, False))
            return refused
        self.received.append(Received(request.path, streamed, True))
        assert self._http is not None
        upstream = await self._http.post(
            self.upstream_base + request.path,
            data=form,
            files=files,
            headers={"Authorization": f"Bearer {self.upstream_key}"},
        )
        return self._answer(upstream, streamed, model)

    # --- the relay's own refusals ---

    def _refuse(self, request: web.Request, model: str) -> web.Response | None:
        if self.family == ONE_API:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not token:
                return self._one_api_error(401, "未提供令牌")
            if self.tokens is not None and token not in self.tokens:
                return self._one_api_error(401, "无效的令牌")
            if model not in self.models:
                return self._one_api_error(503, f"当前分组 default 下对于模型 {model} 无可用渠道")
            return None
        if model not in self.models:
            message = (
                "400: {'error': '/image/generations: Invalid model name passed in "
                f"model={model}. Call `/v1/models` to view available models for your key.'}}"
            )
            return self._litellm_error(400, message, "invalid_request_error")
        return None

    # --- forwarding ---

    async def _forward(self, path: str, body: bytes, content_type: str) -> httpx.Response:
        assert self._http is not None
        return await self._http.post(
            self.upstream_base + path,
            content=body,
            headers={
                "Authorization": f"Bearer {self.upstream_key}",
                "Content-Type": content_type or "application/json",
            },
        )

    def _answer(self, upstream: httpx.Response, streamed: bool, model: str) -> web.Response:
        if upstream.status_code == 200:
            self.billed += 1  # the upstream made the image, and charged for it
        if self.family == ONE_API:
            return self._one_api_answer(upstream)
        return self._litellm_answer(upstream, model)

    def _one_api_answer(self, upstream: httpx.Response) -> web.Response:
        try:
            json.loads(upstream.content)
        except ValueError:
            text = upstream.content.decode("utf-8", "replace").lstrip()
            message = (
                f"invalid character '{text[0]}' looking for beginning of value"
                if text
                else "unexpected end of JSON input"
            )
            return self._one_api_error(500, message, code="unmarshal_response_body_failed")
        headers = {"X-Oneapi-Request-Id": _request_id()}
        if "retry-after" in upstream.headers:
            headers["Retry-After"] = upstream.headers["retry-after"]
        return web.Response(
            status=upstream.status_code,
            body=upstream.content,
            content_type="application/json",
            headers=headers,
        )

    def _litellm_answer(self, upstream: httpx.Response, model: str) -> web.Response:
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            body = {
                "error": {
                    "message": "litellm.APIConnectionError: APIConnectionError: OpenAIException "
                    "- 'str' object has no attribute 'model_dump'\n\nLiteLLM: model group "
                    f"'{model}' failed with the error above. No fallback was attempted.",
                    "type": "internal_server_error",
                    "param": None,
                    "code": "500",
                }
            }
            return web.json_response(body, status=500)
        if upstream.status_code == 200:
            return web.Response(body=upstream.content, content_type="application/json")
        try:
            error = json.loads(upstream.content).get("error") or {}
        except (ValueError, AttributeError):
            error = {}
        inner = error.get("message") if isinstance(error, dict) else None
        status = upstream.status_code
        name, etype = _LITELLM_NAMES.get(status, ("InternalServerError", "internal_server_error"))
        if status >= 500:
            status = 502
        message = (
            f"litellm.{name}: {name}: OpenAIException - {inner or upstream.text}\n\n"
            f"LiteLLM: model group '{model}' failed with the error above. "
            "No fallback was attempted."
        )
        param = error.get("param") if isinstance(error, dict) else None
        return self._litellm_error(status, message, etype, param)

    # --- bodies ---

    def _one_api_error(self, status: int, message: str, code: str = "") -> web.Response:
        request_id = _request_id()
        error: dict[str, Any] = {
            "message": f"{message} (request id: {request_id})",
            "type": "one_api_error",
        }
        if code:
            error.update(param="", code=code)
        return web.json_response(
            {"error": error}, status=status, headers={"X-Oneapi-Request-Id": request_id}
        )

    def _litellm_error(
        self, status: int, message: str, etype: str, param: Any = None
    ) -> web.Response:
        body = {"error": {"message": message, "type": etype, "param": param, "code": str(status)}}
        return web.json_response(body, status=status)


def _request_id() -> str:
    return "2026112912" + "".join(secrets.choice("0123456789") for _ in range(14))
