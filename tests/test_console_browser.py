"""The console in a real browser: Debian's Chromium driven by Playwright (never a downloaded
browser). Log in, load every page, see the charts drawn with no console errors, filter jobs,
grant credits through the form, and see the open overview count a /draw that came through
the Telegram adapter (the fake Bot API) without a reload.

Screenshots of each page go to $DRAWBRIDGE_CONSOLE_SCREENSHOTS when set (docs/console/ was
made that way), else to the test's temp dir.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.console.platform import ConsolePlatform
from adapters.telegram import TelegramPlatform
from bot.config import Settings
from bot.services import Services
from tests.fake_telegram import FakeTelegram
from tests.recording_chat import invocation, run_command
from tests.test_console import PASSWORD, finished_job
from tests.test_telegram import FAST

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGES = ("/", "/jobs", "/users", "/groups", "/ledger", "/providers", "/settings", "/logs")


@pytest.fixture
async def served(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[tuple[str, Services]]:
    # gpt-image-2's list prices per image for the seeded providers (tests/test_console_cost.py).
    prices = {"1k": {"low": 0.00588, "medium": 0.05268, "high": 0.21072}}
    settings = settings_factory(
        console_password=PASSWORD,
        console_port=0,
        upstream_prices={"main": prices, "backup": {"default": {"default": 0.1}}},
    )
    services = await Services.create(settings)
    platform = ConsolePlatform(settings, services)
    await platform.start()
    assert platform.address is not None
    try:
        yield f"http://127.0.0.1:{platform.address[1]}", services
    finally:
        await platform.stop()
        await services.close()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if shutil.which(str(CHROMIUM)) is None:
        pytest.fail(
            "Debian's Chromium is not installed at /usr/bin/chromium: "
            "run `apt-get install -y chromium` (as .ci/run does)"
        )
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=FLAGS
        )
        try:
            yield launched
        finally:
            await launched.close()


class Page:
    """A browser page that records console errors and uncaught exceptions."""

    def __init__(self, page: Any, base: str) -> None:
        self.page = page
        self.base = base
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    async def goto(self, path: str) -> None:
        response = await self.page.goto(self.base + path)
        assert response is not None and response.status == 200, path

    async def login(self) -> None:
        await self.goto("/login")
        await self.page.fill("#password", PASSWORD)
        await self.page.click("button[type=submit]")
        await self.page.wait_for_url(self.base + "/")


async def open_page(browser: Any, base: str) -> Page:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    return Page(await context.new_page(), base)


async def seed(services: Services) -> None:
    """Jobs over the last day on three platforms, some failed, for pages worth looking at."""
    store = services.store
    rng = random.Random(13)
    users = [
        await store.user(platform, str(1000 + n), name)
        for n, (platform, name) in enumerate(
            [("telegram", "Ann"), ("qq", "Bo"), ("discord", "Cy"), ("telegram", "Di")]
        )
    ]
    for user in users:
        await store.grant(user.id, 200)
    # One user with a key of their own (probed by /token) and an allowance of their own.
    await store.set_api_key(users[0].id, "sk-demo-key-for-screenshots-8f3a")
    await store.set_key_probe(
        users[0].id,
        {"ok": True, "kind": "ok", "balance": 18.5, "unlimited": False, "at": time.time() - 600},
    )
    await store.set_daily_allowance(users[1].id, 20)
    jobs = []
    for n in range(60):
        user = users[n % len(users)]
        failed = rng.random() < 0.2
        jobs.append(
            await finished_job(
                services,
                user.id,
                platform=user.platform,
                status="failed" if failed else "succeeded",
                error_kind=rng.choice(["timeout", "no_channel", "moderation"]) if failed else None,
                provider=rng.choice(["main", "backup"]),
                group_key=f"{user.platform}:group-{n % 3}" if n % 2 else None,
                prompt=rng.choice(["a red fox in snow", "a lighthouse at dusk", "an owl, ink"]),
            )
        )
    # Spread them over the last day (the store stamps "now"), straight in the file: demo data.
    now = time.time()
    with sqlite3.connect(services.settings.data_dir / "drawbridge.sqlite3") as con:
        for job_id in jobs:
            created = now - rng.uniform(0, 23 * 3600)
            queued, took = rng.uniform(0.5, 8), rng.uniform(15, 140)
            con.execute(
                "UPDATE jobs SET created_at = ?, started_at = ?, finished_at = ? WHERE id = ?",
                (created, created + queued, created + queued + took, job_id),
            )


def shots() -> Path | None:
    where = os.environ.get("DRAWBRIDGE_CONSOLE_SCREENSHOTS")
    if not where:
        return None
    # Relative to the repository (the settings fixture changes into a temp directory).
    return Path(where) if Path(where).is_absolute() else Path(__file__).parents[1] / where


async def test_every_page_loads_with_charts_drawn_and_no_console_errors(
    served: tuple[str, Services], browser: Any, tmp_path: Path
) -> None:
    base, services = served
    await seed(services)
    page = await open_page(browser, base)
    await page.login()
    folder = shots() or tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    for path in PAGES:
        await page.goto(path)
        await page.page.wait_for_load_state("networkidle")
        name = "overview" if path == "/" else path.strip("/")
        # The overview whole; the long tables as far as a screen shows.
        await page.page.screenshot(path=str(folder / f"{name}.png"), full_page=path == "/")
    await page.goto("/")
    drawn = await page.page.evaluate(
        """() => {
            const canvas = document.querySelector("canvas#per-hour");
            if (!canvas || !window.Chart || !Chart.getChart(canvas)) return 0;
            const pixels = canvas.getContext("2d").getImageData(
                0, 0, canvas.width, canvas.height).data;
            let painted = 0;
            for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted++;
            return painted;
        }"""
    )
    assert drawn > 1000, "the jobs-per-hour chart was not drawn"
    datasets = await page.page.evaluate(
        "() => Chart.getChart(document.querySelector('canvas#per-hour')).data.datasets"
        ".map(d => d.label)"
    )
    assert sorted(datasets) == ["discord", "qq", "telegram"]
    # htmx is loaded and the live block answers its poll.
    assert await page.page.evaluate("() => typeof htmx !== 'undefined'")
    await page.page.wait_for_function(
        "() => document.querySelector('#now') && document.querySelector('#now-queued')"
    )
    assert page.errors == []


async def test_jobs_are_filtered_in_the_browser(served: tuple[str, Services], browser: Any) -> None:
    base, services = served
    await seed(services)
    page = await open_page(browser, base)
    await page.login()
    await page.goto("/jobs")
    await page.page.fill("#job-filters input[name=platform]", "qq")
    await page.page.select_option("#job-filters select[name=status]", "succeeded")
    await page.page.click("#job-filters button[type=submit]")
    await page.page.wait_for_url("**/jobs?*platform=qq*")
    platforms = await page.page.eval_on_selector_all(
        "tr.job-row td.platform", "cells => cells.map(c => c.textContent)"
    )
    statuses = await page.page.eval_on_selector_all(
        "tr.job-row td.status", "cells => cells.map(c => c.textContent)"
    )
    assert platforms and set(platforms) == {"qq"}
    assert set(statuses) == {"succeeded"}
    assert page.errors == []


async def test_credits_are_granted_through_the_form(
    served: tuple[str, Services], browser: Any
) -> None:
    base, services = served
    user = await services.store.user("telegram", "4242", "Eve")
    page = await open_page(browser, base)
    await page.login()
    await page.goto("/users")
    row = f"#user-{user.id}"
    await page.page.fill(f"{row} form.grant input[name=credits]", "25")
    await page.page.click(f"{row} form.grant button")
    await page.page.wait_for_selector(f"{row} .balance:text('25')")
    assert (await services.store.user("telegram", "4242")).granted == 25
    entries, _ = await services.store.console_ledger({"user": f"#{user.id}"})
    assert [(e["kind"], e["balance_amount"]) for e in entries] == [("grant", 25)]
    assert page.errors == []


async def test_the_open_overview_counts_a_draw_through_telegram_without_a_reload(
    settings_factory: Callable[..., Settings], browser: Any
) -> None:
    # The console and the Telegram adapter in one process, as `drawbridge run` serves them;
    # a user's /draw comes through the fake Bot API to the real aiogram polling.
    async with FakeTelegram() as fake:
        settings = settings_factory(
            console_password=PASSWORD,
            console_port=0,
            telegram_bot_token=fake.token,
            telegram_api_server=fake.base_url,
        )
        services = await Services.create(settings)
        console = ConsolePlatform(settings, services)
        telegram = TelegramPlatform(settings, services, flood=FAST, polling_timeout=1)
        await console.start()
        await telegram.start()
        assert console.address is not None
        try:
            page = await open_page(browser, f"http://127.0.0.1:{console.address[1]}")
            await page.login()
            assert await page.page.text_content("#total-jobs") == "0"
            # Gone if the page were loaded again.
            await page.page.evaluate("() => { window.stillThisPage = true; }")

            alice = fake.user(1001)
            fake.send_message(fake.private_chat(alice), alice, "/draw a small boat")
            await fake.wait_call("sendPhoto", where=lambda c: "reply_markup" in c.fields)
            await services.jobs.wait_idle()

            # htmx's 5 s polls swap the cards and the now block in place.
            await page.page.wait_for_function(
                "() => document.querySelector('#total-jobs').textContent === '1'"
                " && document.querySelector('#total-spent').textContent === '1'",
                timeout=15_000,
            )
            await page.page.wait_for_function(
                "() => document.querySelector('#now-running').textContent === '0'",
                timeout=15_000,
            )
            assert await page.page.evaluate("() => window.stillThisPage === true")
            assert page.page.url.endswith("/")
            assert page.errors == []
            with sqlite3.connect(settings.data_dir / "drawbridge.sqlite3") as db:
                assert db.execute("SELECT platform, status FROM jobs").fetchall() == [
                    ("telegram", "succeeded")
                ]
        finally:
            await telegram.stop()
            await console.stop()
            await services.close()


async def test_the_now_block_updates_live_while_a_job_runs(
    settings_factory: Callable[..., Settings],
    mock_factory: Callable[..., Any],
    browser: Any,
) -> None:
    # An upstream slow enough for the overview's 5 s poll to see the job running.
    slow = await mock_factory(latency=8.0)
    settings = settings_factory(console_password=PASSWORD, console_port=0, api_base=slow.base_url)
    services = await Services.create(settings)
    platform = ConsolePlatform(settings, services)
    await platform.start()
    assert platform.address is not None
    try:
        page = await open_page(browser, f"http://127.0.0.1:{platform.address[1]}")
        await page.login()
        assert await page.page.text_content("#now-running") == "0"
        drawing = asyncio.create_task(run_command(services, invocation("draw", "a slow boat")))
        # No reload: htmx swaps the block in place.
        await page.page.wait_for_function(
            "() => document.querySelector('#now-running').textContent === '1'", timeout=15_000
        )
        chat = await drawing
        assert chat.log
        await page.page.wait_for_function(
            "() => document.querySelector('#now-running').textContent === '0'", timeout=15_000
        )
        assert page.page.url.endswith("/")
        assert page.errors == []
    finally:
        await platform.stop()
        await services.close()
