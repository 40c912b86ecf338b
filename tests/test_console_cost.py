"""The overview's estimated upstream cost: DRAWBRIDGE_UPSTREAM_PRICES applied to the images
succeeded jobs delivered (at the size drawn, the quality asked), by platform and provider.

The prices are gpt-image-2's list prices per image ($30 per 1M image output tokens), from the
token counts in OpenAI's size table: 1024x1024 low 196, medium 1756, high 7024 tokens.
"""

# Fixtures imported from tests/test_console.py are named again as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.console.app import Console
from bot.config import Settings, settings_error_lines
from bot.jobs import today
from bot.services import Services
from tests.test_console import console, console_factory, logged_in  # noqa: F401 (fixtures)

PRICES = {
    "main": {
        "1k": {"low": 0.00588, "medium": 0.05268, "high": 0.21072},
        "2k": {"default": 0.10704},
        "4k": {"high": 0.40026},
    },
    "backup": {"default": {"default": 0.1}},
}


async def delivered(
    services: Services,
    *,
    platform: str,
    provider: str,
    size: str,
    quality: str,
    drawn: list[tuple[int, int]],
    own_key: bool = False,
    status: str = "succeeded",
) -> int:
    """A settled job that asked for `size` and delivered images drawn at `drawn`."""
    store = services.store
    user = await store.user(platform, "7")
    job_id = await store.create_job(
        user_id=user.id,
        platform=platform,
        chat_id="chat-1",
        group_key=None,
        kind="draw",
        prompt="a fox",
        options={"size": size, "quality": quality, "n": len(drawn)},
        ref_count=0,
        own_key=own_key,
    )
    await store.reserve(
        job_id,
        user_id=user.id,
        cost=0 if own_key else 1,
        day=today(services.settings),
        daily_allowance=100,
    )
    await store.mark_running(job_id, provider)
    if status == "succeeded":
        outputs = [{"width": w, "height": h, "bytes": 1000, "mime": "image/png"} for w, h in drawn]
        await store.finish_job(job_id, status="succeeded", outputs=outputs)
        await store.commit(job_id)
    else:
        await store.finish_job(job_id, status="failed", error_kind="timeout")
        await store.refund(job_id, "failed")
    return job_id


def row(html: str, table: str, name: str) -> list[str]:
    """The cells of `name`'s row in the overview table `table`."""
    body = re.search(rf'<table id="{table}">(.*?)</table>', html, re.S)
    assert body, html
    for cells in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S):
        values = re.findall(r"<td[^>]*>(.*?)</td>", cells)
        if values and values[0] == name:
            return values[1:]
    raise AssertionError(f"no row {name} in {table}")


async def test_the_overview_estimates_upstream_cost_by_platform_and_provider(
    console_factory: Callable[..., Any],
) -> None:
    app, services = await console_factory(upstream_prices=PRICES)
    square = (1024, 1024)
    # Two high 1K images on main: 2 x 0.21072.
    await delivered(
        services, platform="telegram", provider="main", size="1024x1024", quality="high",
        drawn=[square, square],
    )  # fmt: skip
    # A 4K job redrawn at 2K costs the 2K price.
    await delivered(
        services, platform="qq", provider="main", size="3840x2160", quality="high",
        drawn=[(2048, 1152)],
    )  # fmt: skip
    await delivered(
        services, platform="qq", provider="backup", size="1024x1024", quality="low",
        drawn=[square],
    )  # fmt: skip
    await delivered(
        services, platform="telegram", provider="main", size="1024x1024", quality="medium",
        drawn=[square],
    )  # fmt: skip
    # No price for this provider: counted as unpriced, not as free.
    await delivered(
        services, platform="discord", provider="other", size="1024x1024", quality="high",
        drawn=[square],
    )  # fmt: skip
    # Left out: the user's own key pays, and a failed job delivered nothing.
    await delivered(
        services, platform="telegram", provider="main", size="1024x1024", quality="high",
        drawn=[square], own_key=True,
    )  # fmt: skip
    await delivered(
        services, platform="telegram", provider="main", size="1024x1024", quality="high",
        drawn=[square], status="failed",
    )  # fmt: skip

    async with logged_in(app) as (http, _):
        html = (await http.get("/")).text

    # [images, unpriced, cost]
    assert row(html, "cost-by-platform", "telegram") == ["3", "0", "0.4741"]
    assert row(html, "cost-by-platform", "qq") == ["2", "0", "0.2070"]
    assert row(html, "cost-by-platform", "discord") == ["1", "1", "0.0000"]
    assert row(html, "cost-by-provider", "main") == ["4", "0", "0.5812"]
    assert row(html, "cost-by-provider", "backup") == ["1", "0", "0.1000"]
    assert row(html, "cost-by-provider", "other") == ["1", "1", "0.0000"]
    total = 2 * 0.21072 + 0.10704 + 0.1 + 0.05268
    assert re.search(rf'id="total-cost">{total:.4f}<', html)


async def test_without_a_price_table_the_overview_says_how_to_get_one(
    console: tuple[Console, Services],
) -> None:
    app, _ = console
    async with logged_in(app) as (http, _):
        html = (await http.get("/")).text
    assert 'id="cost-unpriced"' in html and "DRAWBRIDGE_UPSTREAM_PRICES" in html
    assert 'id="total-cost"' not in html


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('{"main": {"8k": {"low": 1}}}', "tiers 1k, 2k, 4k or default"),
        ('{"main": {"1k": {"best": 1}}}', "qualities low, medium, high, auto or default"),
        ('{"main": {"1k": {"low": -0.5}}}', ".main.1k.low: must be greater than or equal to 0"),
        ('{"main": {"1k": {"low": "cheap"}}}', ".main.1k.low: must be a number"),
        ("{main: 1}", "is not valid JSON"),
    ],
)
def test_a_bad_price_table_is_one_line_naming_the_setting(value: str, says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, upstream_prices=value)  # type: ignore[call-arg]
    [line] = settings_error_lines(caught.value)
    assert line.startswith("DRAWBRIDGE_UPSTREAM_PRICES")
    assert says in line


def test_prices_fill_in_from_the_default_tier_and_quality() -> None:
    settings = Settings(_env_file=None, upstream_prices={"Main ": {"1K": {"High": 0.2}}, **PRICES})  # type: ignore[call-arg]
    assert settings.upstream_price("Main", "1k", "high") == 0.2
    assert settings.upstream_price("main", "4k", "high") == 0.40026
    assert settings.upstream_price("main", "4k", "low") is None
    assert settings.upstream_price("backup", "2k", "auto") == 0.1
    assert settings.upstream_price("unknown", "1k", "low") is None
