"""Error answers, read as a table: one row per known body, by relay family.

`classify_error` turns an error answer (status, body, headers) into exactly one typed
`UpstreamError`. First the body is normalised (`Seen`): the envelope is found whatever its
shape, one-api's ` (request id: ...)` suffix is taken off, litellm's
`litellm.XError: XError: OpenAIException - <upstream message>\\n\\nLiteLLM: ...` wrapper is
unwrapped so the upstream's own message is what gets matched, and litellm's `code` (the
HTTP status as a string) is dropped because it hides the upstream's code. Then the first
`Row` of `ROWS` that matches decides the error class and whether the answer proves that
nothing ran upstream (`unbilled`: the only answers `ProviderChain` moves to another
provider on; see docs/billing.md).

Every row carries the sample body it was written for, most copied byte for byte from what
real relays sent (`relays.md` in the project's reference notes); the tests run each sample
through `classify_error` and check it lands on its own row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final

from bot.errors import (
    GroupDeniedError,
    InvalidKeyError,
    ModerationError,
    NoChannelError,
    NotSupportedError,
    RateLimitedError,
    RelayFailedError,
    RelayStreamError,
    RequestTooLargeError,
    UnknownModelError,
    UnknownParameterError,
    UpstreamError,
    UpstreamQuotaError,
    UpstreamSizeError,
    UpstreamUnavailableError,
)

# Error answers are short; a relay's HTML error page need not be read whole.
ERROR_BODY_LIMIT: Final = 64 * 1024
DETAIL_LIMIT: Final = 300
# What a user may be shown of the relay's own words.
REASON_LIMIT: Final = 200

_SECRET_RE: Final = re.compile(r"(sk-|bearer\s+)[A-Za-z0-9._~+/=\-]+", re.IGNORECASE)
_TAG_RE: Final = re.compile(r"<[^>]*>")
_REQUEST_ID_RE: Final = re.compile(r"\s*\(request id:\s*([^)]*)\)", re.IGNORECASE)
# litellm.RateLimitError: RateLimitError: OpenAIException - <inner>\n\nLiteLLM: model group ...
_LITELLM_RE: Final = re.compile(
    r"^litellm\.\w+:\s*(?:\w*Error:\s*)?(?:OpenAIException\s*-\s*)?(?P<inner>.*?)"
    r"(?:\s*LiteLLM: model group .*)?$",
    re.DOTALL,
)
_UNKNOWN_PARAM_RE: Final = re.compile(r"unknown parameter:?\s*['\"`]?([\w.\[\]-]+)", re.IGNORECASE)
_UNSUPPORTED_PARAMS_RE: Final = re.compile(r"support parameters:\s*\[?\s*['\"]?([\w.-]+)")
_MODEL_NAME_RE: Final = re.compile(r"model=([^\s'\"`]*?)\.?(?=[\s'\"`]|$)")
_5XX: Final = range(500, 600)


@dataclass(frozen=True, slots=True)
class Seen:
    """An error answer as the table reads it."""

    status: int
    # The relay's message: litellm's wrapper and one-api's request id taken off, one line.
    message: str
    # `code`, lower case; "" when absent or only litellm's echo of the status.
    code: str = ""
    type: str = ""
    param: str = ""
    # No body at all (a gateway with nothing behind it).
    empty: bool = False
    # Whether the request asked for a stream (some bodies mean "cannot stream" only then).
    streamed: bool = False
    request_id: str = ""

    @property
    def lower(self) -> str:
        """The message in lower case, for marker matching."""
        return self.message.lower()


@dataclass(frozen=True, slots=True)
class Sample:
    """A body a row was written for: status, body, and whether the request was streamed."""

    status: int
    body: bytes | str | dict[str, Any] | None
    streamed: bool = False
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Row:
    """One known error body: when it matches (every given condition), and what it means."""

    name: str
    family: str  # "openai" | "new-api" | "one-api" | "litellm" | "gateway" | "any"
    error: type[UpstreamError]
    samples: tuple[Sample, ...]
    statuses: Collection[int] = ()
    codes: Collection[str] = ()
    # Any of these in the message (lower case) or the code.
    markers: tuple[str, ...] = ()
    # Searched in the message as it is.
    pattern: re.Pattern[str] | None = None
    # The envelope's `param` / `type` must be exactly this.
    param: str | None = None
    type: str | None = None
    streamed: bool | None = None
    empty: bool | None = None
    # The answer proves the request never ran upstream (and so was not billed).
    unbilled: bool = False
    # Where the evidence is (relays.md, upstream-api.md), for docs/billing.md and readers.
    evidence: str = ""

    def matches(self, seen: Seen) -> bool:
        """Whether every condition this row sets holds for `seen`."""
        if self.statuses and seen.status not in self.statuses:
            return False
        if self.streamed is not None and seen.streamed != self.streamed:
            return False
        if self.empty is not None and seen.empty != self.empty:
            return False
        if self.param is not None and seen.param != self.param:
            return False
        if self.type is not None and seen.type != self.type:
            return False
        if self.codes and seen.code not in self.codes:
            return False
        if self.markers and not any(m in seen.lower or m in seen.code for m in self.markers):
            return False
        return self.pattern is None or self.pattern.search(seen.message) is not None


def _one_api(message: str, code: str = "") -> dict[str, Any]:
    error: dict[str, Any] = {"message": f"{message} (request id: 2026112912000012345)"}
    error["type"] = "one_api_error"
    if code:
        error.update(param="", code=code)
    return {"error": error}


def _litellm(name: str, inner: str, etype: str, status: int) -> dict[str, Any]:
    message = (
        f"litellm.{name}: {name}: OpenAIException - {inner}\n\nLiteLLM: model group "
        "'gpt-image-2' failed with the error above. No fallback was attempted."
    )
    return {"error": {"message": message, "type": etype, "param": None, "code": str(status)}}


def _new_api(message: str, code: str, etype: str = "new_api_error") -> dict[str, Any]:
    return {
        "error": {
            "message": f"{message} (request id: 20260525081234567)",
            "type": etype,
            "param": "",
            "code": code,
        }
    }


_ONE_API_STREAM_500: Final = _one_api(
    "invalid character 'e' looking for beginning of value", "unmarshal_response_body_failed"
)
_LITELLM_STREAM_500: Final = {
    "error": {
        "message": "litellm.APIConnectionError: APIConnectionError: OpenAIException - 'str' "
        "object has no attribute 'model_dump'\n\nLiteLLM: model group 'gpt-image-2' failed with "
        "the error above. No fallback was attempted.",
        "type": "internal_server_error",
        "param": None,
        "code": "500",
    }
}

ROWS: Final[tuple[Row, ...]] = (
    # --- one-api after forwarding, whatever was asked: the upstream's body was unreadable ---
    Row(
        "one-api: empty upstream body (an empty 502/503 behind it): unexpected end of JSON input",
        "one-api",
        UpstreamUnavailableError,
        (Sample(500, _one_api("unexpected end of JSON input", "unmarshal_response_body_failed")),),
        statuses=_5XX,
        markers=("unexpected end of json input",),
        unbilled=True,
        evidence="relays.md: an empty 502/503 arrives as 500 unexpected end of JSON input",
    ),
    Row(
        "one-api: an upstream HTML page (an HTML 502, a 413 page)",
        "one-api",
        RelayFailedError,
        (
            Sample(
                500,
                _one_api(
                    "invalid character '\u003c' looking for beginning of value",
                    "unmarshal_response_body_failed",
                ),
            ),
        ),
        statuses=_5XX,
        pattern=re.compile(r"invalid character '<'"),
        evidence="relays.md: any upstream body one-api cannot parse becomes this 500",
    ),
    # --- answers that only mean something for a streamed request ---
    Row(
        "one-api: its JSON reader choked on the upstream's event stream",
        "one-api",
        RelayStreamError,
        (Sample(500, _ONE_API_STREAM_500, streamed=True),),
        statuses=_5XX,
        codes=("unmarshal_response_body_failed",),
        # "invalid character 'e'" (event:), 'd' (data:), ':' (a comment); '<' is an HTML page.
        pattern=re.compile(r"invalid character '[^<]"),
        streamed=True,
        evidence="relays.md, Streaming: one-api row (billed upstream)",
    ),
    Row(
        "litellm: cannot hand back a streamed image",
        "litellm",
        RelayStreamError,
        (Sample(500, _LITELLM_STREAM_500, streamed=True),),
        statuses=_5XX,
        markers=("has no attribute",),
        streamed=True,
        evidence="relays.md, Streaming: litellm row (billed upstream)",
    ),
    Row(
        "any relay: a 5xx naming an event-stream or JSON parse failure on a streamed request",
        "any",
        RelayStreamError,
        (
            Sample(
                502,
                {"error": {"message": "failed to parse text/event-stream response", "code": ""}},
                streamed=True,
            ),
        ),
        statuses=_5XX,
        markers=("event-stream", "unmarshal", "invalid character", "cannot parse", "parse json"),
        streamed=True,
        evidence="issue 12: the shapes of one-api's and litellm's stream failures, generalised",
    ),
    # --- the key: refused by the relay before forwarding ---
    Row(
        "new-api/one-api: invalid token",
        "one-api",
        InvalidKeyError,
        (
            Sample(401, _one_api("无效的令牌")),
            Sample(401, _new_api("无效的令牌", "")),
            Sample(401, {"error": {"message": "Invalid token (request id: 2026)"}}),
        ),
        markers=("无效的令牌", "invalid token"),
        unbilled=True,
        evidence="relays.md, Errors the relays make themselves: 401 无效的令牌",
    ),
    Row(
        "one-api: no token sent",
        "one-api",
        InvalidKeyError,
        (Sample(401, _one_api("未提供令牌")),),
        markers=("未提供令牌",),
        unbilled=True,
        evidence="relays.md, Errors the relays make themselves: 401 未提供令牌",
    ),
    Row(
        "one-api: token expired, used up or disabled (also wrapped by litellm)",
        "one-api",
        InvalidKeyError,
        (
            Sample(401, _one_api("该令牌已过期")),
            Sample(401, _one_api("该令牌额度已用尽")),
            Sample(
                401, _litellm("AuthenticationError", "该令牌已过期", "authentication_error", 401)
            ),
        ),
        markers=("令牌已过期", "令牌额度已用尽", "令牌状态不可用"),
        unbilled=True,
        evidence="relays.md, litellm examples: 401 该令牌已过期; upstream-api.md errors table",
    ),
    Row(
        "OpenAI: incorrect API key",
        "openai",
        InvalidKeyError,
        (
            Sample(
                401,
                b'{"error":{"message":"Incorrect API key provided: sk-abc123xyz.","type":'
                b'"invalid_request_error","param":null,"code":"invalid_api_key"}}',
            ),
        ),
        markers=("invalid_api_key", "incorrect api key", "invalid api key"),
        unbilled=True,
        evidence="upstream-api.md errors table: bad key 401",
    ),
    Row(
        "new-api: the key's own budget is spent",
        "new-api",
        InvalidKeyError,
        (Sample(403, _new_api("令牌额度不足", "pre_consume_token_quota_failed")),),
        codes=("pre_consume_token_quota_failed",),
        unbilled=True,
        evidence="new-api source: pre-consume fails before the request is relayed",
    ),
    # --- the account's balance ---
    Row(
        "new-api/one-api: the reseller account has no balance (also wrapped by litellm)",
        "new-api",
        UpstreamQuotaError,
        (
            Sample(403, _new_api("用户额度不足, 剩余额度: ＄0.000000", "insufficient_user_quota")),
            Sample(
                403,
                _litellm(
                    "APIError",
                    "用户额度不足, 剩余额度: ＄0.000000 (request id: 2026)",
                    "permission_error",
                    403,
                ),
            ),
        ),
        markers=("用户额度不足", "insufficient_user_quota"),
        unbilled=True,
        evidence="relays.md, litellm examples: 403 用户额度不足; upstream-api.md errors table",
    ),
    Row(
        "OpenAI: insufficient_quota (litellm turns it into a 429 throttling_error)",
        "openai",
        UpstreamQuotaError,
        (
            Sample(
                429,
                {
                    "error": {
                        "message": "You exceeded your current quota, please check your plan "
                        "and billing details.",
                        "type": "insufficient_quota",
                        "param": None,
                        "code": "insufficient_quota",
                    }
                },
            ),
            Sample(
                429,
                _litellm(
                    "RateLimitError",
                    "You exceeded your current quota, please check your plan and billing details.",
                    "throttling_error",
                    429,
                ),
            ),
        ),
        markers=("insufficient_quota", "exceeded your current quota"),
        unbilled=True,
        evidence="relays.md, litellm examples: 429 You exceeded your current quota",
    ),
    Row(
        "any: 401 with an unknown body",
        "any",
        InvalidKeyError,
        (Sample(401, "Unauthorized"),),
        statuses=(401,),
        unbilled=True,
        evidence="a 401 is an authentication refusal, before any work",
    ),
    # --- the content ---
    Row(
        "OpenAI/relays: content policy",
        "openai",
        ModerationError,
        (
            Sample(
                400,
                '{"error":{"message":"Your request was rejected by the safety system. '
                'safety_violations=[sexual].","type":"image_generation_user_error",'
                '"param":null,"code":"moderation_blocked"}}',
            ),
            Sample(400, {"error": {"message": "rejected", "code": "content_policy_violation"}}),
            Sample(400, _new_api("敏感词检测失败", "sensitive_words_detected")),
        ),
        markers=(
            "moderation_blocked",
            "content_policy_violation",
            "sensitive_words_detected",
            "safety system",
            "safety_violations",
            "敏感词",
            "sensitive words",
        ),
        evidence="upstream-api.md errors table: moderation",
    ),
    # --- the model and the endpoint ---
    Row(
        "one-api: edits are not parsed, so the model is empty: 对于模型  无可用渠道",
        "one-api",
        NotSupportedError,
        (Sample(503, _one_api("当前分组 default 下对于模型  无可用渠道")),),
        pattern=re.compile(r"模型\s*无可用渠道"),
        unbilled=True,
        evidence="relays.md, Edits: one-api 503 with an empty model; the upstream never sees it",
    ),
    Row(
        "new-api/one-api: no channel for the model in the key's group",
        "one-api",
        NoChannelError,
        (
            Sample(503, _one_api("当前分组 default 下对于模型 gpt-image-9 无可用渠道")),
            Sample(
                503,
                _new_api(
                    "分组 default 下模型 gpt-image-2 无可用渠道（distributor）", "model_not_found"
                ),
            ),
        ),
        markers=("无可用渠道", "no available channel", "model_not_found"),
        unbilled=True,
        evidence="relays.md, Errors the relays make themselves: 503 无可用渠道",
    ),
    Row(
        "litellm: Invalid model name (no model group of that name)",
        "litellm",
        UnknownModelError,
        (
            Sample(
                400,
                {
                    "error": {
                        "message": "400: {'error': '/image/generations: Invalid model name "
                        "passed in model=gpt-image-9. Call `/v1/models` to view available "
                        "models for your key.'}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "400",
                    }
                },
            ),
        ),
        markers=("invalid model name",),
        unbilled=True,
        evidence="relays.md, litellm examples: 400 Invalid model name passed in model=...",
    ),
    Row(
        "new-api: the key may not use its group",
        "new-api",
        GroupDeniedError,
        (Sample(403, _new_api("无权访问 vip 分组", "")),),
        pattern=re.compile(r"无权访问.*分组"),
        unbilled=True,
        evidence="upstream-api.md errors table: 403 无权访问 X 分组 (raised before relaying)",
    ),
    Row(
        "one-api: endpoint not implemented",
        "one-api",
        NotSupportedError,
        (Sample(501, _one_api("API not implemented", "api_not_implemented")),),
        markers=("api_not_implemented",),
        unbilled=True,
        evidence="relays.md, Errors the relays make themselves: 501 api_not_implemented",
    ),
    Row(
        "any: 501",
        "any",
        NotSupportedError,
        (Sample(501, "Not Implemented"),),
        statuses=(501,),
        unbilled=True,
        evidence="501: the server does not implement the endpoint",
    ),
    # --- the request's fields ---
    Row(
        "OpenAI: unknown parameter",
        "openai",
        UnknownParameterError,
        (
            Sample(
                400,
                {
                    "error": {
                        "message": "Unknown parameter: 'response_format'.",
                        "type": "invalid_request_error",
                        "param": "response_format",
                        "code": "unknown_parameter",
                    }
                },
            ),
        ),
        markers=("unknown_parameter", "unknown parameter"),
        evidence="upstream-api.md: response_format is refused by gpt-image models",
    ),
    Row(
        "litellm: UnsupportedParamsError",
        "litellm",
        UnknownParameterError,
        (
            Sample(
                400,
                {
                    "error": {
                        "message": "litellm.UnsupportedParamsError: openai does not support "
                        "parameters: ['response_format'], for model=gpt-image-2. To drop these, "
                        "set `litellm.drop_params=True`.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "400",
                    }
                },
            ),
        ),
        markers=("unsupportedparamserror", "does not support parameters"),
        evidence="relays.md, litellm examples: 400 UnsupportedParamsError for response_format",
    ),
    Row(
        "OpenAI/new-api: invalid size",
        "openai",
        UpstreamSizeError,
        (
            Sample(400, {"error": {"message": "bad size", "code": "invalid_size"}}),
            Sample(
                400,
                {"error": {"message": "Width and height must both be divisible by 16."}},
            ),
        ),
        markers=("invalid_size", "divisible by 16", "invalid size"),
        evidence="upstream-api.md errors table: invalid size",
    ),
    Row(
        "OpenAI: a size named as the bad param",
        "openai",
        UpstreamSizeError,
        (Sample(400, {"error": {"message": "Invalid value: '1000x1000'.", "param": "size"}}),),
        param="size",
        evidence="upstream-api.md errors table: invalid size",
    ),
    # --- relays after forwarding: the upstream's body could not be read ---
    Row(
        "one-api/new-api: the upstream's body was cut or unreadable",
        "one-api",
        RelayFailedError,
        (
            Sample(500, _one_api("unexpected EOF", "read_response_body_failed")),
            Sample(500, _new_api("bad response body", "bad_response_body", "bad_response_body")),
        ),
        statuses=_5XX,
        codes=("read_response_body_failed", "bad_response_body", "unmarshal_response_body_failed"),
        evidence="relays.md, Errors the relays make themselves: 500 read_response_body_failed",
    ),
    # --- limits and outages ---
    Row(
        "any: 429 rate limited (unbilled when it says when to come back)",
        "any",
        RateLimitedError,
        (Sample(429, {"error": {"message": "Rate limit reached"}}, headers={"Retry-After": "1"}),),
        statuses=(429,),
        evidence="upstream-api.md: retry only 429 with retry-after",
    ),
    Row(
        "gateway: 413 request too large",
        "gateway",
        RequestTooLargeError,
        (
            Sample(
                413,
                "<html><head><title>413 Request Entity Too Large</title></head>"
                "<body>nginx</body></html>",
            ),
        ),
        statuses=(413,),
        evidence="upstream-api.md errors table: body too large",
    ),
    Row(
        "gateway: 502/503 with an empty body (nothing behind it answered)",
        "gateway",
        UpstreamUnavailableError,
        (Sample(502, b""), Sample(503, None)),
        statuses=(502, 503),
        empty=True,
        unbilled=True,
        evidence="upstream-api.md: retry 502/503 before any body; relays.md: did not run",
    ),
    Row(
        "relay: the upstream account is banned (GPT封号)",
        "new-api",
        UpstreamUnavailableError,
        (
            Sample(
                500, {"error": {"message": "上游账号异常（GPT封号）", "type": "upstream_error"}}
            ),
            Sample(400, {"error": {"message": "GPT封号了，请稍后再试"}}),
        ),
        markers=("封号",),
        evidence="the reseller's doc lists GPT封号 as a failure cause",
    ),
    Row(
        "any: 5xx with a body (may have run upstream)",
        "any",
        UpstreamUnavailableError,
        (
            Sample(
                500,
                {
                    "error": {
                        "message": "The server had an error while processing your request.",
                        "type": "server_error",
                    }
                },
            ),
            Sample(502, "<html><body><h1>502 Bad Gateway</h1>cloudflare</body></html>"),
        ),
        statuses=_5XX,
        evidence="relays.md, Billing consequence: a 5xx after forwarding may have run",
    ),
    Row(
        "any: a server_error inside a 200 (in-stream error event)",
        "any",
        UpstreamUnavailableError,
        (Sample(200, {"error": {"message": "upstream overloaded", "type": "server_error"}}),),
        statuses=range(100, 400),
        type="server_error",
        evidence="upstream-api.md: an in-stream error object is a failure",
    ),
)
"""The known error bodies, tried in order; the first row that matches wins."""

FALLBACK: Final = Row(
    "anything else",
    "any",
    UpstreamError,
    (Sample(404, "404 page not found"), Sample(400, {"error": "something odd"})),
    evidence="no row knows it: reported with the relay's own words, not retried",
)


def find_row(seen: Seen) -> Row:
    """The first row of `ROWS` that matches, else `FALLBACK`."""
    return next((row for row in ROWS if row.matches(seen)), FALLBACK)


def classify_error(
    status: int,
    body: bytes | str | dict[str, Any] | None,
    headers: Mapping[str, str] | None = None,
    *,
    streamed: bool = False,
    secret: str = "",
) -> UpstreamError:
    """Map an error answer (HTTP status, body, headers) to one typed `UpstreamError`.

    Understands the OpenAI envelope, new-api's, one-api's and litellm's own bodies (see
    `ROWS`), plain-text and empty bodies. An in-stream error event is classified with status
    200. `streamed` says the request asked for a stream. The error's `detail` (for logs and
    the job row) keeps the relay's request id; its `reason` param (shown to users) does not.
    Neither ever contains anything that looks like a key, nor `secret`.
    """
    seen = read_answer(status, body, headers, streamed=streamed)
    row = find_row(seen)
    retry_after = _retry_after(headers)
    # A 429 that says when to come back is a gateway's refusal: nothing was started.
    unbilled = row.unbilled or (status == 429 and retry_after is not None)
    parts = [str(status), seen.code, seen.message]
    if seen.request_id:
        parts.append(f"[request id {seen.request_id}]")
    detail = scrub(" ".join(p for p in parts if p), secret)
    reason = scrub(seen.message, secret, REASON_LIMIT) or str(status)
    params: dict[str, Any] = {"reason": reason}
    if row.error is UnknownParameterError:
        params["param"] = _bad_param(seen)
    if row.error is UnknownModelError:
        match = _MODEL_NAME_RE.search(seen.message)
        params["model"] = match.group(1) if match else "?"
    return row.error(
        detail,
        status=status,
        code=seen.code or None,
        retry_after=retry_after,
        unbilled=unbilled,
        **params,
    )


def _bad_param(seen: Seen) -> str:
    if seen.param:
        return seen.param
    for pattern in (_UNKNOWN_PARAM_RE, _UNSUPPORTED_PARAMS_RE):
        match = pattern.search(seen.message)
        if match:
            return match.group(1)
    return ""


def read_answer(
    status: int,
    body: bytes | str | dict[str, Any] | None,
    headers: Mapping[str, str] | None = None,
    *,
    streamed: bool = False,
) -> Seen:
    """The parts of an error body the table matches on, whatever shape the relay chose."""
    text = ""
    obj: Any = body
    if isinstance(body, bytes | bytearray):
        text = bytes(body[:ERROR_BODY_LIMIT]).decode("utf-8", "replace")
    elif isinstance(body, str):
        text = body[:ERROR_BODY_LIMIT]
    empty = body is None or (not isinstance(body, dict) and not text.strip())
    request_id = ""
    if headers:
        lowered = {k.lower(): v for k, v in headers.items()}
        request_id = lowered.get("x-oneapi-request-id", "")
    if not isinstance(body, dict):
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
    if not isinstance(obj, dict):
        # An nginx or Cloudflare error page: its words, not its markup.
        words = " ".join(_TAG_RE.sub(" ", text).split())
        return Seen(status, words, empty=empty, streamed=streamed, request_id=request_id)
    error = obj.get("error")
    source: dict[str, Any] = error if isinstance(error, dict) else obj
    raw = (
        _text(source.get("message"))
        or (error if isinstance(error, str) else "")
        or _text(obj.get("message"))
        or _text(obj.get("detail"))
        or _text(obj.get("msg"))
    )
    found = _REQUEST_ID_RE.search(raw)
    if found:
        request_id = request_id or found.group(1).strip()
        raw = _REQUEST_ID_RE.sub("", raw)
    wrapped = _LITELLM_RE.match(raw.strip())
    if wrapped and wrapped.group("inner").strip():
        raw = wrapped.group("inner")
        # The inner message may carry the upstream relay's own request id.
        inner_id = _REQUEST_ID_RE.search(raw)
        if inner_id:
            request_id = request_id or inner_id.group(1).strip()
            raw = _REQUEST_ID_RE.sub("", raw)
    code = (_text(source.get("code")) or _text(obj.get("code"))).strip().lower()
    if code.isdigit():
        code = ""  # litellm's echo of the HTTP status: the upstream's own code is lost
    return Seen(
        status=status,
        message=" ".join(raw.split()),
        code=code,
        type=_text(source.get("type")).lower(),
        param=_text(source.get("param")),
        empty=False,
        streamed=streamed,
        request_id=request_id,
    )


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


def scrub(text: str, secret: str = "", limit: int = DETAIL_LIMIT) -> str:
    """A short, single-line, key-free version of `text` for logs, job rows and users."""
    if len(secret) >= 8:  # a real key; replacing a 1-letter test key would garble the text
        text = text.replace(secret, "***")
    text = _SECRET_RE.sub(lambda m: m.group(1) + "***", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or an HTTP date)."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        if "retry-after-ms" in lowered:
            return max(0.0, float(lowered["retry-after-ms"]) / 1000)
        if "retry-after" in lowered:
            value = lowered["retry-after"].strip()
            try:
                return max(0.0, float(value))
            except ValueError:
                when = parsedate_to_datetime(value)
                return max(0.0, (when - datetime.now(UTC)).total_seconds())
    except (ValueError, TypeError):
        return None
    return None
