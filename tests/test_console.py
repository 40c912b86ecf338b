"""The operator console over HTTP (httpx against its app): login, sessions, CSRF, the pages,
and the admin actions as the store and the ledger see them."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import re
import signal
from collections.abc import AsyncIterator, Callable
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.console.app import Console
from adapters.console.auth import FAILED_LOGINS
from adapters.console.logbuffer import LogBuffer
from bot.config import Settings
from bot.services import Services
from tests.bot_process import BotProcess, bot_env

PASSWORD = "correct horse battery staple"


@pytest.fixture
async def console_factory(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[Services, LogBuffer]] = []

    async def make(**overrides: Any) -> tuple[Console, Services]:
        settings = settings_factory(console_password=PASSWORD, **overrides)
        services = await Services.create(settings)
        logs = LogBuffer()
        logs.attach()
        made.append((services, logs))
        return Console(settings, services, logs), services

    yield make
    for services, logs in made:
        logs.detach()
        await services.close()


@pytest.fixture
async def console(console_factory: Callable[..., Any]) -> tuple[Console, Services]:
    result: tuple[Console, Services] = await console_factory()
    return result


def client(console: Console, ip: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=console.app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://console.test")


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


async def login(http: httpx.AsyncClient, password: str = PASSWORD) -> httpx.Response:
    page = await http.get("/login")
    return await http.post("/login", data={"csrf": csrf_of(page.text), "password": password})


@contextlib.asynccontextmanager
async def logged_in(
    console: Console, ip: str = "127.0.0.1"
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client with a session, and the CSRF token its forms carry."""
    async with client(console, ip) as http:
        response = await login(http)
        assert response.status_code == 303
        home = await http.get("/")
        assert home.status_code == 200
        yield http, csrf_of(home.text)


async def finished_job(
    services: Services,
    user_id: int,
    *,
    platform: str = "telegram",
    status: str = "succeeded",
    cost: int = 2,
    provider: str = "default",
    error_kind: str | None = None,
    group_key: str | None = None,
    prompt: str = "a red fox",
) -> int:
    """A job through the store's own life cycle: created, reserved, run, settled."""
    store = services.store
    job_id = await store.create_job(
        user_id=user_id,
        platform=platform,
        chat_id="chat-1",
        group_key=group_key,
        kind="draw",
        prompt=prompt,
        options={"size": "1024x1024", "n": 1, "quality": "high"},
        ref_count=0,
        own_key=False,
    )
    await store.reserve(job_id, user_id=user_id, cost=cost, day=date.today(), daily_allowance=0)
    await store.mark_running(job_id, provider)
    if status == "succeeded":
        await store.finish_job(job_id, status="succeeded", outputs=[{"width": 1024}])
        await store.commit(job_id)
    else:
        await store.finish_job(
            job_id, status="failed", error_kind=error_kind, error_detail="relay said: no channel"
        )
        await store.refund(job_id, "failed")
    return job_id


# --- login, sessions, CSRF -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/jobs",
        "/jobs/1",
        "/users",
        "/ledger",
        "/ledger.csv",
        "/providers",
        "/settings",
        "/logs",
    ],
)
async def test_every_page_requires_login(console: tuple[Console, Services], path: str) -> None:
    async with client(console[0]) as http:
        response = await http.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == "/login"


async def test_actions_require_login(console: tuple[Console, Services]) -> None:
    app, services = console
    user = await services.store.user("telegram", "42")
    async with client(app) as http:
        response = await http.post(f"/users/{user.id}/grant", data={"credits": "5"})
    assert response.status_code == 401
    assert (await services.store.user("telegram", "42")).granted == 0


async def test_wrong_password_is_refused(console: tuple[Console, Services]) -> None:
    async with client(console[0]) as http:
        response = await login(http, "not the password")
        assert response.status_code == 401
        assert "Wrong password" in response.text
        assert (await http.get("/")).status_code == 303


async def test_right_password_opens_a_session_with_strict_cookie(
    console: tuple[Console, Services],
) -> None:
    async with client(console[0]) as http:
        response = await login(http)
        assert response.status_code == 303
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        # Served over http (no https DRAWBRIDGE_CONSOLE_URL): a Secure cookie would be lost.
        assert "secure" not in cookie.replace("samesite", "")
        assert (await http.get("/")).status_code == 200


async def test_cookie_is_secure_when_the_console_url_is_https(
    console_factory: Callable[..., Any],
) -> None:
    app, _ = await console_factory(console_url="https://console.example.com")
    async with client(app) as http:
        page = await http.get("/login")
    assert "; secure" in page.headers["set-cookie"].lower()


async def test_a_forged_cookie_is_not_a_session(console: tuple[Console, Services]) -> None:
    async with client(console[0]) as http:
        await login(http)
        value = http.cookies["drawbridge_console"]
        http.cookies.clear()
        http.cookies.set("drawbridge_console", value[:-3] + "AAA", domain="console.test")
        assert (await http.get("/")).status_code == 303


async def test_failed_logins_are_rate_limited_per_address(
    console: tuple[Console, Services],
) -> None:
    app, _ = console
    async with client(app, "10.0.0.7") as http:
        for _ in range(FAILED_LOGINS):
            assert (await login(http, "guess")).status_code == 401
        # Now even the right password is refused from this address...
        refused = await login(http, PASSWORD)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert (await http.get("/")).status_code == 303
    # ...but not from another one.
    async with client(app, "10.0.0.8") as other:
        assert (await login(other)).status_code == 303


async def test_login_without_csrf_is_refused(console: tuple[Console, Services]) -> None:
    async with client(console[0]) as http:
        await http.get("/login")
        response = await http.post("/login", data={"password": PASSWORD})
        assert response.status_code == 403
        assert (await http.get("/")).status_code == 303


async def test_post_without_or_with_a_wrong_csrf_token_is_refused(
    console: tuple[Console, Services],
) -> None:
    app, services = console
    user = await services.store.user("telegram", "42")
    async with logged_in(app) as (http, csrf):
        missing = await http.post(f"/users/{user.id}/grant", data={"credits": "5"})
        wrong = await http.post(
            f"/users/{user.id}/grant", data={"credits": "5", "csrf": csrf[:-2] + "xx"}
        )
        banned = await http.post(f"/users/{user.id}/ban", data={})
    assert (missing.status_code, wrong.status_code, banned.status_code) == (403, 403, 403)
    after = await services.store.user("telegram", "42")
    assert (after.granted, after.role) == (0, "user")
    entries, _ = await services.store.console_ledger({"user": f"#{user.id}"})
    assert entries == []


async def test_the_login_csrf_token_is_replaced_at_login(
    console: tuple[Console, Services],
) -> None:
    async with client(console[0]) as http:
        before = csrf_of((await http.get("/login")).text)
        await http.post("/login", data={"csrf": before, "password": PASSWORD})
        after = csrf_of((await http.get("/")).text)
    assert before != after


# --- open endpoints --------------------------------------------------------------------------


async def test_healthz_answers_without_login(console: tuple[Console, Services]) -> None:
    async with client(console[0]) as http:
        response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["platforms"] == {"console": "up"}


async def test_metrics_in_prometheus_format(console: tuple[Console, Services]) -> None:
    app, services = console
    user = await services.store.user("telegram", "42")
    await services.store.grant(user.id, 10)
    await finished_job(services, user.id)
    await finished_job(services, user.id, status="failed", error_kind="no_channel")
    async with client(app) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    text = response.text
    assert 'drawbridge_jobs_total{error_kind="",platform="telegram",status="succeeded"} 1.0' in text
    assert 'error_kind="no_channel"' in text
    assert 'drawbridge_credits_total{kind="commit"} 2.0' in text
    assert 'drawbridge_queue_depth{state="queued"} 0.0' in text
    assert "drawbridge_job_duration_seconds_bucket" in text


async def test_metrics_token_is_required_when_set(console_factory: Callable[..., Any]) -> None:
    app, _ = await console_factory(metrics_token="scrape-me-please")
    async with client(app) as http:
        assert (await http.get("/metrics")).status_code == 401
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = await http.get("/metrics", headers={"Authorization": "Bearer scrape-me-please"})
        assert right.status_code == 200


# --- settings and `drawbridge run` -----------------------------------------------------------


def test_short_password_on_a_public_host_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 12 characters"):
        Settings(_env_file=None, console_host="0.0.0.0", console_password="short")  # type: ignore[call-arg]
    # On loopback a short one is the operator's business.
    Settings(_env_file=None, console_host="127.0.0.1", console_password="short")  # type: ignore[call-arg]


def test_the_console_is_a_platform_only_with_a_password() -> None:
    assert "console" not in Settings(_env_file=None).enabled_platforms()  # type: ignore[call-arg]
    with_password = Settings(_env_file=None, console_password="x" * 12)  # type: ignore[call-arg]
    assert with_password.enabled_platforms() == ["console"]


async def test_run_refuses_a_short_password_on_a_public_host(tmp_path: Path) -> None:
    env = bot_env(
        DRAWBRIDGE_CONSOLE_PASSWORD="short",
        DRAWBRIDGE_CONSOLE_HOST="0.0.0.0",
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
    )
    bot = BotProcess(env, tmp_path)
    with pytest.raises(AssertionError, match="the bot exited"):
        await bot.start("console: http", within=30)
    assert await bot.stop() == 2
    errors = [line for line in bot.output if line.strip()]
    assert len(errors) == 1, bot.log
    assert "DRAWBRIDGE_CONSOLE_PASSWORD" in errors[0]
    assert "12 characters" in errors[0]
    assert "short" not in errors[0].replace("shorter", "")


async def test_run_serves_the_console_with_no_chat_platform(tmp_path: Path) -> None:
    env = bot_env(
        DRAWBRIDGE_CONSOLE_PASSWORD=PASSWORD,
        DRAWBRIDGE_CONSOLE_PORT="0",
        DRAWBRIDGE_DATA_DIR=str(tmp_path / "data"),
    )
    bot = await BotProcess(env, tmp_path).start(r"drawbridge ready: console", within=60)
    try:
        found = re.search(r"console: http://127\.0\.0\.1:(\d+)/", bot.log)
        assert found, bot.log
        base = f"http://127.0.0.1:{found.group(1)}"
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/")).status_code == 303
            assert (await login(http, "wrong")).status_code == 401
            assert (await login(http)).status_code == 303
            assert (await http.get("/")).status_code == 200
    finally:
        code = await bot.stop(signal.SIGTERM)
    assert code == 0, bot.log
    assert PASSWORD not in bot.log
