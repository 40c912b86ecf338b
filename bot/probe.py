"""Free checks of a provider and a key: nothing here makes an image or costs anything.

- `probe_models`: `GET /v1/models` says whether the key is accepted and whether the model is
  in the list the key's group may use (new-api and one-api filter the list by the group).
- `probe_balance`: the key's balance where the relay reports it, read the way new-api
  (QuantumNous/new-api) and one-api (songquanpeng/one-api) answer, from their source:
  * `GET /api/usage/token/` (new-api only; gin registers it with the trailing slash):
    `{"code": true, "data": {"object": "token_usage", "total_granted", "total_used",
    "total_available", "unlimited_quota", ...}}` in raw quota units.
  * `GET /v1/dashboard/billing/subscription` (both): `{"object": "billing_subscription",
    "hard_limit_usd": X, ...}`. one-api's X is what is *left*; new-api's X is left + used.
    Both send 100000000 for an unlimited token.
  * `GET /v1/dashboard/billing/usage` (both): `{"object": "list", "total_usage": used * 100}`
    (hundredths of the display unit, like OpenAI's cents).
  Amounts are in the relay's display unit (USD unless the relay shows CNY or tokens).
- `probe_round_trip`: one `HEAD` to the API root, timed.

Every call has a timeout; the key only ever travels in the Authorization header and is never
logged; error details go through `classify_error`, which scrubs anything key-shaped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Final

import httpx

from bot.config import ProviderConfig
from bot.upstream import USER_AGENT, classify_error

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT: Final = 10.0
# Probe answers are small; a relay's HTML page need not be read whole.
_BODY_LIMIT: Final = 256 * 1024
# Both relays report an unlimited token as 100000000 in the billing subscription.
UNLIMITED_AMOUNT: Final = 100_000_000.0
# new-api's and one-api's default QuotaPerUnit: raw quota per display unit (USD).
QUOTA_PER_UNIT: Final = 500_000.0

MODELS_PATH: Final = "/v1/models"
TOKEN_USAGE_PATH: Final = "/api/usage/token/"
SUBSCRIPTION_PATH: Final = "/v1/dashboard/billing/subscription"
USAGE_PATH: Final = "/v1/dashboard/billing/usage"

# ModelsProbe.outcome values.
OK: Final = "ok"
INVALID_KEY: Final = "invalid_key"  # 401/403: the relay refused the key
UNREACHABLE: Final = "unreachable"  # no connection, a timeout, or a gateway error
ERROR: Final = "error"  # an answer that is neither a model list nor a refusal


# Relays append " (request id: ...)"; classify_error may have rewritten it as "[request id ...]".
_REQUEST_ID = re.compile(r"\s*[(\[]request id:?\s[^)\]]*[)\]]", re.IGNORECASE)


def _reason(status: int, body: bytes | dict[str, Any]) -> str:
    """The relay's own words, key-free, without its ` (request id: ...)` noise."""
    return _REQUEST_ID.sub("", classify_error(status, body).detail)


@dataclass(frozen=True, slots=True)
class ModelsProbe:
    """What `GET /v1/models` said about a key."""

    outcome: str  # OK | INVALID_KEY | UNREACHABLE | ERROR
    status: int | None = None
    models: tuple[str, ...] = ()
    # None when the answer had no model list to look in.
    has_model: bool | None = None
    # Short, key-free reason for anything but OK (the relay's own words where it gave some).
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """The key was accepted."""
        return self.outcome == OK


@dataclass(frozen=True, slots=True)
class Balance:
    """A key's balance as its relay reports it."""

    # Left to spend, in the relay's display unit; None when unlimited.
    amount: float | None
    unlimited: bool = False
    used: float | None = None
    # "new-api" when its token usage endpoint answered, else "one-api" (the billing pair only).
    family: str = "one-api"


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """How long one HEAD to the API root took (any status counts: only the trip is timed)."""

    seconds: float | None
    status: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class KeyProbe:
    """Everything the free checks learned about one provider and key."""

    models: ModelsProbe
    balance: Balance | None
    round_trip: RoundTrip | None = None


def _headers(api_key: str) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


async def _get(
    http: httpx.AsyncClient, url: str, api_key: str, deadline: float
) -> tuple[int, bytes]:
    """GET with a hard deadline; the body is read up to `_BODY_LIMIT`."""
    async with asyncio.timeout(deadline):
        async with http.stream(
            "GET",
            url,
            headers=_headers(api_key),
            timeout=httpx.Timeout(deadline),
            follow_redirects=False,
        ) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= _BODY_LIMIT:
                    break
            return response.status_code, bytes(body[:_BODY_LIMIT])


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


async def probe_models(
    http: httpx.AsyncClient, provider: ProviderConfig, *, deadline: float = DEFAULT_TIMEOUT
) -> ModelsProbe:
    """`GET /v1/models` with the provider's key: is the key valid, is the model listed."""
    started = time.monotonic()
    try:
        status, body = await _get(http, provider.api_base + MODELS_PATH, provider.api_key, deadline)
    except (TimeoutError, httpx.TimeoutException):
        return ModelsProbe(UNREACHABLE, detail=f"no answer within {deadline:g}s")
    except httpx.HTTPError as exc:
        return ModelsProbe(UNREACHABLE, detail=f"cannot connect: {type(exc).__name__}")
    seconds = time.monotonic() - started
    if status in (401, 403):
        return ModelsProbe(INVALID_KEY, status, detail=_reason(status, body), seconds=seconds)
    if status >= 500:
        # A gateway or relay failure says nothing about the key.
        return ModelsProbe(UNREACHABLE, status, detail=_reason(status, body), seconds=seconds)
    obj = _json_object(body) if 200 <= status < 300 else None
    data = obj.get("data") if obj is not None else None
    if obj is not None and obj.get("error") and not isinstance(data, list):
        # Relays that wrap a refusal in a 200.
        outcome = INVALID_KEY if classify_error(200, obj).kind == "invalid_key" else ERROR
        return ModelsProbe(outcome, status, detail=_reason(200, obj), seconds=seconds)
    if not isinstance(data, list):
        detail = _reason(status, body) if status >= 300 else "no model list"
        return ModelsProbe(ERROR, status, detail=detail, seconds=seconds)
    names = tuple(
        str(item["id"])
        for item in data
        if isinstance(item, dict) and isinstance(item.get("id"), str)
    )
    return ModelsProbe(OK, status, names, provider.model in names, seconds=seconds)


async def _token_usage(
    http: httpx.AsyncClient, base: str, api_key: str, deadline: float
) -> dict[str, Any] | None:
    status, body = await _get(http, base + TOKEN_USAGE_PATH, api_key, deadline)
    obj = _json_object(body) if status == 200 else None
    data = obj.get("data") if obj is not None else None
    if isinstance(data, dict) and data.get("object") == "token_usage":
        return data
    return None


async def _billing(
    http: httpx.AsyncClient, url: str, api_key: str, deadline: float, field: str
) -> float | None:
    status, body = await _get(http, url, api_key, deadline)
    obj = _json_object(body) if status == 200 else None
    # One-api and new-api answer a failed lookup with 200 {"error": ...}: not a balance.
    if obj is None or obj.get("error"):
        return None
    return _number(obj.get(field))


async def probe_balance(
    http: httpx.AsyncClient, provider: ProviderConfig, *, deadline: float = DEFAULT_TIMEOUT
) -> Balance | None:
    """The key's balance if the relay reports one (new-api / one-api), else None.

    The three endpoints are asked at once; any of them failing, missing (404, an SPA page)
    or timing out just means that source is absent.
    """
    base, key = provider.api_base, provider.api_key
    token, hard, usage = await asyncio.gather(
        _token_usage(http, base, key, deadline),
        _billing(http, base + SUBSCRIPTION_PATH, key, deadline, "hard_limit_usd"),
        _billing(http, base + USAGE_PATH, key, deadline, "total_usage"),
        return_exceptions=True,
    )
    for result in (token, hard, usage):
        if isinstance(result, BaseException) and not isinstance(
            result, httpx.HTTPError | TimeoutError
        ):
            raise result
    token_data = token if isinstance(token, dict) else None
    hard_amount = hard if isinstance(hard, float) else None
    used = usage / 100 if isinstance(usage, float) else None
    family = "new-api" if token_data is not None else "one-api"
    unlimited = (token_data is not None and token_data.get("unlimited_quota") is True) or (
        hard_amount is not None and hard_amount >= UNLIMITED_AMOUNT
    )
    if unlimited:
        return Balance(None, unlimited=True, used=used, family=family)
    if hard_amount is not None:
        if family == "new-api":
            # new-api's hard limit is the token's total (left + used).
            if used is not None:
                return Balance(max(0.0, hard_amount - used), used=used, family=family)
        else:
            return Balance(hard_amount, used=used, family=family)
    if token_data is not None:
        available = _number(token_data.get("total_available"))
        total_used = _number(token_data.get("total_used"))
        if available is not None:
            # Raw quota; the default QuotaPerUnit turns it into the display unit.
            return Balance(
                available / QUOTA_PER_UNIT,
                used=total_used / QUOTA_PER_UNIT if total_used is not None else used,
                family=family,
            )
    return None


async def probe_round_trip(
    http: httpx.AsyncClient, provider: ProviderConfig, *, deadline: float = DEFAULT_TIMEOUT
) -> RoundTrip:
    """Time one HEAD to the API root (no key sent: the answer's status does not matter)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(deadline):
            response = await http.request(
                "HEAD",
                provider.api_base + "/",
                headers={"User-Agent": USER_AGENT},
                timeout=httpx.Timeout(deadline),
            )
    except (TimeoutError, httpx.TimeoutException):
        return RoundTrip(None, detail=f"no answer within {deadline:g}s")
    except httpx.HTTPError as exc:
        return RoundTrip(None, detail=f"cannot connect: {type(exc).__name__}")
    return RoundTrip(time.monotonic() - started, response.status_code)


async def probe_key(
    http: httpx.AsyncClient,
    provider: ProviderConfig,
    *,
    deadline: float = DEFAULT_TIMEOUT,
    round_trip: bool = False,
) -> KeyProbe:
    """The model list, then (if the key was not refused) the balance; optionally a round trip.

    The balance is not asked for with a refused key: it would only be refused again.
    """
    trip = await probe_round_trip(http, provider, deadline=deadline) if round_trip else None
    models = await probe_models(http, provider, deadline=deadline)
    balance: Balance | None = None
    if models.outcome in (OK, ERROR):
        try:
            balance = await probe_balance(http, provider, deadline=deadline)
        except (httpx.HTTPError, TimeoutError) as exc:
            log.info("%s: balance lookup failed: %s", provider.name, type(exc).__name__)
    return KeyProbe(models, balance, trip)


# What `record` says a probe found (`kind`), besides ModelsProbe outcomes.
NO_MODEL: Final = "no_model"  # key accepted, but the model is not in its list
BALANCE: Final = "balance"  # /quota read the balance (the key works)
NO_BALANCE: Final = "no_balance"  # /quota found no balance (the relay reports none, or failed)


def record(
    models: ModelsProbe | None, balance: Balance | None, *, at: float | None = None
) -> dict[str, Any]:
    """What the store keeps of a key's last probe (`Store.set_key_probe`), as JSON values.

    `{"ok", "kind", "balance", "unlimited", "at"}`: `kind` is a `ModelsProbe.outcome` (or
    NO_MODEL) after /token's model check, BALANCE or NO_BALANCE after /quota's balance
    lookup alone; `balance` is in the relay's display unit (None: not reported or
    unlimited); `at` is unix seconds. Never the key.
    """
    if models is not None:
        kind = NO_MODEL if models.ok and models.has_model is False else models.outcome
        ok = models.ok
    else:
        kind = BALANCE if balance is not None else NO_BALANCE
        ok = balance is not None
    return {
        "ok": ok,
        "kind": kind,
        "balance": balance.amount if balance is not None else None,
        "unlimited": bool(balance is not None and balance.unlimited),
        "at": time.time() if at is None else at,
    }
