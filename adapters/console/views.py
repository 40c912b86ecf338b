"""What the console's pages show, shaped from the store's answers (no HTTP here)."""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from dotenv import dotenv_values

from bot.config import Settings, env_name
from bot.services import Services
from bot.store import Job

JOB_FILE = re.compile(r"(?:ref|out)\d{1,2}\.(?:png|jpe?g|webp|gif)")
"""Names the job runner gives the files it keeps (`bot.jobs.JobRunner.job_dir`)."""
THUMB_PIXELS = 160
JOB_FILTERS = ("platform", "chat", "user", "status", "error_kind", "provider", "date")
LEDGER_FILTERS = ("user", "kind", "job", "date")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SECRET_WORDS = ("key", "token", "password", "secret")


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (`share` 0..1) of `values`, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


@functools.lru_cache(maxsize=256)
def size_tier(size: str) -> str:
    """`1k`, `2k` or `4k` by the long edge of a `WxH` size (as `bot.sizes.Size.tier`)."""
    width, _, height = size.partition("x")
    if not (width.isdigit() and height.isdigit()):
        return size or "auto"
    long_edge = max(int(width), int(height))
    return "1k" if long_edge <= 1536 else "2k" if long_edge <= 2560 else "4k"


async def overview(services: Services, seconds: int) -> dict[str, Any]:
    """The overview's numbers for the last `seconds`."""
    since = time.time() - seconds
    data = await services.store.console_overview(since)
    platforms = sorted(data["platforms"])
    # Every hour of the range, empty ones too: a gap in time must look like one.
    first = int(since // 3600) * 3600
    hours = list(range(first, int(time.time()) + 1, 3600))
    counts = {(int(row[0]), row[1]): int(row[2]) for row in data["per_hour"]}
    zone = ZoneInfo(services.settings.timezone)
    chart = {
        "labels": [datetime.fromtimestamp(hour, zone).strftime("%m-%d %H:00") for hour in hours],
        "datasets": [
            {"label": platform, "data": [counts.get((hour, platform), 0) for hour in hours]}
            for platform in platforms
        ],
    }
    by_platform = []
    for name in platforms:
        row = data["platforms"][name]
        finished = row["succeeded"] + row["failed"]
        by_platform.append(
            {
                "platform": name,
                "jobs": row["jobs"],
                "succeeded": row["succeeded"],
                "failed": row["failed"],
                "rate": (100.0 * row["succeeded"] / finished) if finished else None,
                "spent": row["spent"],
            }
        )
    groups: dict[tuple[str, str], list[float]] = {}
    for provider, size, seconds_taken in data["durations"]:
        groups.setdefault((provider, size_tier(size)), []).append(float(seconds_taken))
    durations = [
        {
            "provider": provider,
            "tier": tier,
            "jobs": len(values),
            "p50": percentile(values, 0.5),
            "p95": percentile(values, 0.95),
        }
        for (provider, tier), values in sorted(groups.items())
    ]
    return {
        "chart": chart,
        "costs": await upstream_costs(services, since),
        "platforms": by_platform,
        "durations": durations,
        "failures": data["failures"],
        "top_users": data["top_users"],
        "top_groups": data["top_groups"],
        "spent": sum(row["spent"] for row in by_platform),
        "jobs": sum(row["jobs"] for row in by_platform),
    }


# ---- estimated upstream cost ------------------------------------------------------------


async def upstream_costs(services: Services, since: float) -> dict[str, Any]:
    """What providers likely charged for the jobs since `since`, from
    DRAWBRIDGE_UPSTREAM_PRICES, by platform and by provider.

    Counts the images succeeded jobs delivered, each at its drawn size tier and the job's
    quality (the store sums them: `Store.console_upstream_usage`). Jobs on a user's own key
    are left out: the operator does not pay for those. `priced` is False (and nothing is
    read) without a price table.
    """
    settings = services.settings
    if not settings.upstream_prices:
        return {"priced": False, "platforms": [], "providers": [], "total": 0.0, "unpriced": 0}
    rows: dict[str, dict[str, dict[str, Any]]] = {"platform": {}, "provider": {}}
    for platform, provider, size, quality, images in await services.store.console_upstream_usage(
        since
    ):
        price = settings.upstream_price(provider, size_tier(size), quality)
        for axis, name in (("platform", platform), ("provider", provider)):
            row = rows[axis].setdefault(
                name, {"name": name, "images": 0, "cost": 0.0, "unpriced": 0}
            )
            row["images"] += images
            if price is None:
                row["unpriced"] += images
            else:
                row["cost"] += price * images
    platforms = sorted(rows["platform"].values(), key=lambda r: r["name"])
    providers = sorted(rows["provider"].values(), key=lambda r: r["name"])
    return {
        "priced": True,
        "platforms": platforms,
        "providers": providers,
        "total": sum(r["cost"] for r in platforms),
        "unpriced": sum(r["unpriced"] for r in platforms),
    }


def _day_bounds(day: str, timezone: str) -> tuple[float, float] | None:
    try:
        start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=ZoneInfo(timezone))
    except ValueError:
        return None
    return start.timestamp(), start.timestamp() + 86400


def job_filters(filters: Mapping[str, str], timezone: str) -> dict[str, str]:
    """The page's filters as the store takes them (a date becomes since/until)."""
    out = {k: v for k, v in filters.items() if k != "date"}
    if bounds := _day_bounds(filters.get("date", ""), timezone):
        out["since"], out["until"] = str(bounds[0]), str(bounds[1])
    return out


def ledger_filters(filters: Mapping[str, str], timezone: str) -> dict[str, str]:
    """The ledger page's filters as the store takes them."""
    return job_filters(filters, timezone)


def job_row(job: Job, upstream_done: float | None = None) -> dict[str, Any]:
    """One job as the jobs table and the job page show it.

    With `upstream_done` (when the upstream answered), running is the upstream's time and
    delivering the rest, up to the end.
    """
    options = job.options or {}

    def span(start: float | None, end: float | None) -> str:
        return "" if start is None or end is None else f"{end - start:.1f}s"

    return {
        "id": job.id,
        "platform": job.platform,
        "chat": job.chat_id,
        "user_id": job.user_id,
        "kind": job.kind,
        "prompt": job.prompt,
        "size": options.get("size") or "auto",
        "quality": options.get("quality") or "auto",
        "n": options.get("n") or 1,
        "refs": job.ref_count,
        "provider": job.provider or "",
        "status": job.status,
        "created_at": job.created_at,
        "queued": span(job.created_at, job.started_at),
        "running": span(job.started_at, upstream_done or job.finished_at),
        "delivering": span(upstream_done, job.finished_at),
        "total": span(job.created_at, job.finished_at),
        "cost": job.cost,
        "spent": job.spent,
        "error_kind": job.error_kind or "",
        "error_detail": job.error_detail or "",
        "images": len(job.outputs),
    }


PROBE_KINDS = ("ok", "no_model", "invalid_key", "unreachable", "error", "balance", "no_balance")
"""What a key's last probe can have found (`bot.probe.record`); each has a console message."""


def key_probe(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A user's last key probe as the users page shows it (None: never probed).

    The stored JSON is read defensively: an unknown kind shows as an error, a balance that
    is not a number is left out.
    """
    if not result:
        return None
    kind = result.get("kind")
    balance = result.get("balance")
    at = result.get("at")
    return {
        "ok": bool(result.get("ok")),
        "kind": kind if kind in PROBE_KINDS else "error",
        "balance": float(balance) if isinstance(balance, int | float) else None,
        "unlimited": bool(result.get("unlimited")),
        "at": float(at) if isinstance(at, int | float) else None,
    }


def amount(value: float) -> str:
    """A relay balance as /quota shows it: 2 decimals, 4 below 1."""
    return f"{value:.2f}" if value >= 1 else f"{value:.4f}"


async def providers(services: Services) -> list[dict[str, Any]]:
    """Each configured (or learned) provider: capabilities and health over the last hour."""
    store = services.store
    health = await store.console_provider_health(time.time() - 3600)
    names = [p.name for p in services.settings.providers()]
    configured = set(names)
    names += [n for n in await store.console_providers_known() if n not in names]
    names += [n for n in health if n not in names]
    rows = []
    for name in names:
        entry = health.get(name, {"jobs": 0, "succeeded": 0, "latencies": [], "last_error": None})
        rows.append(
            {
                "name": name,
                "configured": name in configured,
                "capabilities": await store.provider_capabilities(name),
                "jobs": entry["jobs"],
                "rate": (100.0 * entry["succeeded"] / entry["jobs"]) if entry["jobs"] else None,
                "p50": percentile(entry["latencies"], 0.5),
                "p95": percentile(entry["latencies"], 0.95),
                "last_error": entry["last_error"] or "",
            }
        )
    return rows


def _masked(field: str, value: Any) -> Any:
    if isinstance(value, list):
        return [_masked(field, item) for item in value]
    if isinstance(value, dict):
        return {k: _masked(k, v) for k, v in value.items()}
    if isinstance(value, str) and value and any(w in field.lower() for w in SECRET_WORDS):
        return "***"
    if isinstance(value, str) and "://" in value and "@" in value:
        # A proxy URL with user:password@.
        scheme, _, rest = value.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return value


def settings_rows(
    settings: Settings, environ: Mapping[str, str], env_file: Path
) -> list[dict[str, Any]]:
    """Every setting: its environment name, value (secrets masked) and where it came from."""
    try:
        from_file = {k.upper() for k in dotenv_values(env_file)} if env_file.is_file() else set()
    except OSError:
        from_file = set()
    upper_env = {k.upper() for k in environ}
    rows = []
    for field in type(settings).model_fields:
        name = env_name(field)
        source = "environment" if name in upper_env else ".env" if name in from_file else "default"
        rows.append(
            {"name": name, "value": _masked(field, getattr(settings, field)), "source": source}
        )
    return rows


def level_number(name: str) -> int:
    """A level name's number (INFO when unknown)."""
    value = logging.getLevelName(name.upper())
    return value if isinstance(value, int) else logging.INFO


def job_files(folders: list[Path]) -> list[dict[str, list[str]]]:
    """Each job folder's kept files: {"refs": [...], "outs": [...]} (empty once pruned)."""
    out = []
    for folder in folders:
        try:
            names = sorted(n for n in os.listdir(folder) if JOB_FILE.fullmatch(n))
        except OSError:
            names = []
        out.append(
            {
                "refs": [n for n in names if n.startswith("ref")],
                "outs": [n for n in names if n.startswith("out")],
            }
        )
    return out


def thumbnail(path: Path) -> bytes | None:
    """A small JPEG of a kept image, or None if it is gone or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMB_PIXELS, THUMB_PIXELS))
            image.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
            small = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()
