"""`drawbridge doctor`: test each configured provider, print a table, store what was learned.

Without `--spend` nothing is bought: the key and the model (`GET /v1/models`), the balance
where the relay reports it, and one timed round trip (see `bot.probe`). With `--spend` the
cheapest real requests follow (1024x1024, quality low, one image each): a streamed and a plain
generation, an edit with two `image[]` parts, and a 4K generation. Their cost is printed
twice: the list price of the `usage` they report, and the relay's balance before and after
(what the relay really charged, where it reports a balance).

What was learned goes into the store as the provider's capabilities (keys: stream,
stream_checked_at, edits, four_k, result, balance, balance_checked_at, models_ok), which the
job runner routes by. Whatever could not be learned is listed with the `DRAWBRIDGE_PROVIDERS`
field that settles it by hand.

The exit code is 0 only when every provider's free checks passed: the key was accepted and
the model is listed.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import httpx
from PIL import Image

from bot import probe
from bot.config import ProviderConfig, Settings
from bot.datadir import secure_data_dir
from bot.errors import (
    NoChannelError,
    NotSupportedError,
    UpstreamError,
    UpstreamSizeError,
)
from bot.images import Reference
from bot.probe import Balance, KeyProbe
from bot.secrets import KeyBox
from bot.store.opening import open_store
from bot.upstream import ImageRequest, ImageResult, Progress, UpstreamClient
from bot.upstream.capabilities import CapabilityStore
from bot.upstream.transport import upstream_http

PROMPT: Final = "drawbridge doctor test: one small red circle on white"
SIZE: Final = "1024x1024"
SIZE_4K: Final = "3840x2160"
QUALITY: Final = "low"
# gpt-image-2 list prices in USD per token (upstream-api.md "Cost").
PRICE_OUTPUT: Final = 30 / 1_000_000
PRICE_IMAGE_INPUT: Final = 8 / 1_000_000
PRICE_TEXT_INPUT: Final = 5 / 1_000_000


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table."""

    check: str
    result: str
    note: str = ""


@dataclass
class ProviderReport:
    """Everything the doctor found out about one provider."""

    name: str
    rows: list[Row] = field(default_factory=list)
    # The key was accepted and the model is listed.
    free_ok: bool = False
    learned: dict[str, Any] = field(default_factory=dict)
    # DRAWBRIDGE_PROVIDERS fields for what could not be learned, with why.
    advice: dict[str, Any] = field(default_factory=dict)
    advice_notes: list[str] = field(default_factory=list)


def list_price(usage: dict[str, Any] | None) -> float | None:
    """USD at gpt-image-2 list prices for a response's `usage`, None without usage."""
    if not usage:
        return None
    details = usage.get("input_tokens_details")
    details = details if isinstance(details, dict) else {}
    output = usage.get("output_tokens")
    if not isinstance(output, int | float):
        return None
    image_in = details.get("image_tokens", 0)
    text_in = details.get("text_tokens", usage.get("input_tokens", 0))
    return (
        output * PRICE_OUTPUT
        + (image_in if isinstance(image_in, int | float) else 0) * PRICE_IMAGE_INPUT
        + (text_in if isinstance(text_in, int | float) else 0) * PRICE_TEXT_INPUT
    )


def _balance_text(balance: Balance | None) -> str:
    if balance is None:
        return "not reported"
    if balance.unlimited:
        return f"unlimited ({balance.family})"
    assert balance.amount is not None
    used = f", used {balance.used:.4f}" if balance.used is not None else ""
    return f"{balance.amount:.4f} left{used} ({balance.family})"


def _models_rows(report: ProviderReport, found: KeyProbe, model: str) -> None:
    models = found.models
    if models.outcome == probe.OK:
        report.rows.append(Row("key", "ok", f"HTTP {models.status}, {len(models.models)} models"))
        if models.has_model:
            report.rows.append(Row("model", "listed", model))
        else:
            report.rows.append(Row("model", "MISSING", f"{model} is not in the key's model list"))
    elif models.outcome == probe.INVALID_KEY:
        report.rows.append(Row("key", "REFUSED", models.detail))
    elif models.outcome == probe.UNREACHABLE:
        report.rows.append(Row("key", "UNREACHABLE", models.detail))
    else:
        report.rows.append(Row("key", "UNKNOWN", models.detail))
    report.free_ok = models.ok and models.has_model is True


async def _free_checks(
    http: httpx.AsyncClient, provider: ProviderConfig, report: ProviderReport, deadline: float
) -> KeyProbe:
    found = await probe.probe_key(http, provider, deadline=deadline, round_trip=True)
    trip = found.round_trip
    if trip is not None and trip.seconds is not None:
        report.rows.append(
            Row("round trip", f"{trip.seconds * 1000:.0f} ms", f"HEAD / {trip.status}")
        )
    elif trip is not None:
        report.rows.append(Row("round trip", "failed", trip.detail))
    _models_rows(report, found, provider.model)
    if found.models.outcome != probe.UNREACHABLE:
        report.learned["models_ok"] = report.free_ok
    report.rows.append(Row("balance", _balance_text(found.balance)))
    if found.balance is not None and found.balance.amount is not None:
        report.learned["balance"] = found.balance.amount
        report.learned["balance_checked_at"] = time.time()
    return found


_PNG: Final = ("PNG", "png", "image/png")
_JPEG: Final = ("JPEG", "jpg", "image/jpeg")


def _references(second: tuple[str, str, str] = _JPEG) -> tuple[Reference, ...]:
    """A PNG and (by default) a JPEG, named by their real format (new-api needs that)."""
    refs = []
    for index, ((fmt, ext, mime), colour) in enumerate(((_PNG, "red"), (second, "blue"))):
        buffer = io.BytesIO()
        Image.new("RGB", (256, 256), colour).save(buffer, fmt)
        refs.append(Reference(buffer.getvalue(), f"ref{index + 1}.{ext}", mime, 256, 256))
    return tuple(refs)


@dataclass
class _Spent:
    """One paid request: what happened and what it cost."""

    result: ImageResult | None = None
    error: UpstreamError | None = None
    partials: int = 0
    downloads: int = 0
    balance_before: Balance | None = None
    balance_after: Balance | None = None

    def cost_text(self) -> str:
        parts = []
        if self.result is not None:
            price = list_price(self.result.usage)
            if price is not None:
                parts.append(f"list ${price:.4f}")
        before, after = self.balance_before, self.balance_after
        if (
            before is not None
            and after is not None
            and before.amount is not None
            and after.amount is not None
        ):
            parts.append(f"relay {before.amount - after.amount:.4f}")
        elif self.error is not None:
            # A relay may charge a request it then failed to answer (relays.md).
            parts.append("may have been charged")
        return ", ".join(parts) or "unknown"


async def _spend_one(
    http: httpx.AsyncClient,
    provider: ProviderConfig,
    request: ImageRequest,
    *,
    deadline: float,
    track_balance: bool,
) -> _Spent:
    spent = _Spent()
    if track_balance:
        spent.balance_before = await probe.probe_balance(http, provider, deadline=deadline)

    async def on_progress(event: Progress) -> None:
        if event.kind == "partial":
            spent.partials += 1
        elif event.kind == "downloading":
            spent.downloads += 1

    client = UpstreamClient(provider, http=http)
    try:
        spent.result = await client.run(request, on_progress)
    except UpstreamError as error:
        spent.error = error
    if track_balance:
        spent.balance_after = await probe.probe_balance(http, provider, deadline=deadline)
    return spent


def _error_text(error: UpstreamError) -> str:
    return f"{error.kind}: {error.detail}"[:160]


async def _paid_checks(
    http: httpx.AsyncClient,
    provider: ProviderConfig,
    report: ProviderReport,
    *,
    deadline: float,
    track_balance: bool,
) -> None:
    # One attempt each, no silent 2K retry: the doctor wants to see what the relay does.
    base = provider.model_copy(update={"max_retries": 0, "size_fallback": False})
    plain = base.model_copy(update={"stream": False})
    request = ImageRequest(prompt=PROMPT, size=SIZE, n=1, quality=QUALITY)

    async def spend(config: ProviderConfig, req: ImageRequest) -> _Spent:
        return await _spend_one(http, config, req, deadline=deadline, track_balance=track_balance)

    streamed = await spend(base.model_copy(update={"stream": True, "partial_images": 1}), request)
    unstreamed = await spend(plain, request)

    if streamed.result is not None and streamed.partials:
        report.learned["stream"] = True
        stream_text, note = "yes", f"{streamed.partials} partial preview(s)"
    elif streamed.result is not None:
        report.learned["stream"] = False
        stream_text, note = "no", "answered, but without partial previews"
    elif unstreamed.result is not None and streamed.error is not None:
        report.learned["stream"] = False
        stream_text, note = "FAILS", _error_text(streamed.error)
    else:
        stream_text = "unknown"
        note = _error_text(streamed.error) if streamed.error else ""
    if "stream" in report.learned:
        report.learned["stream_checked_at"] = time.time()
    report.rows.append(Row("stream", stream_text, f"{note}; {streamed.cost_text()}"))

    if unstreamed.result is not None:
        result = "url" if unstreamed.downloads else "b64"
        report.learned["result"] = result
        report.rows.append(Row("plain + result", result, unstreamed.cost_text()))
    else:
        assert unstreamed.error is not None
        report.rows.append(
            Row(
                "plain + result",
                "FAILS",
                f"{_error_text(unstreamed.error)}; {unstreamed.cost_text()}",
            )
        )

    edit = await spend(
        plain, ImageRequest(prompt=PROMPT, size=SIZE, quality=QUALITY, references=_references())
    )
    if edit.result is not None:
        report.learned["edits"] = True
        report.rows.append(Row("edit, 2 images", "yes", edit.cost_text()))
    elif isinstance(edit.error, NotSupportedError | NoChannelError):
        report.learned["edits"] = False
        report.rows.append(
            Row("edit, 2 images", "no", f"{_error_text(edit.error)}; {edit.cost_text()}")
        )
    else:
        assert edit.error is not None
        report.rows.append(
            Row("edit, 2 images", "unknown", f"{_error_text(edit.error)}; {edit.cost_text()}")
        )
        if type(edit.error) is UpstreamError and edit.error.status == 400:
            # litellm renames every upload to image.png, so an upstream that checks names
            # against bytes refuses the JPEG: two PNGs tell that apart from no edits at all.
            pngs = await spend(
                plain,
                ImageRequest(
                    prompt=PROMPT, size=SIZE, quality=QUALITY, references=_references(_PNG)
                ),
            )
            if pngs.result is not None:
                report.learned["edits"] = True
                note = "a JPEG reference was refused (the relay may rename uploads)"
                report.rows.append(Row("edit, 2 PNGs", "yes", f"{note}; {pngs.cost_text()}"))

    big = await spend(plain, ImageRequest(prompt=PROMPT, size=SIZE_4K, quality=QUALITY))
    if big.result is not None:
        image = big.result.images[0]
        got = f"{image.width}x{image.height}"
        # Some relay groups answer a 4K request with a 2K image instead of an error.
        report.learned["four_k"] = got == SIZE_4K
        report.rows.append(
            Row("4K", "yes" if got == SIZE_4K else "no", f"got {got}; {big.cost_text()}")
        )
    elif isinstance(big.error, UpstreamSizeError):
        report.learned["four_k"] = False
        report.rows.append(Row("4K", "no", f"{_error_text(big.error)}; {big.cost_text()}"))
    else:
        assert big.error is not None
        report.rows.append(Row("4K", "unknown", f"{_error_text(big.error)}; {big.cost_text()}"))


_CAPABILITY_ROWS: Final[tuple[tuple[str, str, dict[Any, str]], ...]] = (
    ("stream", "stream", {True: "yes", False: "no"}),
    ("result", "plain + result", {}),
    ("edits", "edit, 2 images", {True: "yes", False: "no"}),
    ("four_k", "4K", {True: "yes", False: "no"}),
)


def _known_rows(report: ProviderReport, known: dict[str, Any]) -> None:
    """Rows for capabilities a paid run learned earlier (the free run does not test them)."""
    for key, check, words in _CAPABILITY_ROWS:
        if key in known and key not in report.learned:
            value = known[key]
            report.rows.append(
                Row(check, words.get(value, str(value)), "learned earlier (--spend)")
            )


def _advise(
    report: ProviderReport, found: KeyProbe | None, spend: bool, known: dict[str, Any]
) -> None:
    """DRAWBRIDGE_PROVIDERS fields that settle by hand what was not learned."""
    learned = {**known, **report.learned}
    why = "" if spend else " (not tested without --spend)"
    if "stream" not in learned:
        report.advice["stream"] = False
        report.advice_notes.append(
            f'stream unknown{why}: "stream": false is safe (one-api and litellm fail image streams)'
        )
    if "four_k" not in learned or learned["four_k"] is False:
        report.advice["size_fallback"] = True
        report.advice_notes.append(
            f"4K {'unknown' + why if 'four_k' not in learned else 'refused'}: "
            '"size_fallback": true retries a refused 4K size at 2K'
        )
    if "edits" not in learned:
        report.advice_notes.append(
            f"edits unknown{why}: one-api has no /v1/images/edits; list a provider that edits first"
        )
    elif learned["edits"] is False:
        report.advice_notes.append("no edits: list a provider that edits before this one")
    if found is not None and found.balance is None:
        report.advice_notes.append(
            "balance not reported: the relay has no new-api/one-api billing endpoints"
        )


def render(reports: Sequence[ProviderReport]) -> str:
    """The table, then the DRAWBRIDGE_PROVIDERS hints, as plain text."""
    header = ("provider", "check", "result", "note")
    lines = [(r.name, row.check, row.result, row.note) for r in reports for row in r.rows]
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(3)]

    def fmt(cells: tuple[str, str, str, str]) -> str:
        head = "  ".join(str(c).ljust(w) for c, w in zip(cells[:3], widths, strict=True))
        return f"{head}  {cells[3]}".rstrip()

    rule = ("-" * widths[0], "-" * widths[1], "-" * widths[2], "----")
    out = [fmt(header), fmt(rule)]
    out += [fmt(line) for line in lines]
    hints = [r for r in reports if r.advice or r.advice_notes]
    if hints:
        out += ["", "Not learned: settle these in DRAWBRIDGE_PROVIDERS (a JSON list):"]
        for r in hints:
            entry = json.dumps({"name": r.name, **r.advice}, ensure_ascii=False)
            out.append(f"  {r.name}: {entry}")
            out += [f"    - {note}" for note in r.advice_notes]
    passed = sum(r.free_ok for r in reports)
    out += ["", f"free checks passed: {passed}/{len(reports)}"]
    return "\n".join(out)


async def diagnose(
    http: httpx.AsyncClient,
    provider: ProviderConfig,
    *,
    spend: bool = False,
    deadline: float = probe.DEFAULT_TIMEOUT,
    known: dict[str, Any] | None = None,
) -> ProviderReport:
    """Run the free checks (and with `spend`, the paid ones) on one provider.

    `known` is what was learned before (the stored capabilities): shown, and not advised on.
    """
    known = known or {}
    report = ProviderReport(provider.name)
    found = await _free_checks(http, provider, report, deadline)
    if spend:
        if found.models.outcome == probe.INVALID_KEY:
            report.rows.append(Row("paid checks", "skipped", "the key was refused"))
        else:
            await _paid_checks(
                http, provider, report, deadline=deadline, track_balance=found.balance is not None
            )
    _known_rows(report, known)
    _advise(report, found, spend, known)
    return report


async def _remember(capabilities: CapabilityStore, report: ProviderReport) -> None:
    if report.learned:
        await capabilities.learn(report.name, **report.learned)


async def run_doctor(
    settings: Settings,
    *,
    provider_name: str | None = None,
    spend: bool = False,
    out: TextIO | None = None,
    deadline: float = probe.DEFAULT_TIMEOUT,
) -> int:
    """`drawbridge doctor`: 0 when every checked provider passed its free checks, 1 when one
    did not, 2 when there is nothing (or no such provider) to check."""
    stream = out or sys.stdout
    providers = settings.providers()
    if provider_name is not None:
        providers = [p for p in providers if p.name == provider_name]
        if not providers:
            names = ", ".join(p.name for p in settings.providers()) or "none configured"
            print(f"error: no provider named {provider_name!r} ({names})", file=sys.stderr)
            return 2
    if not providers:
        print(
            "error: set DRAWBRIDGE_API_BASE and DRAWBRIDGE_API_KEY (or DRAWBRIDGE_PROVIDERS) first",
            file=sys.stderr,
        )
        return 2
    if spend:
        print(
            f"--spend: {len(providers)} provider(s) x 4 low-quality images "
            f"(3 at {SIZE}, 1 at {SIZE_4K}); 1024x1024 low lists at about "
            f"${math.ceil(196 * PRICE_OUTPUT * 10000) / 10000:.4f} each",
            file=sys.stderr,
        )
    secure_data_dir(settings.data_dir)
    keybox = KeyBox.load(settings.data_dir, settings.secret_key)
    store = await open_store(settings, keybox)
    capabilities = CapabilityStore(store)
    reports = []
    try:
        async with upstream_http(settings.upstream_proxy) as http:
            for provider in providers:
                # The raw stored object: only what was really learned, no None placeholders.
                known = await store.provider_capabilities(provider.name)
                report = await diagnose(http, provider, spend=spend, deadline=deadline, known=known)
                await _remember(capabilities, report)
                reports.append(report)
    finally:
        await store.close()
    print(render(reports), file=stream)
    return 0 if all(r.free_ok for r in reports) else 1
